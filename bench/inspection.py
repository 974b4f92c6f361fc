"""Inspection and analytics figures (issue 8). Run by hand, never under pytest:

    .venv/bin/python bench/inspection.py                        # 100,000 runs, PostgreSQL
    .venv/bin/python bench/inspection.py --runs 10000 --samples 200
    .venv/bin/python bench/inspection.py --db sqlite --runs 100000
    .venv/bin/python bench/inspection.py --reuse                # skip generation

It builds a store in its own PostgreSQL schema (`bench_inspect`, or a SQLite file under
/tmp) holding `--runs` runs of the shipped Champions journey (`--journeys` > 1 spreads
them over that many copies of it), two runs per customer, each with its entry transition,
about ten timeline lines written as the runtime and the messaging activity write them
(entered, sends, a few deferrals, the click decision, delays, the end), its messages and
their delivered / open / click events. Paths: 60% do not click and get the reminder, 25%
click, 5% are skipped as unsubscribed, 5% leave the segment while waiting, 5% still wait;
some convert. Then it measures, after VACUUM ANALYZE:

1. a customer's journeys with their timelines (`store.inspection.customer_journeys`, one
   pooled connection each), p50 / p99 over `--samples` random customers (goal p99 <= 50 ms);
2. the journey's analytics (`store.analytics.journey_analytics`): all versions, one
   version, a 30-day entry window, median and worst of `--repeats` (goal <= 500 ms);
3. both again through the HTTP API: the real app under uvicorn on a local port, a
   support key, `GET /v1/customers/{id}/journeys` and `GET /v1/journeys/{slug}/analytics`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file shares its name with the standard library's `inspect`, which nearly every
# package imports: keep this folder off the import path, put the project on it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from bench.stores import bench_store_from_args  # noqa: E402
from store.analytics import journey_analytics  # noqa: E402
from store.events import sqlite_time  # noqa: E402
from store.inspection import customer_journeys  # noqa: E402

SCHEMA = "bench_inspect"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent
CHAMPIONS = json.loads((ROOT / "templates" / "journeys" / "champions.json").read_text())
SEGMENT = CHAMPIONS["trigger"]["segment"]
SUBJECTS = {
    "welcome": "You're First in Line: Exclusive Preview Just for Our Top Shoppers!",
    "reminder": "Your preview is still waiting",
    "vip": "Your VIP Rewards",
    "recs": "Picked for you",
    "story": "Share Your Story",
}

RUN_COLUMNS = (
    "workflow_id, run_id, journey_slug, version, customer_id, status, step, step_since,"
    " waiting_for, waiting_until, entry_transition_id, entered_at, ended_at, converted_at"
)
LINE_COLUMNS = (
    "workflow_id, run_id, seq, journey_slug, version, customer_id, step, kind, reason,"
    " detail, occurred_at"
)
MESSAGE_COLUMNS = (
    "id, idempotency_key, workflow_id, run_id, step, journey_slug, version, customer_id,"
    ' channel, template, "to", subject, headers, links, status, provider, attempts,'
    " created_at, updated_at, sent_at"
)
EVENT_COLUMNS = "message_id, kind, detail, occurred_at, journey_slug, version, step"
TRANSITION_COLUMNS = (
    "id, segment_slug, customer_id, kind, source, context, occurred_at, dispatched_at"
)


# --- generation -----------------------------------------------------------------------------


class Rows:
    """The generated rows of every table, per run, streamed."""

    def __init__(self, *, runs: int, journeys: int, seed: int) -> None:
        self.runs = runs
        self.customers = max(1, runs // 2)
        self.slugs = [CHAMPIONS["slug"]] + [f"{CHAMPIONS['slug']}-{n}" for n in range(1, journeys)]
        self.rng = random.Random(seed)
        self.message_id = 0

    def customer(self, index: int) -> str:
        return f"c{index % self.customers:07d}"

    def generate(self) -> Iterator[tuple[str, tuple]]:
        for index in range(self.runs):
            yield from self._run(index)

    def _run(self, index: int) -> Iterator[tuple[str, tuple]]:
        rng = self.rng
        slug = self.slugs[index % len(self.slugs)]
        customer = self.customer(index)
        workflow_id = f"journey:{slug}:{customer}"
        run_id = f"r{index:09d}-{rng.getrandbits(48):012x}"
        entered = NOW - timedelta(days=rng.random() * 120, seconds=rng.randrange(86_400))
        transition_id = index + 1
        pass_id = 1 + int((NOW - entered).days // 7)
        r, f, m = 5, rng.choice((4, 5)), rng.choice((4, 5))
        yield (
            "segment_transitions",
            (
                transition_id,
                SEGMENT,
                customer,
                "entered",
                f"rfm-pass:{pass_id}",
                json.dumps(
                    {
                        "model": "default",
                        "pass_id": pass_id,
                        "r": r,
                        "f": f,
                        "m": m,
                        "label": "Champions",
                    }
                ),
                entered,
                entered,
            ),
        )
        seq = 0
        lines: list[tuple] = []

        def line(kind: str, step: str | None, reason: str, at: datetime, detail: dict) -> None:
            nonlocal seq
            lines.append(
                (
                    workflow_id,
                    run_id,
                    seq,
                    slug,
                    1,
                    customer,
                    step,
                    kind,
                    reason,
                    json.dumps(detail),
                    at,
                )
            )
            seq += 1

        messages: list[tuple] = []
        events: list[tuple] = []

        def send(
            step: str, at: datetime, *, skipped: bool = False, clicked: bool = False
        ) -> datetime:
            """Write the send's lines, message and events; return when it went out."""
            if not skipped and rng.random() < 0.1:
                line(
                    "deferred",
                    step,
                    "Waiting: quiet hours 21:00-08:00 in the customer's"
                    " time zone; sending after 08:00 UTC.",
                    at,
                    {"channel": "email"},
                )
                at += timedelta(hours=8)
            self.message_id += 1
            subject = SUBJECTS[step]
            status = "skipped" if skipped else ("delivered" if rng.random() < 0.7 else "sent")
            messages.append(
                (
                    self.message_id,
                    f"{workflow_id}:{run_id}:{step}",
                    workflow_id,
                    run_id,
                    step,
                    slug,
                    1,
                    customer,
                    "email",
                    f"champions/{step}.html",
                    f"{customer}@example.com",
                    None if skipped else subject,
                    "{}",
                    "[]",
                    status,
                    "outbox",
                    1,
                    at,
                    at,
                    None if skipped else at,
                )
            )
            if skipped:
                line(
                    "skipped",
                    step,
                    "Not sent: the customer unsubscribed from email on 2026-06-01 10:00 UTC.",
                    at,
                    {"channel": "email", "subject": None, "message_id": self.message_id},
                )
                return at
            line(
                "sent",
                step,
                f"Sent email “{subject}” to {customer[:1]}***@example.com via outbox.",
                at,
                {
                    "channel": "email",
                    "subject": subject,
                    "message_id": self.message_id,
                    "template": f"champions/{step}.html",
                },
            )

            def event(kind: str, when: datetime) -> None:
                # As record_message_event writes it: with the message's journey and step.
                events.append((self.message_id, kind, "{}", when, slug, 1, step))

            if status == "delivered" or rng.random() < 0.5:
                event("delivered", at + timedelta(seconds=5))
            if clicked or rng.random() < 0.35:
                event("open", at + timedelta(hours=2))
            if clicked:
                event("click", at + timedelta(hours=3))
            return at

        line(
            "entered",
            None,
            f"segment transition {transition_id}: entered {SEGMENT}"
            f" (RFM pass {pass_id}, R{r} F{f} M{m})",
            entered,
            {},
        )
        path = rng.random()
        t = entered
        status, step, ended, converted, waiting = "completed", None, None, None, None
        if path < 0.05:  # still waiting for the click
            t = send("welcome", t)
            status, step, waiting = (
                "running",
                "wait_click",
                ("click on welcome", t + timedelta(days=3)),
            )
        elif path < 0.10:  # left the segment while waiting
            t = send("welcome", t)
            t += timedelta(days=1)
            line(
                "exited", "wait_click", f"segment transition {transition_id}: left {SEGMENT}", t, {}
            )
            status, step, ended = "exited", "wait_click", t
        else:
            skipped = path < 0.15
            clicker = not skipped and path < 0.40
            t = send("welcome", t, skipped=skipped, clicked=clicker)
            if clicker:
                t += timedelta(hours=rng.randrange(1, 48))
                line(
                    "event_received",
                    "wait_click",
                    "click signal on welcome after 1 day",
                    t,
                    {"event": "email_clicked", "occurred_at": t.isoformat()},
                )
            else:
                t += timedelta(days=3)
                line(
                    "timer_fired",
                    "wait_click",
                    "timer fired after 3 days: no click on welcome",
                    t,
                    {},
                )
                t = send("reminder", t, skipped=skipped)
            t = send("vip", t, skipped=skipped)
            if not skipped and rng.random() < 0.2:
                converted = t + timedelta(days=rng.random() * 2)
                line(
                    "goal_reached",
                    "pause",
                    f"goal event Purchase at {converted.isoformat()}",
                    converted,
                    {},
                )
                status, step, ended = "converted", "pause", converted
            else:
                t += timedelta(days=2)
                line("timer_fired", "pause", "delay of 2 days over", t, {})
                t = send("recs", t, skipped=skipped)
                t += timedelta(days=7)
                line("timer_fired", "story_pause", "delay of 7 days over", t, {})
                t = send("story", t, skipped=skipped)
                line("completed", "story", "reached the end of the journey", t, {})
                step, ended = "story", t
        yield (
            "journey_runs",
            (
                workflow_id,
                run_id,
                slug,
                1,
                customer,
                status,
                step,
                t,
                waiting[0] if waiting else None,
                waiting[1] if waiting else None,
                transition_id,
                entered,
                ended,
                converted,
            ),
        )
        for row in lines:
            yield "run_events", row
        for row in messages:
            yield "messages", row
        for row in events:
            yield "message_events", row


COLUMNS = {
    "journey_runs": RUN_COLUMNS,
    "run_events": LINE_COLUMNS,
    "messages": MESSAGE_COLUMNS,
    "message_events": EVENT_COLUMNS,
    "segment_transitions": TRANSITION_COLUMNS,
}


def load(engine: Engine, rows: Rows) -> dict[str, int]:
    """Write the definitions, then every generated row (COPY / executemany)."""
    counts = dict.fromkeys(COLUMNS, 0)
    with engine.begin() as conn:
        stamp = NOW if engine.dialect.name == "postgresql" else sqlite_time(NOW)
        conn.execute(
            text(
                "INSERT INTO segments (slug, name, kind, model_slug, version, created_at,"
                " updated_at) VALUES (:s, 'Champions', 'rfm', 'default', 1, :t, :t)"
            ),
            {"s": SEGMENT, "t": stamp},
        )
        for slug in rows.slugs:
            definition = json.dumps({**CHAMPIONS, "slug": slug})
            conn.execute(
                text(
                    "INSERT INTO journeys (slug, name, state, latest_version, active_version,"
                    " trigger_segment, created_at, updated_at) VALUES (:s, :n, 'active', 1,"
                    " 1, :seg, :t, :t)"
                ),
                {"s": slug, "n": CHAMPIONS["name"], "seg": SEGMENT, "t": stamp},
            )
            conn.execute(
                text(
                    "INSERT INTO journey_versions (journey_slug, version, definition,"
                    " created_at, activated_at) VALUES (:s, 1, :d, :t, :t)"
                ),
                {"s": slug, "d": definition, "t": stamp},
            )
    if engine.dialect.name == "postgresql":
        _copy_postgres(engine, rows, counts)
    else:
        _insert_sqlite(engine, rows, counts)
    return counts


def _copy_postgres(engine: Engine, rows: Rows, counts: dict[str, int]) -> None:
    raw = engine.raw_connection()
    try:
        buffers: dict[str, list[tuple]] = {name: [] for name in COLUMNS}

        def flush(name: str) -> None:
            with (
                raw.cursor() as cursor,
                cursor.copy(f"COPY {name} ({COLUMNS[name]}) FROM STDIN") as copy,
            ):
                for row in buffers[name]:
                    copy.write_row(row)
            buffers[name].clear()

        for name, row in rows.generate():
            buffers[name].append(row)
            counts[name] += 1
            if len(buffers[name]) >= 50_000:
                flush(name)
        for name in COLUMNS:
            flush(name)
        raw.commit()
    finally:
        raw.close()


def _insert_sqlite(engine: Engine, rows: Rows, counts: dict[str, int]) -> None:
    raw = engine.raw_connection()
    try:
        buffers: dict[str, list[tuple]] = {name: [] for name in COLUMNS}

        def flush(name: str) -> None:
            width = len(COLUMNS[name].split(","))
            marks = ", ".join("?" * width)
            cursor = raw.cursor()
            cursor.executemany(
                f"INSERT INTO {name} ({COLUMNS[name]}) VALUES ({marks})",
                [
                    tuple(sqlite_time(v) if isinstance(v, datetime) else v for v in row)
                    for row in buffers[name]
                ],
            )
            buffers[name].clear()

        for name, row in rows.generate():
            buffers[name].append(row)
            counts[name] += 1
            if len(buffers[name]) >= 50_000:
                flush(name)
        for name in COLUMNS:
            flush(name)
        raw.commit()
    finally:
        raw.close()


def settle(engine: Engine) -> None:
    """What autovacuum does to a settled store: statistics, and on PostgreSQL the
    visibility map that lets the analytics' counts come from index-only scans (it is only
    set once no older transaction is open: other benchmarks running hold it back)."""
    raw = engine.raw_connection()
    try:
        if engine.dialect.name == "postgresql":
            raw.driver_connection.autocommit = True
            with raw.cursor() as cursor:
                cursor.execute(f"VACUUM ANALYZE {', '.join(COLUMNS)}")
                cursor.execute(
                    "SELECT relname, relallvisible::float / greatest(relpages, 1)"
                    " FROM pg_class WHERE oid = ANY(%s::regclass[])",
                    (list(COLUMNS),),
                )
                visible = ", ".join(f"{name} {share:.0%}" for name, share in cursor.fetchall())
            print(f"settled: all-visible pages {visible}")
        else:
            raw.cursor().execute("ANALYZE")
            raw.commit()
    finally:
        raw.close()


# --- measuring ------------------------------------------------------------------------------


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  max {ordered[-1]:7.2f} ms  (n={len(ordered)})"


def spread(samples: list[float]) -> str:
    return f"median {statistics.median(samples):7.1f} ms  worst {max(samples):7.1f} ms"


def measure_store(engine: Engine, rows: Rows, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed + 1)
    customers = [rows.customer(rng.randrange(rows.customers)) for _ in range(args.samples)]
    slug = rows.slugs[0]
    lines = 0

    def inspect(customer: str) -> None:
        nonlocal lines
        with engine.connect() as conn:
            found = customer_journeys(
                conn, customer_id=customer, ui_base="http://ui", namespace="default"
            )
        lines += sum(len(run.timeline) for run in found)

    for customer in customers[:20]:
        inspect(customer)  # warm the pool and the caches
    lines = 0
    samples = [timed(lambda c=customer: inspect(c)) for customer in customers]
    print(
        f"store  customer journeys + timeline   {percentiles(samples)}"
        f"  ({lines / len(customers):.1f} timeline lines per customer)"
    )

    def analytics(**kwargs: Any) -> None:
        with engine.connect() as conn:
            journey_analytics(conn, journey_slug=slug, **kwargs)

    window = {"entered_from": NOW - timedelta(days=30), "entered_to": NOW}
    for label, kwargs in (
        ("all versions", {}),
        ("version 1", {"version": 1}),
        ("30-day window", window),
    ):
        analytics(**kwargs)
        samples = [timed(lambda k=kwargs: analytics(**k)) for _ in range(args.repeats)]
        print(f"store  analytics {label:<18} {spread(samples)}")


def measure_http(engine: Engine, rows: Rows, args: argparse.Namespace) -> None:
    import httpx
    import uvicorn
    from sqlmodel import Session

    from api.app import create_app
    from core.settings import Settings
    from store.keys import create_key

    settings = Settings(
        environment="bench", temporal_address="127.0.0.1:1", secret_key="bench-secret"
    )
    app = create_app(settings, engine)
    with Session(engine) as session:
        _, secret = create_key(session, role="support", name="bench-support")
        session.commit()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        rng = random.Random(args.seed + 2)
        headers = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", headers=headers) as http:

            def get(path: str) -> None:
                response = http.get(path)
                if response.status_code != 200:
                    raise SystemExit(f"{path}: {response.status_code} {response.text[:200]}")

            customers = [rows.customer(rng.randrange(rows.customers)) for _ in range(args.samples)]
            for customer in customers[:20]:
                get(f"/v1/customers/{customer}/journeys")
            samples = [
                timed(lambda c=customer: get(f"/v1/customers/{c}/journeys"))
                for customer in customers
            ]
            print(f"http   GET /v1/customers/{{id}}/journeys {percentiles(samples)}")
            path = f"/v1/journeys/{rows.slugs[0]}/analytics"
            get(path)
            samples = [timed(lambda: get(path)) for _ in range(args.repeats)]
            print(f"http   GET {path:<30} {spread(samples)}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--sqlite-path", default="/tmp/bench_inspect.db")
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument(
        "--journeys",
        type=int,
        default=1,
        help="spread the runs over this many journeys (1: the worst case)",
    )
    parser.add_argument("--samples", type=int, default=500, help="customers inspected")
    parser.add_argument("--repeats", type=int, default=7, help="analytics calls per variant")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--reuse", action="store_true", help="keep the data of a former run")
    parser.add_argument("--no-http", action="store_true")
    args = parser.parse_args()

    engine = bench_store_from_args(args, schema=SCHEMA)
    rows = Rows(runs=args.runs, journeys=args.journeys, seed=args.seed)
    print(
        f"{args.db}: {args.runs:,} runs over {len(rows.slugs)} journey(s),"
        f" {rows.customers:,} customers"
    )
    if not args.reuse:
        started = time.perf_counter()
        counts = load(engine, rows)
        print(
            f"loaded in {time.perf_counter() - started:.1f} s: "
            + ", ".join(f"{name} {count:,}" for name, count in counts.items())
            + f" ({counts['run_events'] / max(1, counts['journey_runs']):.1f} lines per run)"
        )
    settle(engine)
    measure_store(engine, rows, args)
    if not args.no_http:
        measure_http(engine, rows, args)


if __name__ == "__main__":
    main()
