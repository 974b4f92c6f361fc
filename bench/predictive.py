"""Predictive model figures (issue 22). Run by hand, never under pytest:

    .venv/bin/python bench/predictive.py cdnow                    # accuracy on CDNOW, SQLite
    .venv/bin/python bench/predictive.py scale                    # 1,000,000 / 10,000,000, PostgreSQL
    .venv/bin/python bench/predictive.py scale --customers 100000 --events 1000000

**cdnow**: the CDNOW purchase history (23,570 customers who first bought in the first
quarter of 1997, 69,659 purchases to June 1998; Fader, Hardie and Lee 2005) as
`Purchase` events with their dollar value. The file is read from the installed
`lifetimes` package (`lifetimes/datasets/CDNOW_master.txt`), or from `--cdnow FILE`;
nothing of it is kept in the repository. At each of three cutoffs T the product trains
as of T (reading nothing after T) and scores everyone from their features at T; those
scores are graded on what each customer did in the horizon after T, beside the two
baselines fitted on the same history: the RFM heuristic (R + F + M quintile sums at their
rates on the training rows) and BG/NBD (fitted on the purchases up to T). The training's
own holdout figures (the horizon before T) are printed too.

**scale**: a generated store in its own PostgreSQL schema (`bench_predictive`, dropped at
the end unless --keep): customers with heterogeneous purchase and visit rates over two
years. It times feature extraction (the bare feature statement, its rows fetched),
training (its feature reads and its fits), scoring everyone (features, estimator, score
writes) beside the bare feature statement measured just before it, one customer's
real-time rescoring (features for one customer, estimator, upsert; own committed
transaction) p50 / p99, and the real-time processor's batch for a new event (claim,
rescoring, the rule segments that name the model) p99.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stores import bench_store  # noqa: E402
from core.db import make_engine  # noqa: E402
from core.prediction_learning import brier, roc_auc  # noqa: E402
from core.predictions import PredictiveModelCreate, PredictiveModelDefinition  # noqa: E402
from store import predictions as prediction_store  # noqa: E402
from store.prediction_features import features_sql  # noqa: E402
from store.prediction_training import (  # noqa: E402
    bgnbd_baseline,
    labelled,
    rfm_baseline,
    score_everyone,
    train,
    tune_for_reads,
)

CDNOW_CUTOFFS = (
    datetime(1997, 9, 30, tzinfo=UTC),
    datetime(1997, 12, 31, tzinfo=UTC),
    datetime(1998, 3, 31, tzinfo=UTC),
)
CDNOW_HORIZON = "P90D"
SCALE_SCHEMA = "bench_predictive"
SCALE_T = datetime(2026, 11, 20, tzinfo=UTC)
SCALE_DAYS = 730
MODEL = "buy-90d"


def load_env_line() -> str:
    load = os.getloadavg()
    return f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores"


def say(line: str) -> None:
    print(line, flush=True)


# --- CDNOW ------------------------------------------------------------------------------------


def cdnow_file(given: str | None) -> Path:
    if given:
        return Path(given)
    try:
        import lifetimes
    except ImportError:
        sys.exit("CDNOW: install `lifetimes` (it ships the file) or pass --cdnow FILE")
    return Path(lifetimes.__file__).parent / "datasets" / "CDNOW_master.txt"


def load_cdnow(engine: Engine, path: Path) -> int:
    """Purchases at noon UTC of their day (the file has dates), value in `amount`."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines()):
        parts = line.split()
        if len(parts) != 4 or not parts[0].isdigit():
            continue
        customer, day, cds, amount = parts
        at = datetime.strptime(day, "%Y%m%d").replace(hour=12, tzinfo=UTC)
        rows.append((f"cd-{n}", f"c{customer}", at, float(amount), int(cds)))
    stamp = (
        (lambda at: at)
        if engine.dialect.name == "postgresql"
        else (lambda at: at.replace(tzinfo=None).isoformat(" ", "microseconds"))
    )
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        marker = "%s" if engine.dialect.name == "postgresql" else "?"
        now = stamp(datetime.now(UTC))
        customers = sorted({r[1] for r in rows})
        cur.executemany(
            "INSERT INTO customers (id, attributes, created_at, updated_at)"
            f" VALUES ({marker}, '{{}}', {marker}, {marker})",
            [(c, now, now) for c in customers],
        )
        cur.executemany(
            "INSERT INTO events (event_id, customer_id, name, occurred_at, properties,"
            f" received_at, realtime_pending) VALUES ({marker}, {marker}, 'Purchase', {marker},"
            f" {marker}, {marker}, FALSE)",
            [
                (eid, cid, stamp(at), f'{{"amount": {amount}, "cds": {cds}}}', now)
                for eid, cid, at, amount, cds in rows
            ],
        )
        raw.commit()
    finally:
        raw.close()
    return len(rows)


def cdnow_definition() -> PredictiveModelDefinition:
    return PredictiveModelDefinition.model_validate(
        {
            "name": "CDNOW: buys again within 90 days",
            "target": {"event": "Purchase", "within": CDNOW_HORIZON},
            "features": {"value_property": "amount"},
        }
    )


def generate(engine: Engine, customers: int, events: int) -> None:
    """Customers `c0000001`...; events drawn for customers with a skewed share (a few
    buy a lot), each customer active from a join day (up to two years before T) for a
    share of the time since, so some are still active at T and others long gone; 30%
    purchases with a price, the rest visits. Generated by PostgreSQL itself."""
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO customers (id, attributes, created_at, updated_at)"
                " SELECT 'c' || lpad(g::text, 7, '0'), '{}'::jsonb, :t, :t"
                " FROM generate_series(1, :n) g"
            ),
            {"t": SCALE_T, "n": customers},
        )
        conn.execute(
            text(
                """
                INSERT INTO events (event_id, customer_id, name, occurred_at, properties,
                                    received_at, realtime_pending)
                SELECT 'e' || g, 'c' || lpad(k::text, 7, '0'),
                       CASE WHEN buy THEN 'Purchase' ELSE 'Visit' END,
                       :t - make_interval(secs => :span * joined * (1 - lasted * random())),
                       CASE WHEN buy THEN jsonb_build_object('total_price',
                            round((5 + 195 * random())::numeric, 2)) ELSE '{}'::jsonb END,
                       :t, FALSE
                FROM (
                    SELECT g, k, random() < 0.3 AS buy,
                           ((k * 2654435761::bigint) % 1000003) / 1000003.0 AS joined,
                           ((k * 40503::bigint + 7) % 999983) / 999983.0 AS lasted
                    FROM (SELECT g, 1 + floor(:n * power(random(), 1.3))::int AS k
                          FROM generate_series(1, :e) g) picked
                ) drawn
                """
            ),
            {"t": SCALE_T, "n": customers, "e": events, "span": SCALE_DAYS * 86_400},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    say(
        f"generated {customers:,} customers / {events:,} events"
        f" in {time.perf_counter() - started:.1f}s"
    )


def scale_definition() -> PredictiveModelCreate:
    return PredictiveModelCreate.model_validate(
        {
            "slug": MODEL,
            "name": "Will purchase in 90 days",
            "target": {"event": "Purchase", "within": "P90D"},
            "features": {"value_property": "total_price"},
            "levels": {"medium": 0.3, "high": 0.6},
        }
    )


def bare_features(engine: Engine, definition: PredictiveModelDefinition) -> tuple[float, int]:
    """The feature statement as of T, every row fetched, nothing else."""
    started = time.perf_counter()
    with engine.begin() as conn:
        tune_for_reads(conn)
        statement, params = features_sql(conn, definition, cutoff=SCALE_T)
        result = conn.execute(
            statement.execution_options(stream_results=True, yield_per=50_000), params
        )
        rows = sum(len(part) for part in result.partitions(50_000))
    return time.perf_counter() - started, rows


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def scale(args: argparse.Namespace) -> None:
    engine = bench_store(
        db=args.db, url=args.url, sqlite_path=args.sqlite_path, schema=SCALE_SCHEMA, reuse=False
    )
    try:
        run_scale(engine, args)
    finally:
        engine.dispose()
        if args.db == "postgresql" and not args.keep:
            admin = make_engine(args.url)
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{SCALE_SCHEMA}" CASCADE'))
            admin.dispose()
            say(f"dropped schema {SCALE_SCHEMA}")


def run_scale(engine: Engine, args: argparse.Namespace) -> None:
    generate(engine, args.customers, args.events)
    model = scale_definition()
    with engine.begin() as conn:
        prediction_store.create_model(conn, model=model, now=SCALE_T)
    definition = PredictiveModelDefinition.model_validate(model.model_dump(exclude={"slug"}))
    say(load_env_line())

    warm, rows = bare_features(engine, definition)
    say(f"\nbare feature statement, warm-up: {warm:.1f}s, {rows:,} customers")
    bare, _ = bare_features(engine, definition)
    say(f"feature extraction (bare statement, rows fetched): {bare:.1f}s")

    marks: list[tuple[str, float]] = [("start", time.perf_counter())]
    with engine.begin() as conn:
        tune_for_reads(conn)
        trained = train(
            conn,
            definition,
            as_of=SCALE_T,
            progress=lambda s: marks.append((s, time.perf_counter())),
        )
    marks.append(("done", time.perf_counter()))
    steps = [(marks[i][0], marks[i + 1][1] - marks[i][1]) for i in range(len(marks) - 1)]
    reading = sum(sec for name, sec in steps if name.startswith("reading"))
    total = marks[-1][1] - marks[0][1]
    say(
        f"training: {total:.1f}s ({reading:.1f}s reading features and outcomes at"
        f" {definition.snapshots + 1} cutoffs, {total - reading:.1f}s fitting and measuring);"
        f" holdout AUC {trained.report.model.auc:.4f}, RFM heuristic"
        f" {trained.report.baselines[0].auc:.4f}, BG/NBD {trained.report.baselines[1].auc:.4f}"
    )
    for name, seconds in steps:
        say(f"    {name:<48}{seconds:8.1f}s")

    with engine.begin() as conn:
        training_id = prediction_store.start_training(
            conn, model=prediction_store.get_model(conn, slug=MODEL), as_of=SCALE_T, now=SCALE_T
        )
    started = time.perf_counter()
    with engine.begin() as conn:
        scored = score_everyone(
            conn,
            slug=MODEL,
            definition=definition,
            fitted=trained.fitted,
            training_id=training_id,
            as_of=SCALE_T,
        )
        prediction_store.finish_training(
            conn,
            training_id=training_id,
            status=trained.status,
            now=SCALE_T,
            report=trained.report,
            fitted=trained.fitted,
            scored=scored,
        )
    scoring = time.perf_counter() - started
    after, _ = bare_features(engine, definition)
    ceiling = 1.5 * (bare + after) / 2
    say(
        f"scoring everyone (features, estimator, {scored:,} score rows written): {scoring:.1f}s"
        f" = {scoring / ((bare + after) / 2):.2f}x the bare statement (measured {bare:.1f}s"
        f" before, {after:.1f}s after); ceiling 1.5x = {ceiling:.1f}s:"
        f" {'met' if scoring <= ceiling else 'NOT met'}"
    )
    realtime(engine, definition, args.samples)


def realtime(engine: Engine, definition: PredictiveModelDefinition, samples: int) -> None:
    from activities.realtime import RealtimeActivities
    from store.segments import create_segment
    from tests.utils.api import settings_for_tests
    from worker import realtime_customer_steps

    with engine.connect() as conn:
        ids = (
            conn.execute(
                text("SELECT customer_id FROM prediction_scores WHERE model_slug = :m"),
                {"m": MODEL},
            )
            .scalars()
            .all()
        )
    rng = random.Random(5)
    picked = rng.sample(ids, min(samples, len(ids)))
    now = datetime.now(UTC)
    bare_one, rescoring = [], []
    for customer in picked:
        started = time.perf_counter()
        with engine.begin() as conn:
            statement, params = features_sql(conn, definition, cutoff=now, for_customers=True)
            conn.execute(statement, {**params, "pf_ids": [customer]}).all()
        bare_one.append(time.perf_counter() - started)
        started = time.perf_counter()
        with engine.begin() as conn:
            prediction_store.rescore_customers(conn, customer_ids=[customer], now=now)
        rescoring.append(time.perf_counter() - started)
    ms = 1000
    say(
        f"\none customer's real-time rescoring ({len(picked):,} customers, own committed"
        f" transaction): p50 {statistics.median(rescoring) * ms:.1f} ms, p99"
        f" {percentile(rescoring, 0.99) * ms:.1f} ms (ceiling 20 ms:"
        f" {'met' if percentile(rescoring, 0.99) <= 0.020 else 'NOT met'}); the bare"
        f" one-customer feature statement: p50 {statistics.median(bare_one) * ms:.1f} ms,"
        f" p99 {percentile(bare_one, 0.99) * ms:.1f} ms"
    )

    with engine.begin() as conn:
        create_segment(
            conn,
            slug="likely-buyers",
            name="Likely buyers",
            kind="rule",
            condition={"prediction": MODEL, "level": "high"},
            now=now,
        )
    processor = RealtimeActivities(
        engine, settings_for_tests(), customer_steps=realtime_customer_steps(), event_sink=None
    )
    batches = []
    for n, customer in enumerate(picked[:200]):
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO events (event_id, customer_id, name, occurred_at, properties,"
                    " received_at, realtime_pending) VALUES (:e, :c, 'Purchase', :t,"
                    " CAST('{\"total_price\": 50}' AS jsonb), :t, TRUE)"
                ),
                {"e": f"rt-{n}", "c": customer, "t": datetime.now(UTC)},
            )
        started = time.perf_counter()
        events, _ = processor.process_batch(2_000)
        batches.append(time.perf_counter() - started)
        assert len(events) == 1
    say(
        f"real-time processor batch for one new purchase (claim, RFM and predictive"
        f" rescoring, rule segments): p50 {statistics.median(batches) * ms:.1f} ms, p99"
        f" {percentile(batches, 0.99) * ms:.1f} ms; with the processor's 0.2 s poll, a new"
        f" event's score and segments follow within"
        f" {(0.2 + percentile(batches, 0.99)):.2f} s (ceiling 2 s)"
    )


def cdnow(args: argparse.Namespace) -> None:
    engine = bench_store(
        db=args.db, url=args.url, sqlite_path=args.sqlite_path, schema="bench_cdnow", reuse=False
    )
    path = cdnow_file(args.cdnow)
    started = time.perf_counter()
    events = load_cdnow(engine, path)
    say(f"CDNOW: {events:,} purchases from {path.name} in {time.perf_counter() - started:.1f}s")
    say(load_env_line())
    definition = cdnow_definition()
    horizon = definition.horizon
    met = True
    for cutoff in CDNOW_CUTOFFS:
        started = time.perf_counter()
        with engine.connect() as conn:
            trained = train(conn, definition, as_of=cutoff)
            history = [
                labelled(conn, definition, cutoff=cutoff - k * horizon)
                for k in range(1, definition.snapshots + 1)
            ]
            # Read only to grade: the horizon after T, which the training never saw.
            future = labelled(conn, definition, cutoff=cutoff)
        seconds = time.perf_counter() - started
        outcomes = future.outcomes.astype(float)
        figures = {
            "model": trained.fitted.predict(future.frame),
            "rfm_heuristic": rfm_baseline(history, future),
            "bgnbd": bgnbd_baseline(history, future, definition),
        }
        scores = {m: (roc_auc(outcomes, p), brier(outcomes, p)) for m, p in figures.items()}
        goal = (
            scores["model"][0] > scores["rfm_heuristic"][0]
            and scores["model"][0] > scores["bgnbd"][0]
            and scores["model"][1] < scores["bgnbd"][1]
        )
        met = met and goal
        say(
            f"\ncutoff {cutoff:%Y-%m-%d}: {len(future.frame):,} customers, "
            f"{int(outcomes.sum()):,} bought in the next {CDNOW_HORIZON}"
            f" (base rate {outcomes.mean():.3f}); trained in {seconds:.1f}s"
        )
        say(
            f"  {'method':<16}{'AUC':>8}{'Brier':>9}   forward test: scores at T, graded on (T, T+90d]"
        )
        for method, (auc, score) in scores.items():
            say(f"  {method:<16}{auc:>8.4f}{score:>9.4f}")
        report = trained.report
        holdout = " ".join(
            f"{f.method} AUC {f.auc:.4f} Brier {f.brier:.4f};"
            for f in (report.model, *report.baselines)
        )
        say(f"  training's own holdout (T-90d, T]: {holdout}")
        say(
            f"  goal (AUC above both baselines, Brier below BG/NBD): {'met' if goal else 'NOT met'}"
        )
    say(f"\nall cutoffs: goal {'met' if met else 'NOT met'}")
    engine.dispose()
    if args.db == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{args.sqlite_path}{suffix}").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["cdnow", "scale"])
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default=None)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--sqlite-path", default=".journeys/bench-predictive.db")
    parser.add_argument("--cdnow", default=None, help="CDNOW_master.txt (default: lifetimes')")
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--samples", type=int, default=1_000, help="real-time rescorings")
    parser.add_argument("--keep", action="store_true", help="keep the scale schema")
    args = parser.parse_args()
    Path(args.sqlite_path).parent.mkdir(parents=True, exist_ok=True)
    if args.part == "cdnow":
        args.db = args.db or "sqlite"
        cdnow(args)
    else:
        args.db = args.db or "postgresql"
        scale(args)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
