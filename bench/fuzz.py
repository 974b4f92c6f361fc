"""Hostile requests against the whole product (`journeys dev`: Temporal dev server, worker,
API), on SQLite and on PostgreSQL, counted per route and per class of input.

Each request is a valid body with one member (or a query parameter) replaced by hostile
JSON (tests/utils/hostile.py). The script counts answers of 5xx, refused requests that
stored anything (rows of every table before and after each 4xx; a bulk request must store
exactly the lines it accepted), and then whether real time still flows: a fresh purchase
of a new customer must reach the segment `buyers` within 2 s, timed beside the same
purchase's time on a clean stack measured first in the same run (the ceiling).

    python -m bench.fuzz --requests 20000 --db both

Run by hand on a quiet machine; it is never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.engine import Engine

from bench.stores import bench_store
from devstack import DevStack
from tests.utils.hostile import (
    CONDITION,
    CUSTOMER,
    JOURNEY,
    MODEL,
    SEGMENT,
    dumps,
    hostile_bodies,
    hostile_values,
    purchase,
)
from tests.utils.live_api import free_port

TABLES = ("events", "customers", "segments", "rfm_models", "journeys", "templates", "api_keys")
BUYERS = {"event": "Purchase", "count": {"gte": 1}, "within": "P30D"}
REALTIME_DEADLINE_S = 2.0


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    role: str
    valid: Any = None
    query: str | None = None
    bulk: bool = False


ROUTES = [
    Route("POST", "/v1/events", "ingest", purchase()),
    Route("POST", "/v1/events/bulk", "ingest", purchase(), bulk=True),
    Route("PUT", "/v1/customers/fuzz-c", "ingest", CUSTOMER),
    Route("PATCH", "/v1/customers/fuzz-c", "ingest", CUSTOMER),
    Route("POST", "/v1/customers/bulk", "ingest", {"customer_id": "fuzz-b", **CUSTOMER}, bulk=True),
    Route("POST", "/v1/segments", "marketer", SEGMENT),
    Route(
        "PUT", "/v1/segments/fuzz-seg", "marketer", {k: SEGMENT[k] for k in ("name", "condition")}
    ),
    Route("POST", "/v1/segments/preview", "marketer", {"condition": CONDITION}),
    Route("POST", "/v1/segments/fuzz-ext/entries", "ingest", {"customer_ids": ["a", "b"]}),
    Route("POST", "/v1/rfm-models", "marketer", MODEL),
    Route("POST", "/v1/rfm-models/fuzz-model/score", "marketer", {"as_of": "2026-11-20T00:00:00Z"}),
    Route("POST", "/v1/journeys", "marketer", JOURNEY),
    Route("POST", "/v1/journeys/validate", "marketer", JOURNEY),
    Route("PUT", "/v1/journeys/fuzz-journey", "marketer", {**JOURNEY, "slug": "fuzz-journey"}),
    Route(
        "POST",
        "/v1/templates",
        "marketer",
        {"path": "fuzz/t.txt", "source": "Hi {{ name }}, {{ customer.email | default('') }}"},
    ),
    Route("GET", "/v1/segments/buyers/members", "support", query="cursor"),
    Route("GET", "/v1/segments/buyers/transitions", "support", query="since"),
    Route("GET", "/v1/journeys/fuzz-journey/analytics", "marketer", query="version"),
    Route("GET", "/v1/outbox", "support", query="customer_id"),
    Route("GET", "/v1/health/failures", "support", query="cursor"),
]


@dataclass
class Tally:
    answers: Counter[str] = field(default_factory=Counter)
    stored_when_refused: int = 0

    def add(self, status: int, stored: bool) -> None:
        self.answers["2xx" if status < 300 else "4xx" if status < 500 else "5xx"] += 1
        self.stored_when_refused += stored


@dataclass
class Run:
    db: str
    by_route: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    by_class: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    server_errors: list[str] = field(default_factory=list)
    stored_refusals: list[str] = field(default_factory=list)
    not_sent: Counter[str] = field(default_factory=Counter)


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in TABLES}


def keys(client: httpx.Client) -> dict[str, str]:
    made = {}
    for role in ("marketer", "ingest", "support"):
        answer = client.post("/v1/keys", json={"role": role, "name": f"fuzz-{role}"})
        answer.raise_for_status()
        made[role] = answer.json()["key"]
    return made


def prepare(client: httpx.Client, auth: Callable[[str], dict[str, str]]) -> None:
    """What the routes above name: segments, an external segment, a model, a journey."""
    for body in (
        {"slug": "buyers", "name": "Buyers", "condition": BUYERS},
        {"slug": "fuzz-seg", "name": "Fuzz", "condition": BUYERS},
        {"slug": "fuzz-ext", "name": "External", "owner": "external"},
    ):
        client.post("/v1/segments", json=body, headers=auth("marketer")).raise_for_status()
    model = {**MODEL, "slug": "fuzz-model"}
    client.post("/v1/rfm-models", json=model, headers=auth("marketer")).raise_for_status()
    journey = {**JOURNEY, "slug": "fuzz-journey"}
    answer = client.post("/v1/journeys", json=journey, headers=auth("marketer"))
    if answer.status_code != 201:
        raise RuntimeError(f"the fuzz journey was refused: {answer.text}")


def realtime_seconds(client: httpx.Client, auth: Callable[[str], dict[str, str]]) -> float:
    """From the POST of a new customer's purchase to its membership of `buyers`."""
    customer = f"fresh-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    answer = client.post(
        "/v1/events", json=purchase(f"e-{customer}", customer), headers=auth("ingest")
    )
    answer.raise_for_status()
    while time.monotonic() - started < 30:
        profile = client.get(f"/v1/customers/{customer}", headers=auth("support")).json()
        if any(s["segment"] == "buyers" for s in profile.get("segments", [])):
            return time.monotonic() - started
        time.sleep(0.02)
    return float("inf")


def one_request(
    client: httpx.Client,
    engine: Engine,
    auth: Callable[[str], dict[str, str]],
    route: Route,
    hostile: Any,
    run: Run,
) -> None:
    label = f"{route.method} {route.path}"
    if route.query is not None:
        kind = hostile.kind
        value = hostile.value if isinstance(hostile.value, str) else str(hostile.value)
        # An HTTP client will not send a longer URL; past 2,048 characters is out of bounds.
        value = value[:4_096]
        before = counts(engine)
        # Percent-encoded by hand: a lone surrogate travels as the bytes a client could send.
        query = f"{route.query}={quote(value.encode('utf-8', 'surrogatepass'))}"
        answer = client.request(route.method, f"{route.path}?{query}", headers=auth(route.role))
        stored = answer.status_code >= 400 and counts(engine) != before
    else:
        body, what, _where = hostile
        kind = what.kind
        content = dumps(body)
        headers = {**auth(route.role), "Content-Type": "application/json"}
        if route.bulk:
            first = (
                purchase(f"bulk-{uuid.uuid4().hex}", "bulk-c")
                if "events" in route.path
                else {"customer_id": f"bulk-{uuid.uuid4().hex[:8]}", **CUSTOMER}
            )
            content = json.dumps(first).encode() + b"\n" + content
            headers["Content-Type"] = "application/x-ndjson"
        before = counts(engine)
        answer = client.request(route.method, route.path, content=content, headers=headers)
        after = counts(engine)
        if route.bulk and answer.status_code in (200, 422):
            table = "events" if "events" in route.path else "customers"
            accepted = answer.json().get("accepted", 0)
            stored = table == "events" and after[table] - before[table] != accepted
        else:
            stored = answer.status_code >= 400 and after != before
    run.by_route[label].add(answer.status_code, stored)
    run.by_class[kind].add(answer.status_code, stored)
    if answer.status_code >= 500:
        run.server_errors.append(f"{label} [{kind}] {answer.status_code} {answer.text[:200]}")
    if stored:
        run.stored_refusals.append(f"{label} [{kind}] {answer.status_code} {answer.text[:200]}")


def fuzz(args: argparse.Namespace, db: str) -> tuple[Run, float, float, int]:
    workdir = Path(tempfile.mkdtemp(prefix=f"journeys-fuzz-{db}-"))
    schema = f"fuzz_{uuid.uuid4().hex[:8]}"
    engine = bench_store(
        db=db, url=args.url, sqlite_path=str(workdir / "journeys.db"), schema=schema, reuse=False
    )
    os.environ["JOURNEYS_DATABASE_URL"] = engine.url.render_as_string(hide_password=False)
    temporal_port = free_port()
    stack = DevStack(workdir, free_port(), temporal_port, free_port())
    run = Run(db)
    try:
        stack.start()
        admin = {"Authorization": f"Bearer {(workdir / 'admin-key').read_text().strip()}"}
        with httpx.Client(base_url=stack.api_url, timeout=60, headers=admin) as client:
            made = keys(client)

            def auth(role: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {made[role]}"}

            prepare(client, auth)
            clean = min(realtime_seconds(client, auth) for _ in range(3))
            print(
                f"[{db}] clean stack: a purchase reaches its segment in {clean:.3f} s", flush=True
            )
            requests = st.sampled_from(ROUTES).flatmap(
                lambda r: (hostile_values if r.query else hostile_bodies(r.valid)).map(
                    lambda h: (r, h)
                )
            )
            done = [0]

            @seed(args.seed)
            @settings(
                max_examples=args.requests,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(request=requests)
            def send(request: tuple[Route, Any]) -> None:
                route, hostile = request
                try:
                    one_request(client, engine, auth, route, hostile, run)
                except Exception as exc:  # noqa: BLE001 - counted, never Hypothesis's report
                    run.not_sent[f"{route.method} {route.path}: {type(exc).__name__}"] += 1
                done[0] += 1
                if done[0] % 2000 == 0:
                    print(f"[{db}] {done[0]:,} requests", flush=True)

            send()
            time.sleep(1)  # let the real-time loop take what the run left pending
            after = min(realtime_seconds(client, auth) for _ in range(3))
            failures = client.get("/v1/health/failures?limit=500", headers=auth("support")).json()
    finally:
        stack.stop()
        os.environ.pop("JOURNEYS_DATABASE_URL", None)
    return run, clean, after, len(failures.get("data", []))


def report(run: Run, clean: float, after: float, set_aside: int) -> bool:
    total = sum(sum(t.answers.values()) for t in run.by_route.values())
    print(f"\n== {run.db}: {total:,} hostile requests ==")
    for title, table in (("route", run.by_route), ("class of input", run.by_class)):
        print(f"{title:<44} {'n':>6} {'2xx':>6} {'4xx':>6} {'5xx':>5} {'stored-when-refused':>20}")
        for name, tally in sorted(table.items()):
            a = tally.answers
            print(
                f"{name:<44} {sum(a.values()):>6} {a['2xx']:>6} {a['4xx']:>6} {a['5xx']:>5}"
                f" {tally.stored_when_refused:>20}"
            )
    fives = sum(t.answers["5xx"] for t in run.by_route.values())
    stored = sum(t.stored_when_refused for t in run.by_route.values())
    print(f"5xx answers: {fives}; refused requests that stored anything: {stored}")
    for line in (run.server_errors + run.stored_refusals)[:20]:
        print("  ", line)
    for reason, n in run.not_sent.items():
        print(f"   not sent (the client refused): {n} x {reason}")
    print(
        f"a fresh purchase reaches its segment: {after:.3f} s after the run"
        f" (clean stack, same run: {clean:.3f} s; goal <= {REALTIME_DEADLINE_S} s);"
        f" records set aside: {set_aside}"
    )
    return fives == 0 and stored == 0 and after <= REALTIME_DEADLINE_S


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=20_000, help="hostile requests per database"
    )
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--seed", type=int, default=20261205)
    args = parser.parse_args()
    random.seed(args.seed)
    ok = True
    for db in ("sqlite", "postgres") if args.db == "both" else (args.db,):
        ok &= report(*fuzz(args, db))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
