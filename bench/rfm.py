"""RFM scoring figures (issue 4). Run by hand, never under pytest:

    .venv/bin/python bench/rfm.py                                 # 1,000,000 / 10,000,000, PostgreSQL
    .venv/bin/python bench/rfm.py --db sqlite
    .venv/bin/python bench/rfm.py --customers 20000 --events 200000 --db sqlite

It builds a store in its own PostgreSQL schema (`bench_rfm`) or a SQLite file, loads
customers and purchases (COPY on PostgreSQL, one executemany transaction on SQLite) spread
over a year, and measures in the same run:

1. the bare scoring statement (`store.scoring.scoring_sql`: measures, window-function
   ranks and labels of every customer, aggregated so nothing is written),
2. a bare membership diff (stage (segment, customer) of every score, anti-join both ways
   against the memberships, count; nothing written),
3. full passes (`score_model`: scores, cut-points, memberships, transitions, one
   transaction): the first from empty segments, then a day later and an hour after that
   (what an hourly schedule sees), each beside (1) + (2) measured just before it;
4. real-time rescoring of one customer (`rescore_customers`, own transaction, committed)
   while another thread writes purchases at --rate per second: p50 / p99.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stores import bench_store_from_args  # noqa: E402
from core.rfm import RfmModelCreate  # noqa: E402
from store import rfm_models, scoring  # noqa: E402

SCHEMA = "bench_rfm"
T = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
HISTORY_DAYS = 365
MODEL = "bench"


def customer_id(n: int) -> str:
    return f"c{n:08d}"


def purchases(customers: int, events: int, seed: int, pg: bool) -> Iterator[tuple]:
    """Purchases customer by customer (so indexes fill in order), times over a year."""
    rng = random.Random(seed)
    mean = events / customers
    start = (T - timedelta(days=HISTORY_DAYS)).replace(tzinfo=None)
    span = HISTORY_DAYS * 86_400
    written = 0
    for n in range(customers):
        left = events - written
        if left <= 0:
            return
        count = left if n == customers - 1 else min(left, int(rng.expovariate(1 / mean) + 0.5))
        cid = customer_id(n)
        for _ in range(count):
            at = start + timedelta(seconds=rng.random() * span)
            stamp = at.replace(tzinfo=UTC) if pg else at.isoformat(" ", "microseconds")
            price = round(rng.random() * 200, 2) if rng.random() < 0.97 else None
            props = f'{{"total_price": {price}}}' if price is not None else "{}"
            written += 1
            yield (f"e{written:09d}", cid, "Purchase", stamp, props, stamp, False)


def generate(engine: Engine, args: argparse.Namespace) -> None:
    pg = engine.dialect.name == "postgresql"
    started = time.monotonic()
    now = T if pg else T.replace(tzinfo=None).isoformat(" ", "microseconds")
    customer_rows = (
        (customer_id(n), '{"signed_up": true}', now, now) for n in range(args.customers)
    )
    event_rows = purchases(args.customers, args.events, args.seed, pg)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if pg:
            with cur.copy(
                "COPY customers (id, attributes, created_at, updated_at) FROM STDIN"
            ) as c:
                for row in customer_rows:
                    c.write_row(row)
            with cur.copy(
                "COPY events (event_id, customer_id, name, occurred_at, properties, received_at,"
                " realtime_pending) FROM STDIN"
            ) as c:
                for row in event_rows:
                    c.write_row(row)
            raw.commit()
            cur.execute("ANALYZE")
        else:
            cur.executemany(
                "INSERT INTO customers (id, attributes, created_at, updated_at) VALUES (?, ?, ?, ?)",
                customer_rows,
            )
            cur.executemany(
                "INSERT INTO events (event_id, customer_id, name, occurred_at, properties,"
                " received_at, realtime_pending) VALUES (?, ?, ?, ?, ?, ?, ?)",
                event_rows,
            )
            raw.commit()
            cur.execute("PRAGMA analysis_limit = 1000")
            cur.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
    print(
        f"loaded {args.customers:,} customers / {args.events:,} purchases"
        f" in {time.monotonic() - started:.1f}s",
        flush=True,
    )


def define_model(engine: Engine) -> None:
    model = RfmModelCreate(
        slug=MODEL,
        name="Bench RFM",
        recency_event="Purchase",
        frequency_event="Purchase",
        monetary_event="Purchase",
        monetary_property="total_price",
        timeframe="P90D",
        segment_map="rfm11",
        realtime=True,
    )
    with engine.begin() as conn:
        if not rfm_models.list_models(conn):
            rfm_models.create_model(conn, model=model, now=T)


def reset(engine: Engine) -> None:
    """Forget earlier runs on a reused store: no scores, passes, members or transitions."""
    with engine.begin() as conn:
        for sql in (
            "DELETE FROM rfm_scores",
            "DELETE FROM rfm_passes",
            "DELETE FROM segment_memberships",
            "DELETE FROM segment_transitions",
            "DELETE FROM events WHERE event_id LIKE 'rt-%'",
        ):
            conn.execute(text(sql))
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))


def timed(label: str, fn) -> float:  # noqa: ANN001
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    print(f"  {label:<44} {seconds:8.2f} s   {result}", flush=True)
    return seconds


def bare_scoring(engine: Engine, as_of: datetime) -> float:
    def run() -> str:
        with engine.begin() as conn:
            scoring.tune_for_pass(conn)
            model = rfm_models.get_model(conn, slug=MODEL)
            sql, params, _ = scoring.scoring_sql(conn, model, as_of=as_of)
            row = conn.execute(
                scoring._bind(
                    f"SELECT COUNT(*), SUM(r + f + m), COUNT(DISTINCT label) FROM ({sql}) s"
                ),
                params,
            ).one()
            return f"scored={row[0]:,}"

    return timed(f"bare scoring statement (as of {as_of:%m-%d})", run)


def bare_diff(engine: Engine) -> float:
    """Stage every score's (segment, customer) and anti-join both ways; nothing written."""

    def run() -> str:
        with engine.begin() as conn:
            scoring.tune_for_pass(conn)
            model = rfm_models.get_model(conn, slug=MODEL)
            params: dict = {}
            case = scoring._segment_case(model, params)
            pg = conn.dialect.name == "postgresql"
            conn.execute(
                text(
                    "CREATE TEMP TABLE bare_stage (segment_slug varchar(200), customer_id"
                    " varchar(255), PRIMARY KEY (segment_slug, customer_id))"
                    + (" ON COMMIT DROP" if pg else "")
                )
            )
            conn.execute(
                text(
                    f"INSERT INTO bare_stage SELECT {case}, s.customer_id FROM rfm_scores s"
                    " WHERE s.model_slug = :rfm_model"
                ),
                {**params, "rfm_model": MODEL},
            )
            entries = conn.execute(
                text(
                    "SELECT COUNT(*) FROM bare_stage s WHERE NOT EXISTS (SELECT 1 FROM"
                    " segment_memberships m WHERE m.segment_slug = s.segment_slug"
                    " AND m.customer_id = s.customer_id)"
                )
            ).scalar_one()
            exits = conn.execute(
                text(
                    "SELECT COUNT(*) FROM segment_memberships m WHERE m.segment_slug LIKE :prefix"
                    " AND NOT EXISTS (SELECT 1 FROM bare_stage s WHERE s.segment_slug ="
                    " m.segment_slug AND s.customer_id = m.customer_id)"
                ),
                {"prefix": f"{MODEL}:%"},
            ).scalar_one()
            if not pg:
                conn.execute(text("DROP TABLE bare_stage"))
            return f"entries={entries:,} exits={exits:,}"

    return timed("bare membership diff", run)


def full_pass(engine: Engine, as_of: datetime) -> float:
    def run() -> str:
        with engine.begin() as conn:
            result = scoring.score_model(conn, model_slug=MODEL, as_of=as_of)
        return f"scored={result.scored:,} entries={result.entries:,} exits={result.exits:,}"

    return timed(f"full pass (as of {as_of:%m-%d})", run)


def realtime(engine: Engine, args: argparse.Namespace, now: datetime) -> None:
    """A writer thread inserts purchases at `rate`/s; each buyer is rescored alone."""
    pg = engine.dialect.name == "postgresql"
    todo: queue.Queue[str | None] = queue.Queue()
    rng = random.Random(args.seed + 1)
    stop = time.monotonic() + args.realtime_seconds

    def writer() -> None:
        interval = 1 / args.rate
        n = 0
        next_at = time.monotonic()
        while time.monotonic() < stop:
            cid = customer_id(rng.randrange(args.customers))
            n += 1
            at = now - timedelta(seconds=rng.random() * 60)
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO events (event_id, customer_id, name, occurred_at, properties,"
                        " received_at, realtime_pending) VALUES (:id, :cid, 'Purchase', :at,"
                        " :props, :at, false)"
                    ),
                    {
                        "id": f"rt-{time.time_ns()}-{n}",
                        "cid": cid,
                        "at": at if pg else at.replace(tzinfo=None).isoformat(" ", "microseconds"),
                        "props": json.dumps({"total_price": round(rng.random() * 300, 2)}),
                    },
                )
            todo.put(cid)
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        todo.put(None)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    latencies = []
    changed = 0
    while (cid := todo.get()) is not None:
        started = time.perf_counter()
        with engine.begin() as conn:
            changed += scoring.rescore_customers(conn, customer_ids=[cid], now=now)
        latencies.append((time.perf_counter() - started) * 1000)
    thread.join()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"  real-time rescoring, one customer, {args.rate}/s purchases:"
        f" n={len(latencies):,} p50={statistics.median(latencies):.1f} ms"
        f" p99={p99:.1f} ms max={latencies[-1]:.1f} ms ({changed} labels changed)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--sqlite-path", default="/tmp/journeys-bench-rfm.db")
    parser.add_argument("--schema", default=SCHEMA, help="PostgreSQL schema of the store")
    parser.add_argument("--reuse", action="store_true", help="keep the loaded store")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rate", type=float, default=200.0, help="purchases/s while rescoring")
    parser.add_argument("--realtime-seconds", type=float, default=15.0)
    args = parser.parse_args()

    engine = bench_store_from_args(args, schema=args.schema)
    with engine.connect() as conn:
        loaded = conn.execute(text("SELECT COUNT(*) FROM customers")).scalar_one()
    if not loaded:
        generate(engine, args)
    define_model(engine)
    reset(engine)
    print(f"{args.db}: {args.customers:,} customers, {args.events:,} purchases", flush=True)
    bare_scoring(engine, T)
    first = full_pass(engine, T)
    later = T
    for step, name in ((timedelta(days=1), "a day later"), (timedelta(hours=1), "an hour later")):
        later += step
        scoring_s = bare_scoring(engine, later)
        diff_s = bare_diff(engine)
        full_s = full_pass(engine, later)
        bare = scoring_s + diff_s
        print(
            f"  {name}: bare scoring + bare diff = {bare:.2f} s; full pass {full_s:.2f} s"
            f" = {full_s / bare:.2f}x (goal <= 1.5x)",
            flush=True,
        )
    print(f"  first pass, from empty segments: {first:.2f} s", flush=True)
    realtime(engine, args, later + timedelta(minutes=10))


if __name__ == "__main__":
    main()
