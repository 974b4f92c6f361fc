"""Soak (run by hand): `journeys dev` under steady load with workers killed, for minutes.

The stack is `journeys dev`'s own (devstack.DevStack): a Temporal dev server on a SQLite
file, the store (PostgreSQL by default), two workers and the API, healed by the
supervisor. SendGrid is a stub on 127.0.0.1 in its own process (the real `sendgrid`
client talks to it) that reports every message it takes to the signed event webhook.

The load: customers (100,000) buy at a steady rate (200/s) through `POST /v1/events`.
A purchase of 90 or more puts its customer in a rule segment (in real time), which
starts a journey: an email, a wait of seconds, an email. Every `--kill-every` seconds a
worker is SIGKILLed; the supervisor starts it again.

Printed: lost and duplicate sends (at the stub and in the store), the RSS of every
process at the start and the end, the ingest latency, and purchase -> segment entry ->
journey started -> first message sent, p50 and p99, beside the floor measured in the
same run on the same server: a bare signal-with-start of an empty workflow, and a bare
activity sending one email through the same client to the same stub.

    .venv/bin/python -m bench.soak                          # 10 minutes, as in issue 17
    .venv/bin/python -m bench.soak --minutes 2 --customers 20000 --rate 100
    .venv/bin/python -m bench.soak --db sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import text
from sqlalchemy.engine import Engine
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.worker import Worker

from bench.stores import bench_store
from core.settings import Settings
from devstack import DevStack
from providers.outgoing import OutgoingEmail
from providers.sendgrid import SendGridEmailProvider
from tests.utils.live_api import free_port

SEGMENT = "soak-big-spenders"
JOURNEY = "soak"
# A killed worker's real-time processor and dispatcher are taken over after their 10 s
# heartbeat timeout: purchases around a kill wait for that (reported apart as well).
KILL_SHADOW_SECONDS = 30.0
BIG_PURCHASE = 90  # prices are 1..100: about one purchase in nine is big
SENDGRID_KEY = "SG.soak"

# --- the stub SendGrid, in its own process ------------------------------------------------


def _stub_process(
    port_queue: Any, commands: Any, replies: Any, private_pem: bytes, webhook_url: str
) -> None:
    """Serve the stub and its webhook until told `stop`; answer `stats` with its counts."""
    from cryptography.hazmat.primitives import serialization

    from tests.utils.cluster import SendGridWebhook
    from tests.utils.messaging import ProviderStub, SendGridSigner

    private_key = serialization.load_pem_private_key(private_pem, password=None)
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signer = SendGridSigner(private_key, base64.b64encode(der).decode())
    webhook = SendGridWebhook(signer)
    stub = ProviderStub(keep_requests=False, on_accept=webhook.report).start()
    port_queue.put(stub.url)
    while True:
        command = commands.get()
        if command == "webhook":
            webhook.start(webhook_url)
        elif command == "stats":
            with stub.lock:
                replies.put({"accepted": dict(stub.accepted), "webhook_pending": webhook.pending})
        elif command == "stop":
            webhook.stop()
            stub.stop()
            return


@dataclass
class StubProcess:
    url: str
    process: multiprocessing.Process
    commands: Any
    replies: Any

    def stats(self) -> dict[str, Any]:
        self.commands.put("stats")
        return self.replies.get(timeout=60)

    def stop(self) -> None:
        self.commands.put("stop")
        self.process.join(timeout=15)
        if self.process.is_alive():
            self.process.kill()


def start_stub(webhook_url: str) -> tuple[StubProcess, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = base64.b64encode(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).decode()
    context = multiprocessing.get_context("spawn")
    port_queue, commands, replies = context.Queue(), context.Queue(), context.Queue()
    process = context.Process(
        target=_stub_process,
        args=(port_queue, commands, replies, pem, webhook_url),
        daemon=True,
    )
    process.start()
    return StubProcess(port_queue.get(timeout=60), process, commands, replies), public


# --- the floor: a bare signal-with-start and a bare send activity -------------------------


@workflow.defn(name="SoakBareStart", sandboxed=False)
class BareStart:
    @workflow.signal(name="entered")
    def entered(self, segment: str) -> None:
        return

    @workflow.run
    async def run(self) -> None:
        return


@workflow.defn(name="SoakBareSend", sandboxed=False)
class BareSend:
    @workflow.run
    async def run(self, customer: str) -> None:
        await workflow.execute_activity(
            "soak_bare_send",
            customer,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=3),
        )


def bare_send_activity(settings: Settings) -> Any:
    provider = SendGridEmailProvider(settings)

    @activity.defn(name="soak_bare_send")
    def send(customer: str) -> None:
        provider.send_email(
            OutgoingEmail(
                to=f"{customer}@example.com",
                from_email="hello@shop.example.com",
                subject="floor",
                html="<p>floor</p>",
                text="floor",
                idempotency_key=f"floor:{customer}",
            )
        )

    return send


async def measure_floor(address: str, stub_url: str, samples: int) -> dict[str, list[float]]:
    """One at a time, so each figure is the latency of an idle path."""
    from concurrent.futures import ThreadPoolExecutor

    client = await Client.connect(address)
    queue = f"soak-floor-{uuid.uuid4().hex[:6]}"
    settings = Settings(
        sendgrid_api_key=SENDGRID_KEY, sendgrid_base_url=stub_url, environment="test"
    )
    found: dict[str, list[float]] = {"signal-with-start": [], "send activity": []}
    async with Worker(
        client,
        task_queue=queue,
        workflows=[BareStart, BareSend],
        activities=[bare_send_activity(settings)],
        activity_executor=ThreadPoolExecutor(4),
    ):
        for i in range(samples):
            began = time.perf_counter()
            handle = await client.start_workflow(
                BareStart.run,
                id=f"floor-start-{queue}-{i}",
                task_queue=queue,
                start_signal="entered",
                start_signal_args=["floor"],
            )
            await handle.result()
            found["signal-with-start"].append(time.perf_counter() - began)
            began = time.perf_counter()
            await client.execute_workflow(
                BareSend.run, f"floor-{queue}-{i}", id=f"floor-send-{queue}-{i}", task_queue=queue
            )
            found["send activity"].append(time.perf_counter() - began)
    return found


# --- the load --------------------------------------------------------------------------------


class Connection:
    """One kept-alive HTTP/1.1 connection that POSTs JSON. The load costs the driver
    little CPU this way (httpx spent about 2 ms of it a request): on a busy machine the
    driver, not the API, set the rate."""

    def __init__(self, host: str, port: int, authorization: str) -> None:
        self.host, self.port = host, port
        self.head = (
            f"Host: {host}:{port}\r\nAuthorization: {authorization}\r\n"
            "Content-Type: application/json\r\n"
        )
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, float]:
        """The status and the Retry-After of the answer."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length, retry_after = 0, 1.0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "retry-after":
                retry_after = float(value)
        await self.reader.readexactly(length)
        return status, retry_after

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Load:
    rate: float
    customers: int
    seconds: float
    connections: int = 32
    rng: random.Random = field(default_factory=lambda: random.Random(17))
    latencies: list[float] = field(default_factory=list)
    # How late each request left against its schedule: the driver's own lag.
    lags: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    # The client clock when each customer's first big purchase was sent.
    first_big: dict[str, float] = field(default_factory=dict)
    sent: int = 0

    async def run(self, url: str, authorization: str) -> float:
        """Open loop: request i is due at start + i / rate, whatever the earlier answers;
        `connections` senders take them as they come due."""
        host, port = url.removeprefix("http://").split(":")
        due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
        senders = [
            asyncio.create_task(self._sender(Connection(host, int(port), authorization), due))
            for _ in range(self.connections)
        ]
        start = time.perf_counter()
        for i in range(int(self.rate * self.seconds)):
            at = start + i / self.rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            due.put_nowait((i, at))
        for _ in senders:
            due.put_nowait(None)
        await asyncio.gather(*senders)
        return time.perf_counter() - start

    async def _sender(
        self, connection: Connection, due: asyncio.Queue[tuple[int, float] | None]
    ) -> None:
        while (item := await due.get()) is not None:
            await self._one(connection, *item)
        connection.close()

    async def _one(self, connection: Connection, i: int, at: float) -> None:
        customer = f"c{self.rng.randrange(self.customers):06d}"
        price = self.rng.randint(1, 100)
        body = json.dumps(
            {
                "event_id": f"soak-{i}",
                "customer_id": customer,
                "name": "Purchase",
                "occurred_at": _iso_now(),
                "properties": {"total_price": price},
            }
        ).encode()
        began = time.perf_counter()
        wall = time.time()
        self.lags.append(began - at)
        # A client sends an event again (the same id) after a lost connection or a 503.
        for _ in range(5):
            try:
                status, retry_after = await connection.post("/v1/events", body)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
                self.errors[type(exc).__name__] += 1
                connection.close()
                continue
            self.statuses[status] += 1
            if status == 201:
                self.latencies.append(time.perf_counter() - began)
                if price >= BIG_PURCHASE:
                    self.first_big.setdefault(customer, wall)
            if status != 503:
                break
            await asyncio.sleep(retry_after)
        self.sent += 1


def _iso_now() -> str:
    return datetime.now(UTC).isoformat()


# --- the stack -------------------------------------------------------------------------------


class Supervisor:
    """Runs the stack's healing rounds in a thread of its own for the whole soak (the
    children die with the thread that started them, see devstack._die_with_parent)."""

    def __init__(self, stack: DevStack) -> None:
        self.stack = stack
        self.log: list[str] = []
        stack.say = lambda line: self.log.append(f"{time.strftime('%H:%M:%S')} {line}")
        self._stop = threading.Event()
        self._started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def _run(self) -> None:
        try:
            self.stack.start()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
            self._started.set()
            return
        self._started.set()
        while not self._stop.is_set():
            self.stack.heal()
            time.sleep(0.25)
        self.stack.stop()

    def start(self) -> None:
        self.thread.start()
        self._started.wait()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=120)


def rss_of(stack: DevStack, stub: StubProcess) -> dict[str, tuple[int, float]]:
    """pid and RSS (MiB) of every process of the soak."""
    found: dict[str, tuple[int, float]] = {}
    pids = {child.name: child.process.pid for child in stack.children if child.process}
    pids["stub sendgrid"] = stub.process.pid or 0
    pids["bench driver"] = os.getpid()
    for name, pid in pids.items():
        try:
            found[name] = (pid, psutil.Process(pid).memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            found[name] = (pid, float("nan"))
    return found


def set_up(api: httpx.Client, customers: int, pause: str) -> None:
    for start in range(0, customers, 20_000):
        lines = "\n".join(
            json.dumps({"customer_id": f"c{i:06d}", "email": f"c{i:06d}@example.com"})
            for i in range(start, min(customers, start + 20_000))
        )
        response = api.post(
            "/v1/customers/bulk", content=lines, headers={"content-type": "application/x-ndjson"}
        )
        response.raise_for_status()
    segment = {
        "slug": SEGMENT,
        "name": "Big spenders",
        "condition": {
            "event": "Purchase",
            "count": {"gte": 1},
            "within": "P30D",
            "where": [{"property": "total_price", "op": "gte", "value": BIG_PURCHASE}],
        },
    }
    journey = {
        "slug": JOURNEY,
        "name": "Soak",
        "trigger": {"segment": SEGMENT},
        # A send left in doubt by a killed worker is sent again unless SendGrid's event
        # webhook (the stub posts one for every message it takes) said it arrived.
        "in_doubt_policy": "resend",
        "start": "hello",
        "steps": {
            "hello": {"type": "email", "template": "champions/welcome.html", "next": "pause"},
            "pause": {"type": "delay", "duration": pause, "next": "bye"},
            "bye": {"type": "email", "template": "champions/reminder.html", "next": None},
        },
    }
    for path, body in (
        ("/v1/segments", segment),
        ("/v1/journeys", journey),
        (f"/v1/journeys/{JOURNEY}/activate", None),
    ):
        api.post(path, json=body).raise_for_status()


# --- what happened ---------------------------------------------------------------------------


def quantiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1000:8.1f} ms  p99 {p99 * 1000:8.1f} ms  (n={len(ordered)})"


def stage_times(engine: Engine) -> dict[str, dict[str, float]]:
    """Per customer: when they entered the segment, their run started, their first email
    was sent (the processes' clocks, the same machine's)."""
    queries = {
        "entry": "SELECT customer_id, MIN(occurred_at) FROM segment_transitions"
        f" WHERE segment_slug = '{SEGMENT}' AND kind = 'entered' GROUP BY customer_id",
        "started": "SELECT customer_id, MIN(occurred_at) FROM run_events"
        f" WHERE journey_slug = '{JOURNEY}' AND kind = 'entered' GROUP BY customer_id",
        "first message": "SELECT customer_id, MIN(sent_at) FROM messages"
        f" WHERE journey_slug = '{JOURNEY}' AND step = 'hello' AND sent_at IS NOT NULL"
        " GROUP BY customer_id",
    }
    found: dict[str, dict[str, float]] = {}
    with engine.connect() as conn:
        for stage, sql in queries.items():
            found[stage] = {row[0]: row[1].timestamp() for row in conn.execute(text(sql))}
    return found


def count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def sends_check(engine: Engine, accepted: dict[str, int]) -> dict[str, int]:
    """Every customer who entered must have got `hello` and `bye` exactly once."""
    with engine.connect() as conn:
        entered = {
            row[0]
            for row in conn.execute(
                text(
                    "SELECT DISTINCT customer_id FROM segment_transitions"
                    " WHERE segment_slug = :s AND kind = 'entered'"
                ),
                {"s": SEGMENT},
            )
        }
        stored = Counter(
            (row[0], row[1])
            for row in conn.execute(
                text("SELECT customer_id, step FROM messages WHERE journey_slug = :j"),
                {"j": JOURNEY},
            )
        )
        statuses = Counter(
            row[0]
            for row in conn.execute(
                text("SELECT status FROM messages WHERE journey_slug = :j"), {"j": JOURNEY}
            )
        )
    at_stub: Counter[tuple[str, str]] = Counter()
    for key, times in accepted.items():
        if key.startswith(f"journey:{JOURNEY}:"):
            workflow_id, _run, step = key.rsplit(":", 2)
            at_stub[(workflow_id.split(":", 2)[2], step)] += times
    expected = {(customer, step) for customer in entered for step in ("hello", "bye")}
    return {
        "customers entered": len(entered),
        "messages expected": len(expected),
        "lost (not at the stub)": len(expected - set(at_stub)),
        "duplicate (twice at the stub)": sum(1 for n in at_stub.values() if n > 1),
        "unexpected at the stub": len(set(at_stub) - expected),
        "lost (not in the store)": len(expected - set(stored)),
        "duplicate (twice in the store)": sum(1 for n in stored.values() if n > 1),
        **{f"store status {status}": n for status, n in sorted(statuses.items())},
    }


# --- the run ---------------------------------------------------------------------------------


async def soak(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="journeys-soak-"))
    schema = f"soak_{uuid.uuid4().hex[:8]}"
    engine = bench_store(
        db=args.db,
        url=args.url,
        sqlite_path=str(workdir / "journeys.db"),
        schema=schema,
        reuse=False,
    )
    port = free_port()
    stub, public_key = start_stub(f"http://127.0.0.1:{port}/webhooks/sendgrid")
    os.environ.update(
        JOURNEYS_DATABASE_URL=engine.url.render_as_string(hide_password=False),
        JOURNEYS_SENDGRID_API_KEY=SENDGRID_KEY,
        JOURNEYS_SENDGRID_BASE_URL=stub.url,
        JOURNEYS_SENDGRID_WEBHOOK_PUBLIC_KEY=public_key,
        JOURNEYS_EMAIL_FROM="hello@shop.example.com",
    )
    stack = DevStack(workdir, port, free_port(), free_port(), workers=args.workers)
    supervisor = Supervisor(stack)
    print(f"load before: {os.getloadavg()}; workdir {workdir}", flush=True)
    try:
        supervisor.start()
        stub.commands.put("webhook")
        admin = (workdir / "admin-key").read_text().strip()
        headers = {"Authorization": f"Bearer {admin}"}
        with httpx.Client(base_url=stack.api_url, headers=headers, timeout=300) as api:
            set_up(api, args.customers, args.pause)
        # The new profiles go through real-time processing first; the load starts after.
        began = time.perf_counter()
        while count(engine, "SELECT COUNT(*) FROM customers WHERE realtime_pending") > 0:
            await asyncio.sleep(1)
        print(
            f"set up; real time caught up with the profiles in {time.perf_counter() - began:.0f} s"
        )
        floor = await measure_floor(
            f"127.0.0.1:{stack.temporal_port}", stub.url, args.floor_samples
        )
        rss_start = rss_of(stack, stub)
        load = Load(rate=args.rate, customers=args.customers, seconds=args.minutes * 60)
        kills: list[str] = []
        kill_times: list[float] = []

        async def killer() -> None:
            names = [c.name for c in stack.children if c.name.startswith("worker")]
            for n in range(int(args.minutes * 60 // args.kill_every)):
                await asyncio.sleep(args.kill_every)
                child = stack.child(names[n % len(names)])
                if child.process is not None and child.process.poll() is None:
                    child.process.send_signal(signal.SIGKILL)
                    kill_times.append(time.time())
                    kills.append(f"{time.strftime('%H:%M:%S')} SIGKILL {child.name}")

        kill_task = asyncio.create_task(killer())
        print(f"load: {args.rate}/s for {args.minutes} min", flush=True)
        took = await load.run(stack.api_url, headers["Authorization"])
        kill_task.cancel()
        print(f"load done in {took:.0f} s; draining", flush=True)
        drain_began = time.perf_counter()
        while True:
            running = count(
                engine,
                f"SELECT COUNT(*) FROM journey_runs WHERE journey_slug = '{JOURNEY}'"
                " AND status = 'running'",
            )
            pending = count(
                engine,
                "SELECT COUNT(*) FROM segment_transitions WHERE dispatched_at IS NULL",
            )
            if (running == 0 and pending == 0) or time.perf_counter() - drain_began > 600:
                break
            await asyncio.sleep(1)
        drained = time.perf_counter() - drain_began
        while stub.stats()["webhook_pending"]:
            await asyncio.sleep(0.5)
        rss_end = rss_of(stack, stub)
        accepted = stub.stats()["accepted"]
        checked = sends_check(engine, accepted)
        stages = stage_times(engine)
        load_after = os.getloadavg()
    finally:
        supervisor.stop()
        stub.stop()
        if args.db == "postgres":
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()

    report(args, load, took, drained, floor, stages, checked, rss_start, rss_end, kills, kill_times)
    print("supervisor:", *supervisor.log, sep="\n  ")
    print(f"load after: {load_after}")


def report(
    args: argparse.Namespace,
    load: Load,
    took: float,
    drained: float,
    floor: dict[str, list[float]],
    stages: dict[str, dict[str, float]],
    checked: dict[str, int],
    rss_start: dict[str, tuple[int, float]],
    rss_end: dict[str, tuple[int, float]],
    kills: list[str],
    kill_times: list[float],
) -> None:
    print()
    print(
        f"soak: {args.minutes} min, {args.customers:,} customers, purchases at {args.rate}/s "
        f"({load.sent:,} sent in {took:.0f} s = {load.sent / took:.1f}/s), journeys with a "
        f"{args.pause} wait, {args.workers} workers, {args.db}, a worker SIGKILLed every "
        f"{args.kill_every:.0f} s ({len(kills)} kills); drained in {drained:.0f} s after the load"
    )
    print(f"answers {dict(load.statuses)}; lost connections, sent again {dict(load.errors)}")
    print()
    print("sends")
    for what, n in checked.items():
        print(f"  {what:32} {n:>8,}")
    print()
    print("ingest (POST /v1/events, one event a request)")
    print(f"  {'latency':32} {quantiles(load.latencies)}")
    print(f"  {'driver lag (sent late)':32} {quantiles(load.lags)}")
    print()
    print("purchase -> (cumulative, from the client's send of the customer's first big purchase)")

    def after_a_kill(sent: float) -> bool:
        return any(
            k - KILL_SHADOW_SECONDS / 2 <= sent <= k + KILL_SHADOW_SECONDS for k in kill_times
        )

    for stage in ("entry", "started", "first message"):
        delays = [
            stages[stage][customer] - sent
            for customer, sent in load.first_big.items()
            if customer in stages[stage]
        ]
        print(f"  {stage:32} {quantiles(delays)}")
    print(
        f"  the same, leaving out purchases from {KILL_SHADOW_SECONDS / 2:.0f} s before to "
        f"{KILL_SHADOW_SECONDS:.0f} s after each kill"
    )
    for stage in ("entry", "started", "first message"):
        delays = [
            stages[stage][customer] - sent
            for customer, sent in load.first_big.items()
            if customer in stages[stage] and not after_a_kill(sent)
        ]
        print(f"  {stage:32} {quantiles(delays)}")
    print("floor (same server, same stub, one at a time, before the load)")
    for what, values in floor.items():
        print(f"  bare {what:27} {quantiles(values)}")
    print()
    print(f"RSS (MiB)  {'start':>10} {'end':>10}")
    for name, (pid, rss) in rss_start.items():
        end_pid, end_rss = rss_end.get(name, (0, float("nan")))
        note = "" if end_pid == pid else f"  (restarted: pid {pid} -> {end_pid})"
        print(f"  {name:16} {rss:10.1f} {end_rss:10.1f}{note}")
    print()
    print("kills:", *kills, sep="\n  ")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=200, help="purchases per second")
    parser.add_argument("--kill-every", type=float, default=120, help="seconds between kills")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pause", default="PT5S", help="the journey's wait between emails")
    parser.add_argument("--floor-samples", type=int, default=200)
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    return parser.parse_args()


def main() -> None:
    asyncio.run(soak(parse_args()))
    sys.stdout.flush()
    # The SDK's threads can crash a finishing interpreter (docs/architecture.md).
    os._exit(0)


if __name__ == "__main__":
    main()
