"""Segment evaluation figures (issue 5). Run by hand, never under pytest:

    .venv/bin/python bench/segments.py                     # 1,000,000 customers / 10,000,000 events, PostgreSQL
    .venv/bin/python bench/segments.py --customers 20000 --events 200000
    .venv/bin/python bench/segments.py --db sqlite --customers 20000 --events 200000

It builds a store in its own PostgreSQL schema (`bench_segments`, or a SQLite file under
/tmp), loads customers and events with COPY (executemany on SQLite), and measures:

1. the product: `evaluate_segment` of
   `(Purchase count within 30d >= 2 and plan = pro) or (segment bench:loyal and last seen > 30d)`
   from empty memberships (every member is an entry), beside
2. a hand-written query for the same segment plus a bare membership diff written by hand
   (same staging, transitions and memberships), in the same run, alternating, each in a
   transaction rolled back afterwards, so both start from the same state;
3. real-time re-evaluation of single customers (`reevaluate_customers`, committed), p50/p99;
4. with --save-to-ready: from `POST /v1/segments?wait=true` of the same condition to the
   answer saying `ready` (API and worker in this process, a Temporal dev server beside
   it: the save's workflow runs the full evaluation), beside the hand-written query plus
   bare diff timed in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection, Engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stores import bench_store_from_args  # noqa: E402
from core.tables import UTCDateTime  # noqa: E402
from store import segments as segment_store  # noqa: E402
from store.events import sqlite_time  # noqa: E402

SCHEMA = "bench_segments"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
LOYAL = "bench:loyal"
SEGMENT = "bench-mixed"
CONDITION = {
    "any": [
        {
            "all": [
                {"event": "Purchase", "count": {"gte": 2}, "within": "P30D"},
                {"attribute": "plan", "op": "eq", "value": "pro"},
            ]
        },
        {"all": [{"segment": LOYAL}, {"event": "*", "last": {"more_than": "P30D"}}]},
    ]
}
OTHER_SEGMENTS = {
    "bench-engaged": {"attribute": "engagement_score", "op": "gte", "value": 70},
    "bench-recent-buyers": {"event": "Purchase", "last": {"less_than": "P7D"}},
}


def pg_time(value: datetime) -> str:
    return value.isoformat()


def generate(engine: Engine, *, customers: int, events: int, seed: int) -> None:
    """Stream generated rows into the store (nothing held in memory)."""
    rng = random.Random(seed)
    pg = engine.dialect.name == "postgresql"
    stamp = pg_time if pg else sqlite_time

    def customer_rows() -> Iterator[tuple]:
        for n in range(customers):
            attributes = {
                "plan": "pro" if rng.random() < 0.4 else "free",
                "engagement_score": rng.randrange(100),
                "total_spent": round(rng.random() * 1000, 2),
            }
            created = stamp(NOW - timedelta(days=rng.random() * 400))
            yield (f"c{n:08d}", json.dumps(attributes), created, created)

    def event_rows() -> Iterator[tuple]:
        names = ("Purchase", "Visit", "Visit", "email_clicked")
        for n in range(events):
            # Skewed activity: a few customers make many events, as in a real shop.
            who = (
                int(customers * (rng.random() ** 2))
                if rng.random() < 0.7
                else rng.randrange(customers)
            )
            name = names[rng.randrange(4)]
            props = (
                json.dumps({"total_price": round(rng.random() * 200, 2)})
                if name == "Purchase"
                else "{}"
            )
            at = stamp(NOW - timedelta(days=rng.random() * 120))
            yield (f"e{n:09d}", f"c{who:08d}", name, at, props, at, False)

    def loyal_rows() -> Iterator[tuple]:
        for n in range(customers):
            if rng.random() < 0.25:
                yield (LOYAL, f"c{n:08d}", stamp(NOW))

    started = time.monotonic()
    tables = [
        ("customers (id, attributes, created_at, updated_at)", customer_rows()),
        (
            "events (event_id, customer_id, name, occurred_at, properties, received_at, realtime_pending)",
            event_rows(),
        ),
        ("segment_memberships (segment_slug, customer_id, since)", loyal_rows()),
    ]
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for target, rows in tables:
            if pg:
                with cur.copy(f"COPY {target} FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            else:
                width = target.count(",") + 1
                insert = f"INSERT INTO {target} VALUES ({', '.join('?' * width)})"
                while chunk := list(itertools.islice(rows, 100_000)):
                    cur.executemany(insert, chunk)
            print(
                f"  loaded {target.split(' ')[0]} ({time.monotonic() - started:.0f}s)", flush=True
            )
        raw.commit()
        # Vacuum too on PostgreSQL: a live table has its visibility map set, which the
        # index-only scans of both queries rely on.
        if pg:
            raw.driver_connection.autocommit = True  # VACUUM runs outside a transaction
            try:
                cur.execute("VACUUM ANALYZE")
            finally:
                raw.driver_connection.autocommit = False  # the pool hands this one out again
        else:
            cur.execute("ANALYZE")
            raw.commit()
    finally:
        raw.close()
    print(
        f"loaded {customers:,} customers / {events:,} events in {time.monotonic() - started:.1f}s",
        flush=True,
    )


def define_segments(engine: Engine) -> None:
    with engine.begin() as conn:
        existing = {s.slug for s in segment_store.list_segments(conn)}
        if LOYAL not in existing:
            conn.execute(
                text(
                    "INSERT INTO segments (slug, name, kind, model_slug, version, created_at, updated_at)"
                    " VALUES (:slug, 'Loyal', 'rfm', 'bench', 1, :now, :now)"
                ).bindparams(bindparam("now", type_=UTCDateTime())),
                {"slug": LOYAL, "now": NOW},
            )
        for slug, condition in {SEGMENT: CONDITION, **OTHER_SEGMENTS}.items():
            if slug not in existing:
                segment_store.create_segment(
                    conn, slug=slug, name=slug, kind="rule", condition=condition, now=NOW
                )
            # A reused store starts like a new one: empty rule segments, every member an entry.
            conn.execute(
                text("DELETE FROM segment_memberships WHERE segment_slug = :s"), {"s": slug}
            )


def hand_written_sql(pg: bool) -> str:
    plan = (
        "c.attributes ->> 'plan' = 'pro'" if pg else "json_extract(c.attributes, '$.plan') = 'pro'"
    )
    return (
        "WITH buyers AS (SELECT customer_id FROM events WHERE name = 'Purchase'"
        "   AND occurred_at > :cut AND occurred_at <= :now GROUP BY customer_id HAVING COUNT(*) >= 2),"
        " seen AS (SELECT customer_id, MAX(occurred_at) AS last_at FROM events"
        "   WHERE occurred_at <= :now GROUP BY customer_id)"
        " SELECT c.id FROM customers c"
        " LEFT JOIN buyers b ON b.customer_id = c.id"
        " LEFT JOIN seen s ON s.customer_id = c.id"
        " LEFT JOIN segment_memberships l ON l.segment_slug = :loyal AND l.customer_id = c.id"
        f" WHERE (b.customer_id IS NOT NULL AND {plan})"
        "   OR (l.customer_id IS NOT NULL AND s.last_at <= :cut)"
    )


def hand_written_pass(conn: Connection) -> tuple[int, int]:
    """The same segment by hand: stage the members, write entries and exits, update."""
    pg = conn.dialect.name == "postgresql"
    stamp = (lambda v: v) if pg else sqlite_time
    params = {"now": stamp(NOW), "cut": stamp(NOW - timedelta(days=30)), "loyal": LOYAL}
    conn.execute(
        text("CREATE TEMP TABLE IF NOT EXISTS hand_stage (customer_id varchar(255) PRIMARY KEY)")
    )
    conn.execute(text("DELETE FROM hand_stage"))
    conn.execute(text(f"INSERT INTO hand_stage (customer_id) {hand_written_sql(pg)}"), params)
    seg = {"seg": SEGMENT, "now": stamp(NOW)}
    exits = conn.execute(
        text(
            "INSERT INTO segment_transitions (segment_slug, customer_id, kind, source, context, occurred_at)"
            " SELECT m.segment_slug, m.customer_id, 'exited', 'hand', '{}', :now FROM segment_memberships m"
            " WHERE m.segment_slug = :seg AND NOT EXISTS (SELECT 1 FROM hand_stage h WHERE h.customer_id = m.customer_id)"
        ),
        seg,
    ).rowcount
    entries = conn.execute(
        text(
            "INSERT INTO segment_transitions (segment_slug, customer_id, kind, source, context, occurred_at)"
            " SELECT CAST(:seg AS VARCHAR(200)), h.customer_id, 'entered', 'hand', '{}', :now FROM hand_stage h"
            " WHERE NOT EXISTS (SELECT 1 FROM segment_memberships m WHERE m.segment_slug = :seg"
            " AND m.customer_id = h.customer_id)"
        ),
        seg,
    ).rowcount
    conn.execute(
        text(
            "DELETE FROM segment_memberships WHERE segment_slug = :seg AND NOT EXISTS"
            " (SELECT 1 FROM hand_stage h WHERE h.customer_id = segment_memberships.customer_id)"
        ),
        {"seg": SEGMENT},
    )
    conn.execute(
        text(
            "INSERT INTO segment_memberships (segment_slug, customer_id, since)"
            " SELECT CAST(:seg AS VARCHAR(200)), h.customer_id, :now FROM hand_stage h WHERE NOT EXISTS"
            " (SELECT 1 FROM segment_memberships m WHERE m.segment_slug = :seg AND m.customer_id = h.customer_id)"
        ),
        seg,
    )
    return entries, exits


def timed_rolled_back(engine: Engine, work) -> tuple[float, tuple[int, int]]:  # noqa: ANN001
    conn = engine.connect()
    tx = conn.begin()
    try:
        started = time.perf_counter()
        result = work(conn)
        elapsed = time.perf_counter() - started
    finally:
        tx.rollback()
        conn.close()
    return elapsed, result


def product_pass(conn: Connection) -> tuple[int, int]:
    diff = segment_store.evaluate_segment(conn, slug=SEGMENT, now=NOW)
    return diff.entries, diff.exits


def realtime(engine: Engine, *, customers: int, samples: int, seed: int) -> list[float]:
    rng = random.Random(seed + 1)
    timings = []
    for _ in range(samples):
        cid = f"c{rng.randrange(customers):08d}"
        started = time.perf_counter()
        with engine.begin() as conn:
            segment_store.reevaluate_customers(conn, customer_ids=[cid], now=NOW)
        timings.append(time.perf_counter() - started)
    return timings


async def save_to_ready(engine: Engine, *, rounds: int) -> list[float]:
    """Seconds from a segment's save to its `ready` answer, through the product."""
    import uuid

    from httpx import ASGITransport, AsyncClient
    from sqlmodel import Session
    from temporalio.testing import WorkflowEnvironment

    from api.app import create_app
    from core.settings import Settings, find_executable
    from store.keys import create_key
    from worker import build_worker, connect_client, ensure_background_workflows

    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_executable("temporal"), ui=False
    )
    settings = Settings(
        environment="test",
        secret_key="bench-secret",
        temporal_address=env.client.service_client.config.target_host,
        task_queue=f"bench-{uuid.uuid4().hex[:6]}",
    )
    with Session(engine) as session:
        _, key = create_key(session, role="admin", name="bench-save")
        session.commit()
    client = await connect_client(settings)
    app = create_app(settings, engine)
    timings = []
    try:
        async with (
            build_worker(client, settings, engine),
            app.router.lifespan_context(app),
            AsyncClient(
                transport=ASGITransport(app=app),
                base_url="http://api",
                headers={"Authorization": f"Bearer {key}"},
                timeout=3600,
            ) as api,
        ):
            await ensure_background_workflows(client, settings)
            for n in range(rounds):
                slug = f"bench-saved-{n}"
                body = {"slug": slug, "name": slug, "condition": CONDITION}
                started = time.perf_counter()
                answer = await api.post(
                    "/v1/segments", json=body, params={"wait": "true", "wait_seconds": 300}
                )
                elapsed = time.perf_counter() - started
                state = answer.json()
                assert state["state"] == "ready", state
                timings.append(elapsed)
                print(f"  save -> ready {elapsed:.2f}s ({state['member_count']:,} members)")
                await api.delete(f"/v1/segments/{slug}")
    finally:
        await env.shutdown()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--sqlite-path", default="/tmp/journeys-bench-segments.db")
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--realtime-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--reuse", action="store_true", help="keep the generated data of an earlier run"
    )
    parser.add_argument(
        "--realtime-only", action="store_true", help="skip the whole-segment passes"
    )
    parser.add_argument(
        "--save-to-ready", action="store_true", help="also time a save until it says ready"
    )
    args = parser.parse_args()

    engine = bench_store_from_args(args, schema=SCHEMA)
    with engine.connect() as conn:
        loaded = conn.execute(text("SELECT COUNT(*) FROM customers")).scalar_one()
    if not loaded:
        generate(engine, customers=args.customers, events=args.events, seed=args.seed)
    else:
        print(f"reusing {loaded:,} customers", flush=True)
        args.customers = loaded
    define_segments(engine)

    if not args.realtime_only:
        timed_rolled_back(engine, hand_written_pass)  # warm-up: read the tables into cache once
        product, hand = [], []
        for _ in range(args.rounds):
            t, product_diff = timed_rolled_back(engine, product_pass)
            product.append(t)
            t, hand_diff = timed_rolled_back(engine, hand_written_pass)
            hand.append(t)
        assert product_diff == hand_diff, f"product {product_diff} != hand-written {hand_diff}"
        p, h = statistics.median(product), statistics.median(hand)
        print(f"db={engine.dialect.name} customers={args.customers:,} rounds={args.rounds}")
        print(
            f"membership diff: {product_diff[0]:,} entries, {product_diff[1]:,} exits (identical both ways)"
        )
        print(
            f"evaluate_segment (one compiled query + apply_membership): median {p:.2f}s  runs {[round(x, 2) for x in product]}"
        )
        print(
            f"hand-written query + bare diff:                          median {h:.2f}s  runs {[round(x, 2) for x in hand]}"
        )
        print(f"ratio product / hand-written: {p / h:.2f}x (goal <= 1.5x)")
        if args.save_to_ready:
            import asyncio

            saves = asyncio.run(save_to_ready(engine, rounds=args.rounds))
            hand_after = [timed_rolled_back(engine, hand_written_pass)[0] for _ in saves]
            s, h2 = statistics.median(saves), statistics.median(hand + hand_after)
            print(
                f"save -> ready (POST ?wait=true, the save's workflow): median {s:.2f}s"
                f"  runs {[round(x, 2) for x in saves]}"
            )
            print(f"ratio save-to-ready / hand-written: {s / h2:.2f}x (goal <= 1.5x)")

    with engine.begin() as conn:  # real-time figures start from an evaluated segment
        segment_store.evaluate_segment(conn, slug=SEGMENT, now=NOW)
        for slug in OTHER_SEGMENTS:
            segment_store.evaluate_segment(conn, slug=slug, now=NOW)
    timings = sorted(
        realtime(engine, customers=args.customers, samples=args.realtime_samples, seed=args.seed)
    )
    p50 = timings[len(timings) // 2] * 1000
    p99 = timings[min(len(timings) - 1, int(len(timings) * 0.99))] * 1000
    print(
        f"real-time reevaluate_customers, 1 customer, {len(OTHER_SEGMENTS) + 1} rule segments,"
        f" {len(timings)} samples: p50 {p50:.1f} ms  p99 {p99:.1f} ms (goal p99 <= 20 ms)"
    )
    engine.dispose()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
