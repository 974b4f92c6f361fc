"""The console's server time per page (issue 20). Run by hand, never under pytest:

    .venv/bin/python -m bench.console                                   # full size
    .venv/bin/python -m bench.console --customers 100000 --events 1000000 --runs 10000
    .venv/bin/python -m bench.console --reuse                           # skip generation
    .venv/bin/python -m bench.console --keep                            # leave the schema

It builds a store in its own PostgreSQL schema (`bench_console`, dropped at the end unless
`--keep`): `--customers` customers with attributes, `--events` events (four in five
purchases) spread over 180 days with skewed activity and received over the last hour, the
`default` RFM model scored twice (a month apart, so passes have label moves), the three
example rule segments evaluated, the seed journeys active with `--runs` runs of the
Champions journey written as the runtime writes them (bench/inspection.py's generator:
timeline lines, messages, opens and clicks), the homepage campaign active with views of a
fifth of the scored customers, and a few quarantined records. Then VACUUM ANALYZE.

Then it starts the real API (uvicorn, one process) on a local port, signs in to the
console with a marketer key and requests every page: first until no section is still
"counting" (aggregates are computed off the request path; how long each takes is timed
separately below), then `--samples` times each, reading the server's own time from the
`Server-Timing` header. Each page's p95 is printed beside the goal (200 ms) and beside a
floor measured in the same run: `GET /healthz`, the HTTP stack doing nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from bench.stores import bench_store
from core.db import make_engine
from core.rfm import RfmModelCreate
from core.tables import utcnow
from store import console as console_store
from store import segments as segment_store
from store.analytics import journey_analytics
from store.journeys import install_shipped_journeys
from store.keys import create_key
from store.personalization import campaign_analytics, install_shipped_campaigns
from store.rfm_models import create_model
from store.scoring import score_model

SCHEMA = "bench_console"
ROOT = Path(__file__).resolve().parent.parent
GOAL_MS = 200.0
NAMES = ["Ada", "Ben", "Chloé", "Dev", "Eun", "Femi", "Gus", "Hana", "Ines", "Jon"]


def log(message: str) -> None:
    print(message, flush=True)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# --- generation -----------------------------------------------------------------------------


def _timed(label: str, work: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = work()
    log(f"  {label:<52} {time.perf_counter() - started:7.1f} s  (load {load_average()})")
    return result


def generate_people(engine: Engine, *, customers: int, events: int, now: datetime) -> None:
    names = "ARRAY[" + ", ".join(f"'{n}'" for n in NAMES) + "]"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO customers (id, email, attributes, created_at, updated_at,"
                " realtime_pending)"
                " SELECT 'c' || lpad(g::text, 7, '0'), 'c' || g || '@example.com',"
                f" jsonb_build_object('first_name', ({names})[1 + g % 10],"
                " 'total_spent', (g * 37) % 3000, 'engagement_score', (g * 13) % 100,"
                " 'sms_opt_in', g % 3 <> 0, 'signed_up_at',"
                " to_char((CAST(:now AS timestamptz) - (g % 400) * interval '1 day')"
                " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')),"
                " CAST(:now AS timestamptz) - interval '400 days',"
                " CAST(:now AS timestamptz) - interval '1 day', false"
                " FROM generate_series(0, :n - 1) g"
            ),
            {"n": customers, "now": now},
        )
    chunk = 1_000_000
    for low in range(0, events, chunk):
        high = min(low + chunk, events) - 1
        # u in [0, 1) from a multiplicative hash; customer u^1.6 * n: a few customers buy
        # often, most rarely, as in a shop.
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO events (event_id, customer_id, name, occurred_at, properties,"
                    " received_at, realtime_pending)"
                    " SELECT 'e' || g, 'c' || lpad(floor(:n * power(((g * 2654435761) %"
                    " 4294967296) / 4294967296.0, 1.6))::bigint::text, 7, '0'),"
                    " CASE WHEN g % 5 = 0 THEN 'Visit' ELSE 'Purchase' END,"
                    " CAST(:now AS timestamptz) - ((g * 104729) % 15552000) * interval '1 second',"
                    " jsonb_build_object('total_price', ((g * 31) % 300) + 0.5),"
                    " CAST(:now AS timestamptz) - (:total - g) * (3600.0 / :total)"
                    " * interval '1 second', false"
                    " FROM generate_series(CAST(:low AS bigint), CAST(:high AS bigint)) g"
                ),
                {"n": customers, "now": now, "low": low, "high": high, "total": events},
            )
        log(f"    events {high + 1:,} of {events:,} (load {load_average()})")


def generate_models(engine: Engine, now: datetime) -> list[int]:
    body = json.loads(json.dumps({
        "slug": "default", "name": "Lifecycle RFM", "recency_event": "Purchase",
        "frequency_event": "Purchase", "monetary_event": "Purchase",
        "monetary_property": "total_price", "timeframe": "P90D", "segment_map": "seed5",
    }))  # fmt: skip
    with engine.begin() as conn:
        create_model(conn, model=RfmModelCreate.model_validate(body), now=now)
    passes = []
    for as_of in (now - timedelta(days=30), now):
        with engine.begin() as conn:
            result = _timed(
                f"RFM pass as of {as_of:%Y-%m-%d}",
                lambda a=as_of, c=conn: score_model(c, model_slug="default", as_of=a),
            )
            passes.append(result.pass_id)
    return passes


def generate_segments(engine: Engine, now: datetime) -> None:
    for path in sorted((ROOT / "examples" / "segments").glob("*.json")):
        raw = json.loads(path.read_text())
        with engine.begin() as conn:
            segment_store.create_segment(
                conn,
                slug=raw["slug"],
                name=raw["name"],
                kind="rule",
                condition=raw["condition"],
                schedule=raw.get("schedule"),
                now=now,
            )
            _timed(
                f"evaluate segment {raw['slug']}",
                lambda c=conn, s=raw["slug"]: segment_store.evaluate_segment(c, slug=s, now=now),
            )


def generate_runs(engine: Engine, *, runs: int) -> None:
    from bench.inspection import COLUMNS, Rows, _copy_postgres

    with Session(engine) as session:
        install_shipped_journeys(session, activate=True)
        install_shipped_campaigns(session, activate=True)
        session.commit()
    with engine.begin() as conn:
        # The generator numbers its transitions and messages from 1: above the RFM ones.
        offset = conn.execute(text("SELECT COALESCE(MAX(id), 0) FROM segment_transitions")).scalar()
    rows = Rows(runs=runs, journeys=1, seed=20)
    counts = dict.fromkeys(COLUMNS, 0)

    class Shifted:
        def generate(self):  # type: ignore[no-untyped-def]
            for name, row in rows.generate():
                if name == "segment_transitions":
                    row = (row[0] + offset, *row[1:])
                elif name == "journey_runs":
                    row = (*row[:10], row[10] + offset, *row[11:])
                yield name, row

    _copy_postgres(engine, Shifted(), counts)  # type: ignore[arg-type]
    with engine.begin() as conn:
        for table in ("segment_transitions", "messages"):
            conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" (SELECT MAX(id) FROM {table}))"
                )
            )
    log(f"    {', '.join(f'{k} {v:,}' for k, v in counts.items())}")


def generate_views(engine: Engine, now: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO personalization_views (campaign_slug, version, customer_id,"
                " experience, audience, bucket, first_viewed_at, last_viewed_at, views)"
                " SELECT 'rfm-homepage', 1, s.customer_id,"
                " CASE WHEN abs(hashtext(s.customer_id)) % 10 = 0 THEN 'control' ELSE s.label END,"
                " s.label, abs(hashtext(s.customer_id)) % 10000,"
                " CAST(:now AS timestamptz) - (abs(hashtext(s.customer_id)) % 604800) * interval '1 second',"
                " CAST(:now AS timestamptz), 1 + abs(hashtext(s.customer_id)) % 5"
                " FROM rfm_scores s WHERE s.model_slug = 'default'"
                " AND abs(hashtext(s.customer_id || 'v')) % 5 = 0"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO failures (kind, key, stage, error, attempts, first_failed_at,"
                " last_failed_at, next_attempt_at)"
                " SELECT 'customer', 'c' || lpad(g::text, 7, '0'), 'realtime',"
                " 'attributes.address: not an object', 1 + g % 4, CAST(:now AS timestamptz),"
                " CAST(:now AS timestamptz), CAST(:now AS timestamptz) + interval '1 hour'"
                " FROM generate_series(1, 12) g"
            ),
            {"now": now},
        )


def generate(engine: Engine, args: argparse.Namespace) -> None:
    now = utcnow()
    log(f"generating {args.customers:,} customers, {args.events:,} events, {args.runs:,} runs")
    _timed(
        "customers and events",
        lambda: generate_people(engine, customers=args.customers, events=args.events, now=now),
    )
    generate_models(engine, now)
    generate_segments(engine, now)
    _timed("journeys, campaign and runs", lambda: generate_runs(engine, runs=args.runs))
    _timed("campaign views and quarantine", lambda: generate_views(engine, now))
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        _timed("VACUUM ANALYZE", lambda: conn.execute(text("VACUUM ANALYZE")))


# --- measuring ------------------------------------------------------------------------------


def aggregate_times(engine: Engine) -> None:
    """How long each aggregate the console computes off the request path takes."""
    now = utcnow()
    work: list[tuple[str, Callable[[Connection], Any]]] = [
        ("overview: events per minute", lambda c: console_store.events_per_minute(c, now=now)),
        ("overview: activity (journeys, runs, sends)", console_store.activity),
        ("segments: member counts", lambda c: segment_store.member_counts(c, slugs=[s.slug for s in segment_store.list_segments(c)])),
        ("segments: transitions per day, 14 days", lambda c: console_store.transitions_per_day(c, now=now, days=14)),
        ("segment default:champions: count", lambda c: console_store.member_count(c, slug="default:champions")),
        ("segment default:champions: 30 days", lambda c: console_store.transitions_per_day(c, now=now, days=30, slug="default:champions")),
        ("journey champions-nurture: analytics", lambda c: journey_analytics(c, journey_slug="champions-nurture", version=1)),
        ("journey champions-nurture: step outcomes", lambda c: console_store.step_outcomes(c, journey_slug="champions-nurture", version=1)),
        ("campaign rfm-homepage: analytics", lambda c: campaign_analytics(c, slug="rfm-homepage")),
    ]  # fmt: skip
    with engine.connect() as conn:
        # What migration 0014 adds to every pass: its summary, counted from the stage (a
        # temporary copy of the model's scores); timed here over the stored scores.
        def summary() -> None:
            model = "s.model_slug = 'default'"
            conn.execute(
                text(
                    f"SELECT label, COUNT(*), SUM(monetary) FROM rfm_scores s WHERE {model} GROUP BY label"
                )
            ).all()
            conn.execute(
                text(f"SELECT r, f, COUNT(*) FROM rfm_scores s WHERE {model} GROUP BY r, f")
            ).all()

        _timed("an RFM pass's summary statements (over its scores)", summary)
    log("aggregates computed off the request path (each once, served from the cache after):")
    for label, compute in work:
        with engine.connect() as conn:
            _timed(label, lambda c=conn, f=compute: f(c))


def start_api(url: str, port: int, admin: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "JOURNEYS_DATABASE_URL": url,
        "JOURNEYS_TEMPORAL_ADDRESS": "127.0.0.1:1",
        "JOURNEYS_BOOTSTRAP_ADMIN_KEY": admin,
        "JOURNEYS_ENVIRONMENT": "test",
        "JOURNEYS_SECRET_KEY": "bench-console-secret",
    }
    code = (
        "import uvicorn; from api.app import create_app; "
        f"uvicorn.run(create_app(), host='127.0.0.1', port={port}, log_level='warning')"
    )
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise SystemExit("the API did not start")
        time.sleep(0.2)


def sign_in(client: httpx.Client, key: str) -> None:
    page = client.get("/console/sign-in")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, page.text[:500]
    answer = client.post("/console/sign-in", data={"key": key, "csrf_token": token.group(1)})
    assert answer.status_code == 303, answer.text[:500]


def server_ms(response: httpx.Response) -> float:
    match = re.search(r"dur=([\d.]+)", response.headers.get("server-timing", ""))
    assert match, (response.status_code, response.headers)
    return float(match.group(1))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(
    base: str, key: str, pages: list[str], people: dict[str, list[str]], samples: int
) -> bool:
    """Each page `samples` times; `{runner}` / `{viewer}` in a path take a different
    customer (with runs / with campaign views) each time, so their rows are not all hot."""
    rng = random.Random(20)
    client = httpx.Client(base_url=base, timeout=120, follow_redirects=False)
    sign_in(client, key)
    floor = []
    for _ in range(samples):
        started = time.perf_counter()
        client.get("/healthz")
        floor.append((time.perf_counter() - started) * 1000)
    floor_p95 = percentile(floor, 0.95)
    log(
        f"floor  GET /healthz (wall)                 p50 {statistics.median(floor):7.1f} ms"
        f"  p95 {floor_p95:7.1f} ms"
    )

    def concrete(template: str) -> str:
        return template.format(**{name: rng.choice(ids) for name, ids in people.items()})

    ok = True
    for template in pages:
        headers = {"Authorization": f"Bearer {key}"} if template.startswith("/v1/") else {}
        started = time.monotonic()
        while True:
            path = concrete(template)
            answer = client.get(path, headers=headers)
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
            if "counting…" not in answer.text:
                break
            assert time.monotonic() - started < 600, f"{path} still counting"
            time.sleep(1)
        warm = time.monotonic() - started
        server, wall = [], []
        for _ in range(samples):
            t0 = time.perf_counter()
            answer = client.get(concrete(template), headers=headers)
            wall.append((time.perf_counter() - t0) * 1000)
            # The API's routes carry no Server-Timing: their wall time stands for it.
            server.append(server_ms(answer) if "server-timing" in answer.headers else wall[-1])
        p95 = percentile(server, 0.95)
        ok = ok and p95 <= GOAL_MS
        log(
            f"page   {template:<62} server p50 {statistics.median(server):6.1f}  p95 {p95:6.1f}"
            f"  max {max(server):6.1f} ms  (wall p95 {percentile(wall, 0.95):6.1f}; goal"
            f" <= {GOAL_MS:.0f}; floor {floor_p95:.1f}; {'ok' if p95 <= GOAL_MS else 'OVER'};"
            f" filled in after {warm:.1f} s)"
        )
    return ok


def pages_for(engine: Engine, passes: list[int]) -> tuple[list[str], dict[str, list[str]]]:
    with engine.connect() as conn:
        runners = list(
            conn.execute(
                text(
                    "SELECT DISTINCT customer_id FROM journey_runs ORDER BY customer_id LIMIT 2000"
                )
            ).scalars()
        )
        viewers = list(
            conn.execute(
                text(
                    "SELECT customer_id FROM personalization_views ORDER BY customer_id LIMIT 2000"
                )
            ).scalars()
        )
    random.Random(20).shuffle(runners)
    random.Random(21).shuffle(viewers)
    pages = [
        "/console/",
        "/console/parts/throughput",
        "/console/parts/activity",
        "/console/rfm/default",
        f"/console/rfm/default?pass={passes[0]}",
        "/console/segments",
        "/console/segments/default:champions",
        "/console/segments/high-value-champions",
        "/console/journeys",
        "/console/journeys/champions-nurture",
        "/console/journeys/at-risk-winback",
        "/console/personalization",
        "/console/personalization/rfm-homepage",
        "/console/personalization/rfm-homepage?customer={viewer}",
        "/console/customers?q=c00001",
        "/console/customers/{runner}",
        "/console/customers/{runner}/why?segment=high-value-champions",
        "/console/customers/{runner}/why?journey=at-risk-winback&step=by_channel",
        "/console/customers/{viewer}/why?personalization=rfm-homepage",
        "/console/customers/{runner}/why?segment=churning-users",
        "/v1/customers/{runner}/explain?segment=churning-users",
    ]
    return pages, {"runner": runners, "viewer": viewers}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url",
        default=os.environ.get(
            "JOURNEYS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--reuse", action="store_true", help="measure what an earlier --keep left")
    parser.add_argument("--keep", action="store_true", help="do not drop the schema at the end")
    args = parser.parse_args()
    random.seed(20)
    log(f"load average at start: {load_average()} ({os.cpu_count()} cores)")
    engine = bench_store(
        db="postgresql", url=args.url, sqlite_path="", schema=SCHEMA, reuse=args.reuse
    )
    if not args.reuse:
        generate(engine, args)
    with engine.connect() as conn:
        passes = [
            int(p) for p in conn.execute(text("SELECT id FROM rfm_passes ORDER BY id")).scalars()
        ]
        sizes = {
            t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
            for t in (
                "customers",
                "events",
                "journey_runs",
                "segment_memberships",
                "segment_transitions",
                "messages",
                "personalization_views",
            )
        }
    log("store: " + ", ".join(f"{t} {n:,}" for t, n in sizes.items()))
    aggregate_times(engine)
    admin = "jk_admin_bench_console_0123456789abcdef"
    sep = "&" if "?" in args.url else "?"
    url = f"{args.url}{sep}options=-csearch_path%3D{SCHEMA}"
    with Session(engine) as session:
        _, marketer = create_key(session, role="marketer", name="bench console")
        session.commit()
    process = start_api(url, args.port, admin)
    try:
        pages, people = pages_for(engine, passes)
        ok = measure(f"http://127.0.0.1:{args.port}", marketer, pages, people, args.samples)
    finally:
        process.terminate()
        process.wait(timeout=30)
        engine.dispose()
        if not args.keep:
            admin_engine = make_engine(args.url)
            with admin_engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE'))
            admin_engine.dispose()
    log(f"load average at end: {load_average()}")
    log("every page's p95 within the goal" if ok else "some page's p95 is over the goal")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
