"""Journey runtime figures (issue 6). Run by hand, never under pytest:

    .venv/bin/python bench/journeys.py                         # the issue's counts
    .venv/bin/python bench/journeys.py --entries 1000 --flows 200 --parked 2000

It starts its own Temporal dev server from the `temporal` binary on a SQLite file with
the WAL pragmas (as `journeys dev` does), a store on a SQLite file, and one tuned worker
in this process, then measures:

1. segment entries: N transitions written to the outbox and dispatched by the product's
   DispatcherWorkflow (outbox read, re-entry lookup, signal-with-start, mark dispatched)
   vs N bare `signal_with_start` calls of the same JourneyWorkflow, same concurrency;
   both "accepted" (Temporal took the call) and "started" (the run recorded its entry);
2. the Champions flow (welcome, wait for click, reminder, VIP, pause, recommendations;
   half the customers click) with waits of seconds vs a bare workflow with the same
   timers, signals and sends; the send activity is a no-op in both;
3. the runs of (1) plus more, parked on a 3-day wait: worker RSS, and the history
   events and process CPU added over an idle period (nothing should happen).
"""

from __future__ import annotations

import os
import sys

# Import bench/ modules as `bench.x` from the repository root, never as top-level
# names that could shadow the standard library.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(__file__)]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from activities.dispatch import TransitionDispatcher, ensure_dispatcher  # noqa: E402
from activities.runs import RunActivities  # noqa: E402
from bench.histories import history_stats, print_history_table  # noqa: E402
from bench.journey_baseline import (  # noqa: E402
    BareChampionsFlow,
    BareFlowInput,
    noop_send_message,
)
from core.db import make_engine  # noqa: E402
from core.journeys import JourneyDefinition  # noqa: E402
from core.migrate import migrate  # noqa: E402
from core.runs import CURRENT_RUNTIME, JourneyEntry, JourneyInput  # noqa: E402
from core.settings import Settings, find_executable  # noqa: E402
from core.signals import (  # noqa: E402
    JOURNEY_EVENT_SIGNAL,
    SEGMENT_ENTRY_SIGNAL,
    CustomerEventSignal,
    SegmentSignal,
    journey_workflow_id,
)
from core.tables import Journey, JourneyVersion, Segment, SegmentTransition  # noqa: E402
from worker import build_worker, connect_client  # noqa: E402
from workflows.dispatch import DispatcherWorkflow  # noqa: E402
from workflows.journey import JourneyWorkflow  # noqa: E402

SEGMENT = "bench:champions"


def parked_definition(slug: str) -> JourneyDefinition:
    return JourneyDefinition.model_validate(
        {
            "slug": slug,
            "name": slug,
            "trigger": {"segment": SEGMENT},
            "start": "wait",
            "steps": {
                "wait": {
                    "type": "wait_for_event",
                    "event": "AppOpen",
                    "timeout": "P3D",
                    "on_event": None,
                    "on_timeout": None,
                }
            },
        }
    )


def champions_definition(wait_seconds: float, delay_seconds: float) -> JourneyDefinition:
    return JourneyDefinition.model_validate(
        {
            "slug": "bench-champions",
            "name": "Champions",
            "trigger": {"segment": SEGMENT},
            "goal": {"event": "Purchase", "within": "P30D"},
            "start": "welcome",
            "steps": {
                "welcome": {"type": "email", "template": "champions/welcome.html", "next": "wait"},
                "wait": {
                    "type": "wait_for_event",
                    "event": "email_clicked",
                    "of_step": "welcome",
                    "timeout": f"PT{wait_seconds}S",
                    "on_event": "vip",
                    "on_timeout": "reminder",
                },
                "reminder": {"type": "email", "template": "champions/reminder.html", "next": "vip"},
                "vip": {"type": "email", "template": "champions/vip_rewards.html", "next": "pause"},
                "pause": {"type": "delay", "duration": f"PT{delay_seconds}S", "next": "recs"},
                "recs": {
                    "type": "email",
                    "template": "champions/recommendations.html",
                    "next": None,
                },
            },
        }
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_temporal(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [
            find_executable("temporal"),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--headless",
            "--db-filename",
            str(folder / "temporal.db"),
            "--sqlite-pragma",
            "journal_mode=wal",
            "--sqlite-pragma",
            "synchronous=normal",
            "--log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, f"127.0.0.1:{port}"


async def gather_bounded(calls: list[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


async def wait_until(check: Callable[[], bool], *, poll: float = 0.05) -> float:
    while not check():
        await asyncio.sleep(poll)
    return time.perf_counter()


def now() -> datetime:
    return datetime.now(UTC)


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.engine = make_engine(f"sqlite:///{folder / 'store.db'}")
        migrate(self.engine)

    def count(self, sql: str, **params: Any) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text(sql), params).scalar_one())

    def started_runs(self, slug: str) -> int:
        return self.count(
            "SELECT count(*) FROM journey_runs WHERE journey_slug = :slug"
            " AND waiting_for IS NOT NULL",
            slug=slug,
        )

    def install(self, definition: JourneyDefinition) -> None:
        # Written directly: the lifecycle API would also check templates and segments.
        moment = now()
        with self.engine.begin() as conn:
            conn.execute(
                insert(Journey.__table__).values(
                    slug=definition.slug,
                    name=definition.name,
                    state="active",
                    latest_version=1,
                    active_version=1,
                    trigger_segment=SEGMENT,
                    created_at=moment,
                    updated_at=moment,
                )
            )
            conn.execute(
                insert(JourneyVersion.__table__).values(
                    journey_slug=definition.slug,
                    version=1,
                    definition=definition.model_dump(mode="json", by_alias=True),
                    created_at=moment,
                    activated_at=moment,
                )
            )

    def write_transitions(self, customers: list[str]) -> None:
        moment = now()
        with self.engine.begin() as conn:
            conn.execute(
                insert(SegmentTransition.__table__),
                [
                    {
                        "segment_slug": SEGMENT,
                        "customer_id": customer,
                        "kind": "entered",
                        "source": "rfm-pass:1",
                        "context": {"pass_id": 1, "r": 5, "f": 4, "m": 5},
                        "occurred_at": moment,
                    }
                    for customer in customers
                ],
            )


def journey_input(definition: JourneyDefinition, customer: str, settings: Settings) -> JourneyInput:
    return JourneyInput(
        journey_slug=definition.slug,
        version=1,
        customer_id=customer,
        definition=definition,
        entry=JourneyEntry(segment=SEGMENT, occurred_at=now(), source="bench"),
        history_event_threshold=settings.history_event_threshold,
        runtime=CURRENT_RUNTIME,
    )


async def bare_starts(
    client: Any, settings: Settings, definition: JourneyDefinition, n: int, concurrency: int
) -> None:
    async def start(customer: str) -> None:
        await client.start_workflow(
            JourneyWorkflow.run,
            journey_input(definition, customer, settings),
            id=journey_workflow_id(definition.slug, customer),
            task_queue=settings.task_queue,
            start_signal=SEGMENT_ENTRY_SIGNAL,
            start_signal_args=[SegmentSignal(segment=SEGMENT, transition_id=0, occurred_at=now())],
        )

    tag = uuid.uuid4().hex[:6]
    await gather_bounded([lambda i=i: start(f"bare-{tag}-{i}") for i in range(n)], concurrency)


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:7.1f}/s ({n} in {seconds:.1f} s)"


async def entries(bench: Bench, client: Any, settings: Settings) -> None:
    n, concurrency, rounds = bench.args.entries, bench.args.concurrency, bench.args.rounds
    bare = parked_definition("bench-bare-entries")
    dispatched = parked_definition("bench-dispatched-entries")
    bench.install(dispatched)
    await ensure_dispatcher(client, settings)
    chunk = max(1, n // rounds)
    spent = {"bare accepted": 0.0, "bare started": 0.0, "disp accepted": 0.0, "disp started": 0.0}
    # Alternate rounds of each, so a load that drifts (other work on the machine) is
    # shared by both; each round waits until its runs have started.
    for round_no in range(rounds):
        began = time.perf_counter()
        await bare_starts(client, settings, bare, chunk, concurrency)
        spent["bare accepted"] += time.perf_counter() - began
        goal = chunk * (round_no + 1)
        spent["bare started"] += (
            await wait_until(lambda goal=goal: bench.started_runs(bare.slug) >= goal) - began
        )

        began = time.perf_counter()
        bench.write_transitions([f"entry-{round_no}-{i}" for i in range(chunk)])
        done = await wait_until(
            lambda: (
                bench.count("SELECT count(*) FROM segment_transitions WHERE dispatched_at IS NULL")
                == 0
            )
        )
        spent["disp accepted"] += done - began
        spent["disp started"] += (
            await wait_until(lambda goal=goal: bench.started_runs(dispatched.slug) >= goal) - began
        )
    total = chunk * rounds
    print(
        f"1. segment entries, {total} customers in {rounds} alternating rounds, concurrency {concurrency}"
    )
    print(
        f"   bare signal_with_start   accepted {rate(total, spent['bare accepted'])}"
        f"  started {rate(total, spent['bare started'])}"
    )
    print(
        f"   outbox -> dispatcher     accepted {rate(total, spent['disp accepted'])}"
        f"  started {rate(total, spent['disp started'])}"
    )
    print(
        f"   dispatched / bare: {spent['bare accepted'] / spent['disp accepted']:.0%} accepted,"
        f" {spent['bare started'] / spent['disp started']:.0%} started (target >= 80%)"
    )


async def flows(bench: Bench, client: Any, settings: Settings) -> None:
    n, concurrency = bench.args.flows, bench.args.concurrency
    wait, delay = bench.args.wait_seconds, bench.args.delay_seconds
    definition = champions_definition(wait, delay)
    tag = uuid.uuid4().hex[:6]

    async def journey_flow(i: int) -> Any:
        customer = f"flow-{tag}-{i}"
        clicker = i % 2 == 0
        handle = await client.start_workflow(
            JourneyWorkflow.run,
            journey_input(definition, customer, settings),
            id=journey_workflow_id(definition.slug, customer),
            task_queue=settings.task_queue,
            # As the dispatcher starts a run: no entry signal (the click is the test's).
            start_signal=JOURNEY_EVENT_SIGNAL if clicker else None,
            start_signal_args=[
                CustomerEventSignal(name="email_clicked", step="welcome", occurred_at=now())
            ]
            if clicker
            else [],
        )
        return handle

    async def bare_flow(i: int) -> Any:
        customer = f"bare-flow-{tag}-{i}"
        clicker = i % 2 == 0
        handle = await client.start_workflow(
            BareChampionsFlow.run,
            BareFlowInput(customer_id=customer, wait_seconds=wait, delay_seconds=delay),
            id=f"bare:{customer}",
            task_queue=settings.task_queue,
            start_signal=JOURNEY_EVENT_SIGNAL if clicker else None,
            start_signal_args=[
                CustomerEventSignal(name="email_clicked", step="welcome", occurred_at=now())
            ]
            if clicker
            else [],
        )
        return handle

    timings = {}
    for name, flow in (("bare", bare_flow), ("journey", journey_flow)):
        began = time.perf_counter()
        # Starts are bounded like the dispatcher's; the flows then all run at once.
        handles = await gather_bounded(
            [lambda i=i, flow=flow: flow(i) for i in range(n)], concurrency
        )
        await asyncio.gather(*(handle.result() for handle in handles))
        timings[name] = time.perf_counter() - began
    print(f"2. Champions flow, {n} customers (half click), wait {wait} s, pause {delay} s")
    print(f"   bare workflow, same timers and sends  {rate(n, timings['bare'])}")
    print(f"   JourneyWorkflow                       {rate(n, timings['journey'])}")
    print(f"   journey / bare: {timings['bare'] / timings['journey']:.0%} (target >= 85%)")
    sample = range(min(n, 20))
    journey_ids = [journey_workflow_id(definition.slug, f"flow-{tag}-{i}") for i in sample]
    bare_ids = [f"bare:bare-flow-{tag}-{i}" for i in sample]
    print(f"   Temporal history per run ({len(sample)} sampled runs of each, half click):")
    print_history_table(
        [
            ("JourneyWorkflow", await history_stats(client, journey_ids), len(journey_ids)),
            ("bare workflow", await history_stats(client, bare_ids), len(bare_ids)),
        ]
    )


async def parked(bench: Bench, client: Any, settings: Settings) -> None:
    target = bench.args.parked
    definition = parked_definition("bench-parked")
    already = bench.count(
        "SELECT count(*) FROM journey_runs WHERE status = 'running' AND waiting_until IS NOT NULL"
    )
    extra = max(0, target - already)
    await bare_starts(client, settings, definition, extra, bench.args.concurrency)
    await wait_until(lambda: bench.started_runs(definition.slug) >= extra, poll=0.2)
    parked_runs = bench.count(
        "SELECT count(*) FROM journey_runs WHERE status = 'running' AND waiting_until IS NOT NULL"
    )
    with bench.engine.connect() as conn:
        sample = list(
            conn.execute(
                text(
                    "SELECT workflow_id FROM journey_runs WHERE status = 'running'"
                    " ORDER BY id DESC LIMIT 50"
                )
            ).scalars()
        )

    async def history_events() -> int:
        total = 0
        for workflow_id in sample:
            history = await client.get_workflow_handle(workflow_id).fetch_history()
            total += len(history.events)
        return total

    process = psutil.Process()
    await asyncio.sleep(2)
    before_events = await history_events()
    cpu_before = sum(process.cpu_times()[:2])
    await asyncio.sleep(bench.args.idle_seconds)
    cpu_after = sum(process.cpu_times()[:2])
    after_events = await history_events()
    rss = process.memory_info().rss / 2**20
    print(f"3. {parked_runs} runs parked on a 3-day wait")
    print(
        f"   worker process RSS {rss:.0f} MiB (target <= 512 MiB; {bench.rss_at_start:.0f} MiB"
        " before any run; the bench client runs in the same process)"
    )
    print(
        f"   over {bench.args.idle_seconds:.0f} s idle: {after_events - before_events} history events"
        f" added on {len(sample)} sampled runs, {cpu_after - cpu_before:.2f} s process CPU"
    )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-journeys-") as name:
        folder = Path(name)
        server, address = start_temporal(folder)
        try:
            settings = Settings(
                temporal_address=address,
                task_queue=f"bench-{uuid.uuid4().hex[:6]}",
                dispatch_poll_seconds=0.05,
                **({"worker_max_cached_workflows": args.cache} if args.cache is not None else {}),
            )
            print(
                f"worker: {settings.worker_workflow_pollers} workflow pollers,"
                f" {settings.worker_max_workflow_tasks} task slots,"
                f" sticky cache {settings.worker_max_cached_workflows} workflows"
            )
            for _ in range(200):
                try:
                    client = await connect_client(settings)
                    break
                except Exception:  # noqa: BLE001
                    await asyncio.sleep(0.2)
            else:
                raise SystemExit("the Temporal dev server did not start")
            bench = Bench(args, folder)
            with bench.engine.begin() as conn:
                conn.execute(
                    insert(Segment.__table__).values(
                        slug=SEGMENT,
                        name=SEGMENT,
                        kind="external",
                        version=1,
                        created_at=now(),
                        updated_at=now(),
                    )
                )
            dispatcher = TransitionDispatcher(
                bench.engine,
                client,
                task_queue=settings.task_queue,
                concurrency=args.concurrency,
                history_event_threshold=settings.history_event_threshold,
            )
            runs = RunActivities(bench.engine)
            worker = build_worker(
                client,
                settings,
                bench.engine,
                workflows=[JourneyWorkflow, DispatcherWorkflow, BareChampionsFlow],
                activities=[
                    noop_send_message(runs),
                    *runs.all(),
                    *dispatcher.activities(),
                ],
            )
            async with worker:
                bench.rss_at_start = psutil.Process().memory_info().rss / 2**20
                if args.entries:
                    await entries(bench, client, settings)
                if args.flows:
                    await flows(bench, client, settings)
                if args.parked:
                    await parked(bench, client, settings)
        finally:
            server.terminate()
            server.wait(timeout=30)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--flows", type=int, default=1_000)
    parser.add_argument("--parked", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of part 1")
    parser.add_argument("--wait-seconds", type=float, default=2.0)
    parser.add_argument("--delay-seconds", type=float, default=1.0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument(
        "--cache",
        type=int,
        default=None,
        help="sticky cache size (default: Settings.worker_max_cached_workflows)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
    sys.stdout.flush()
    # temporalio's threads can crash interpreter finalisation (docs/architecture.md).
    os._exit(0)
