"""Personalisation figures of issue 15, each printed beside a ceiling measured in the same
run.

Run by hand from the repository root (never by pytest):

    .venv/bin/python bench/personalize.py                          # 30 s per wrk run
    .venv/bin/python bench/personalize.py --wrk-seconds 10 --no-sqlite   # a quick look

For SQLite and for a fresh PostgreSQL database:

1. A store with 100,000 customers (half with a first name), the seed's five RFM label
   segments holding five sixths of them (a sixth is in none), and the seed's campaign
   (templates/personalizations/homepage.json) installed and active, 10% control.
2. `wrk` with 50 connections GETting `/v1/personalizations/rfm-homepage/decide` with a
   random customer id and a `web` key, against `journeys api --workers W`; and the same
   load on `GET /row?customer_id=` of bench/bare_app.py (a bare FastAPI handler reading
   that customer's row) served by uvicorn with W workers. Both servers run at once and
   are measured in turns (bare, product, bare, product, ...; `--rounds`), each run
   warmed first, so that the machine's other load falls on both alike; the table shows
   the medians. Decisions/s, p50 and p99 of each, and the CPU the API and database used
   per request.
3. Views: every decision answered 200 must be stored as a view. The views stored are
   counted once they settle (the writer flushes every half second) and again after the
   API has shut down (its writer stores what waits): stored minus answered is the
   requests still in flight when wrk stopped (at most the connections), never negative.
4. Analytics at full size, on a server of its own once the decisions' views are counted:
   every customer is given a view (the experience their memberships and control bucket
   give), a fifth a Purchase after it and everyone two events of other names; then
   `GET .../analytics` is timed three times beside the time to count the rows it reads
   (the version's view rows and every Purchase), and its viewers and conversions are
   checked against what was written. The issue sets no target: it must not be quadratic
   (a plan that was took minutes at 100,000 viewers on SQLite).
5. A final table: figure, product, ceiling, ratio, target, met?

Targets: >= 3,000 decisions/s at p99 <= 20 ms, and >= 80% of the bare handler's rate.

Workers: one by default, for both servers. On a 2-core machine the load generator, the
database server and the API's view writer need CPU beside the API: one API process
decides about 8,000 times a second (measured: 110 us of CPU a decision), over twice the
target, and leaves them the other core; a second process contends with them for it, and
the operating system's time slicing between more runnable processes than cores is what
lengthens the p99. With more cores, give the API one process per core left over.
"""
# ruff: noqa: E402  (the path fix below must run before the imports)

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse
import json
import random
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text
from sqlmodel import Session

from bench.ingest import (
    BENCH_DIR,
    CpuMeter,
    CpuUse,
    PostgresStore,
    Report,
    Row,
    Server,
    SqliteStore,
    Store,
    say,
    start_bare,
    start_product,
)

CAMPAIGN = "rfm-homepage"
LABELS = ("champions", "regulars", "promising", "needs-attention", "at-risk")
FIRST_NAMES = ("Ann", "Bo", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana")
TARGET_RPS = 3_000.0
TARGET_P99_MS = 20.0
TARGET_RATIO = 0.8


# --- the store -----------------------------------------------------------------------------


def populate(store: Store, customers: int, seed: int = 15) -> tuple[str, str]:
    """Customers, label memberships, the seed's campaign (active); returns a web key and
    a support key (analytics)."""
    from core.db import make_engine
    from core.rfm import RfmModelCreate
    from core.tables import Customer, SegmentMembership
    from store.keys import create_key
    from store.personalization import install_shipped_campaigns
    from store.rfm_models import create_model

    rng = random.Random(seed)
    now = datetime.now(UTC)
    engine = make_engine(store.product_url)
    try:
        with engine.begin() as conn:
            create_model(
                conn,
                model=RfmModelCreate(
                    slug="default",
                    name="Lifecycle RFM",
                    recency_event="Purchase",
                    frequency_event="Purchase",
                    monetary_event="Purchase",
                    monetary_property="total_price",
                    timeframe="P90D",
                    segment_map="seed5",
                ),
                now=now,
            )
        rows, members = [], []
        for i in range(customers):
            attributes: dict[str, Any] = {"total_spent": rng.randrange(0, 2_000)}
            if i % 2 == 0:
                attributes["first_name"] = rng.choice(FIRST_NAMES)
            rows.append(
                {
                    "id": f"c-{i}",
                    "email": f"c{i}@example.com",
                    "attributes": attributes,
                    "created_at": now,
                    "updated_at": now,
                    "realtime_pending": False,
                }
            )
            label = i % 6
            if label < len(LABELS):
                members.append(
                    {
                        "segment_slug": f"default:{LABELS[label]}",
                        "customer_id": f"c-{i}",
                        "since": now,
                    }
                )
        with engine.begin() as conn:
            for start in range(0, len(rows), 10_000):
                conn.execute(insert(Customer.__table__), rows[start : start + 10_000])
            for start in range(0, len(members), 10_000):
                conn.execute(insert(SegmentMembership.__table__), members[start : start + 10_000])
            install_shipped_campaigns(conn, activate=True)
        with Session(engine) as session:
            _, secret = create_key(session, role="web", name="bench storefront")
            _, support = create_key(session, role="support", name="bench analytics")
            session.commit()
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("ANALYZE"))
            else:
                conn.execute(text("ANALYZE"))
        return secret, support
    finally:
        engine.dispose()


def count_views(store: Store) -> int:
    from core.db import make_engine
    from store.personalization import count_views as stored_views

    engine = make_engine(store.product_url)
    try:
        with engine.connect() as conn:
            return stored_views(conn, slug=CAMPAIGN)
    finally:
        engine.dispose()


def settled_views(store: Store) -> int:
    """The views stored once the writers have flushed what they held (stable for 1.5 s)."""
    last, stable_since = count_views(store), time.monotonic()
    while time.monotonic() - stable_since < 1.5:
        time.sleep(0.25)
        now = count_views(store)
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


# --- analytics -------------------------------------------------------------------------------


def add_every_viewer(store: Store, customers: int, seed: int = 16) -> tuple[int, int]:
    """A view of the active version for every customer (the experience populate's
    memberships and the control buckets give; merged into the rows the decisions wrote,
    whose earlier first views stay first), a Purchase after it for a fifth of them and
    two events of other names each. Returns (viewers, purchases)."""
    from core.db import make_engine
    from core.personalization import CONTROL, DEFAULT, bucket_of
    from core.tables import Event
    from store.personalization import ViewRecord, load_live_campaign, record_views

    rng = random.Random(seed)
    engine = make_engine(store.product_url)
    try:
        with engine.connect() as conn:
            live = load_live_campaign(conn, slug=CAMPAIGN)
        names = {e.segment: e.name for e in live.definition.experiences}
        viewed = datetime.now(UTC) - timedelta(minutes=30)
        bought = datetime.now(UTC) - timedelta(seconds=1)
        views, events = [], []
        purchases = 0
        for i in range(customers):
            customer = f"c-{i}"
            label = i % 6
            audience = names[f"default:{LABELS[label]}"] if label < len(LABELS) else None
            bucket = bucket_of(CAMPAIGN, customer)
            experience = audience or DEFAULT
            if audience is not None and bucket < live.threshold:
                experience = CONTROL
            views.append(
                ViewRecord(CAMPAIGN, live.version, customer, experience, audience, bucket, viewed)
            )
            kinds = ["Viewed Product", "Added to Cart"]
            if rng.random() < 0.2:
                kinds.append("Purchase")
                purchases += 1
            for n, name in enumerate(kinds):
                events.append(
                    {
                        "event_id": f"bench-{customer}-{n}",
                        "customer_id": customer,
                        "name": name,
                        "occurred_at": bought - timedelta(seconds=rng.random() * 600),
                        "properties": {"total_price": rng.randrange(5, 500)},
                        "received_at": bought,
                        "realtime_pending": False,
                    }
                )
        with engine.begin() as conn:
            for start in range(0, len(views), 20_000):
                record_views(conn, views=views[start : start + 20_000])
            for start in range(0, len(events), 20_000):
                conn.execute(insert(Event.__table__), events[start : start + 20_000])
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
        return customers, purchases
    finally:
        engine.dispose()


def read_everything_once(store: Store) -> float:
    """Seconds to count the rows analytics read (the version's view rows, every
    Purchase): the ceiling of the analytics figure."""
    from core.db import make_engine

    engine = make_engine(store.product_url)
    try:
        with engine.connect() as conn:
            started = time.perf_counter()
            conn.execute(
                text(
                    "SELECT COUNT(DISTINCT customer_id), SUM(views) FROM personalization_views"
                    " WHERE campaign_slug = :slug"
                ),
                {"slug": CAMPAIGN},
            ).one()
            conn.execute(
                text(
                    "SELECT COUNT(*), SUM(LENGTH(customer_id)) FROM events WHERE name = 'Purchase'"
                )
            ).one()
            return time.perf_counter() - started
    finally:
        engine.dispose()


def time_analytics(server: Server, support: str) -> tuple[float, dict[str, Any]]:
    """Seconds `GET .../analytics` took, and its answer."""
    import httpx

    started = time.perf_counter()
    response = httpx.get(
        f"{server.base_url}/v1/personalizations/{CAMPAIGN}/analytics",
        headers={"Authorization": f"Bearer {support}"},
        timeout=1_800,
    )
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.json()


def bench_analytics(
    store: Store, server: Server, support: str, args: argparse.Namespace, report: Report, label: str
) -> None:
    viewers, purchases = add_every_viewer(store, args.customers)
    say(f"{label}: every customer viewed, {purchases:,} purchases; timing analytics")
    runs, ceilings = [], []
    answer: dict[str, Any] = {}
    for _ in range(3):
        ceilings.append(read_everything_once(store))
        elapsed, answer = time_analytics(server, support)
        runs.append(elapsed)
    seen = sum(e["viewers"] + e["control"]["viewers"] for e in answer["experiences"])
    seen += answer["default"]["viewers"]
    converted = sum(e["conversions"] + e["control"]["conversions"] for e in answer["experiences"])
    converted += answer["default"]["conversions"]
    say(
        f"{label}: analytics {', '.join(f'{r:.2f}' for r in runs)} s; counting the rows"
        f" {', '.join(f'{c:.2f}' for c in ceilings)} s; viewers {seen:,}, conversions"
        f" {converted:,}"
    )
    report.add(
        Row(
            f"analytics {label}, {viewers:,} viewers (median of 3)",
            _median(runs) * 1000,
            _median(ceilings) * 1000,
            "counting the rows it reads",
            None,
            lower_is_better=True,
            unit="ms",
        )
    )
    ok = seen == viewers and converted == purchases
    report.checks.append(
        f"{'ok' if ok else 'WRONG COUNT'}: {label}: analytics counted {seen:,} viewers"
        f" ({viewers:,} customers viewed) and {converted:,} conversions ({purchases:,}"
        " customers bought once after their first view)"
    )


# --- load ------------------------------------------------------------------------------------


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    ok: int
    other: int
    errors: int
    cpu: CpuUse


def wrk(url: str, *, auth: str, seconds: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        "wrk",
        f"-t{args.wrk_threads}",
        f"-c{args.wrk_connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(BENCH_DIR / "decide.lua"),
        url,
    ]
    env = {**os.environ, "BENCH_AUTH": auth, "BENCH_CUSTOMERS": str(args.customers)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")


def load(
    server: Server,
    store: Store,
    path: str,
    auth: str,
    args: argparse.Namespace,
    *,
    after_warming: Any = None,
) -> Run:
    url = server.base_url + path
    wrk(url, auth=auth, seconds=3, args=args)  # warm connections, caches, pools
    if after_warming is not None:
        after_warming()
    with CpuMeter(server, store).measure() as cpu:
        raw = wrk(url, auth=auth, seconds=args.wrk_seconds, args=args)
    return Run(
        rps=raw["requests"] / (raw["duration_us"] / 1e6),
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        requests=raw["requests"],
        ok=raw["ok"],
        other=raw["other"],
        errors=raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
        cpu=cpu[0],
    )


def _cpu(run: Run) -> str:
    per = 1e6 / max(run.requests, 1)
    return (
        f"{(run.cpu.api + run.cpu.database) * per:.0f} (api {run.cpu.api * per:.0f},"
        f" database {run.cpu.database * per:.0f}, wrk {run.cpu.client * per:.0f})"
    )


def _sample_decisions(server: Server, auth: str) -> str:
    import httpx

    seen: dict[str, int] = {}
    for i in range(0, 600):
        answer = httpx.get(
            f"{server.base_url}/v1/personalizations/{CAMPAIGN}/decide",
            params={"customer_id": f"c-{i}"},
            headers={"Authorization": auth},
        ).json()
        seen[answer["experience"]] = seen.get(answer["experience"], 0) + 1
    return ", ".join(f"{name} {count}" for name, count in sorted(seen.items()))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def _line(name: str, run: Run) -> str:
    return (
        f"{name}: {run.rps:,.0f} req/s, p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms;"
        f" 200 {run.ok:,}, other {run.other:,}, socket errors/timeouts {run.errors};"
        f" cpu us/request {_cpu(run)}"
    )


def bench_store(store: Store, args: argparse.Namespace, workdir: Path, report: Report) -> None:
    workers = args.workers
    say(f"{store.kind}: loading {args.customers:,} customers and the seed's campaign")
    secret, support = populate(store, args.customers)
    auth = f"Bearer {secret}"
    label = f"{store.kind}, {workers} worker{'s' if workers > 1 else ''}"
    decide = f"/v1/personalizations/{CAMPAIGN}/decide"

    # Both servers up at once, measured in turns: the machine's other load moves every
    # figure, and turns expose the two to the same moments. Each turn is warmed first.
    bare_server = start_bare(store, workers, workdir)
    product_server = start_product(store, workers, workdir)
    bare_runs: list[Run] = []
    product_runs: list[Run] = []
    before = count_views(store)
    in_flight: list[int] = []
    views_measured = 0
    try:
        say(
            f"{label}: decisions of the first 600 customers: {_sample_decisions(product_server, auth)}"
        )
        for turn in range(1, args.rounds + 1):
            bare = load(bare_server, store, "/row", "", args)
            bare_runs.append(bare)
            say(f"{label} turn {turn}: {_line('bare row handler', bare)}")
            counted: list[int] = []
            product = load(
                product_server,
                store,
                decide,
                auth,
                args,
                # The warm-up's views are stored too: count what the measured run adds.
                after_warming=lambda counted=counted: counted.append(settled_views(store)),
            )
            added = settled_views(store) - counted[0]
            product_runs.append(product)
            views_measured += added
            in_flight.append(added - product.ok)
            say(
                f"{label} turn {turn}: {_line('product decisions', product)};"
                f" views stored {added:,}"
            )
        settled = settled_views(store)
    finally:
        product_server.stop()
        bare_server.stop()
    after_stop = count_views(store)

    def med(runs: list[Run], attribute: str) -> float:
        return _median([getattr(run, attribute) for run in runs])

    def cpu(runs: list[Run]) -> str:
        used = sum(r.cpu.api + r.cpu.database for r in runs)
        return f"{used / max(sum(r.requests for r in runs), 1) * 1e6:.0f}"

    rps, bare_rps = med(product_runs, "rps"), med(bare_runs, "rps")
    report.add(
        Row(
            f"decisions {label} (median of {args.rounds})",
            rps,
            bare_rps,
            "bare FastAPI handler reading one row",
            TARGET_RPS,
            cpu=f"{cpu(product_runs)} / {cpu(bare_runs)}",
        )
    )
    report.add(
        Row(
            f"decisions {label} p99 (median)",
            med(product_runs, "p99_ms"),
            med(bare_runs, "p99_ms"),
            "bare row handler",
            TARGET_P99_MS,
            lower_is_better=True,
            unit="ms",
        )
    )
    ratio = rps / bare_rps if bare_rps else 0.0
    verdict = "ok" if ratio >= TARGET_RATIO else "NOT MET"
    turns = ", ".join(
        f"{p.rps / b.rps:.0%}" for p, b in zip(product_runs, bare_runs, strict=True) if b.rps
    )
    report.checks.append(
        f"{verdict}: {label}: decisions at {ratio:.0%} of the bare row handler's rate"
        f" (medians; turn by turn {turns}; target >= {TARGET_RATIO:.0%})"
    )
    answered = sum(run.ok for run in product_runs)
    others = sum(run.other for run in product_runs)
    views_ok = others == 0 and all(0 <= n <= args.wrk_connections for n in in_flight)
    report.checks.append(
        f"{'ok' if views_ok else 'LOST VIEWS'}: {label}: views stored during the measured"
        f" runs {views_measured:,}, decisions answered 200 {answered:,} (other statuses"
        f" {others}); stored - answered per run {in_flight} (requests in flight when wrk"
        f" stopped, at most {args.wrk_connections}); all views {after_stop - before:,} after"
        f" the API stopped, {settled - before:,} before it stopped"
    )
    if args.analytics:
        # Its own server, once the decisions' views are counted: it adds views.
        analytics_server = start_product(store, workers, workdir)
        try:
            bench_analytics(store, analytics_server, support, args, report, store.kind)
        finally:
            analytics_server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Personalisation decisions of issue 15 with wrk, beside a bare FastAPI handler"
            " reading one row, measured in the same run; views counted. Run with the"
            " project's .venv/bin/python; starts and stops its own servers and databases."
        )
    )
    parser.add_argument("--customers", type=int, default=100_000, help="customers (100,000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes, and the bare app's (1: see the module's docstring)",
    )
    parser.add_argument("--wrk-seconds", type=int, default=30, help="wrk duration per run (30)")
    parser.add_argument("--wrk-connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="turns of bare then product per store (3)"
    )
    parser.add_argument(
        "--no-analytics",
        dest="analytics",
        action="store_false",
        help="skip timing analytics with every customer a viewer",
    )
    parser.add_argument("--no-sqlite", dest="sqlite", action="store_false", help="skip SQLite")
    parser.add_argument(
        "--no-postgres", dest="postgres", action="store_false", help="skip PostgreSQL"
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a database on the server where the bench database is created (BENCH_POSTGRES_URL)",
    )
    parser.add_argument(
        "--database", default="journeys_bench_personalize", help="PostgreSQL database to use"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    say(
        f"{args.customers:,} customers, the seed's five experiences, {args.workers} workers,"
        f" wrk {args.wrk_connections} connections x {args.wrk_seconds} s, {os.cpu_count()} cores"
    )
    report = Report()
    with tempfile.TemporaryDirectory(prefix="journeys-bench-") as tmp:
        workdir = Path(tmp)
        if args.sqlite:
            bench_store(SqliteStore(workdir), args, workdir, report)
        if args.postgres:
            store = PostgresStore(args.postgres_url, args.database)
            store.create()
            try:
                bench_store(store, args, workdir, report)
            finally:
                store.close()
    print()
    report.print()


if __name__ == "__main__":
    main()
