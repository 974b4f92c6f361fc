"""Faults survived with every message sent exactly once.

Each test runs the product's own processes (`journeys api`, `journeys worker`, a
Temporal dev server) against a stub SendGrid on 127.0.0.1 that the real `sendgrid` client
talks to, breaks something while customers flow through a journey (email, a wait of
seconds, email), and then counts, at the stub and in the store, that every customer got
each of the two messages exactly once and every run completed. Each has a short form in
the default suite and a full one marked `slow`.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.conftest import new_store
from tests.utils.cluster import (
    TWO_EMAILS,
    Cluster,
    ProviderFaults,
    add_customers,
    all_runs_ended,
    chunks,
    cluster,
    count_sends,
    enter,
    run_statuses,
    send_attempts,
    set_up_journey,
    two_email_journey,
    until,
)

# The full forms take minutes, more on a loaded machine.
FULL = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def _customers(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(count)]


async def _flow(
    api: Any, segment: str, ids: list[str], *, batch: int = 50, pause: float = 0.2
) -> None:
    """Customers enter the segment a batch at a time, so runs start all along the test."""
    for some in chunks(ids, batch):
        await enter(api, segment, some)
        await asyncio.sleep(pause)


# --- workers SIGKILLed again and again ------------------------------------------------------


async def _kill_workers(
    c: Cluster, engine: Engine, journey: str, kills: int, *, every: float, seed: int = 3
) -> int:
    """SIGKILL a worker every `every` seconds while runs are in flight, and start it
    again at once, as a supervisor would; the other keeps polling. Returns the kills."""
    rng = random.Random(seed)
    done = 0
    while done < kills:
        await asyncio.sleep(every * rng.uniform(0.5, 1.5))
        if not run_statuses(engine, journey).get("running"):
            if done and sum(run_statuses(engine, journey).values()):
                break  # every run ended: nothing is left to kill in the middle of
            continue
        name = rng.choice(["worker-1", "worker-2"])
        c.kill(name)
        c.start_worker(name)
        done += 1
    return done


@pytest.mark.parametrize(
    ("customers", "kills"),
    [pytest.param(100, 3, id="short"), pytest.param(1000, 15, id="full", marks=FULL)],
)
async def test_workers_killed_again_and_again_mid_journey(
    tmp_path: Path, dev_server_env: Any, customers: int, kills: int
) -> None:
    engine, _ = new_store("sqlite", tmp_path)
    address = dev_server_env.client.service_client.config.target_host
    # `resend`: a send left in doubt by a kill is sent again unless SendGrid's event
    # webhook (the stub reports every message it takes) said it arrived.
    journey = two_email_journey("kills", "kills-crm", in_doubt_policy="resend")
    ids = _customers("k", customers)
    async with cluster(tmp_path / "cluster", _url(engine), temporal_address=address) as c:
        c.start_api()
        c.start_worker("worker-1")
        c.start_worker("worker-2")
        await c.ready("api", "worker-1", "worker-2")
        c.webhook.start(f"{c.api_url()}/webhooks/sendgrid")
        async with c.client() as api:
            await set_up_journey(api, journey)
            await add_customers(api, ids)
            killer = asyncio.create_task(_kill_workers(c, engine, "kills", kills, every=2.0))
            await _flow(api, "kills-crm", ids)
            killed = await killer
            await all_runs_ended(engine, "kills", customers, seconds=120 + customers / 2)
        await c.webhook.drained()
        counted = count_sends(c.stub, engine, "kills")
        attempts = await send_attempts(address, c.task_queue)
    assert killed >= min(kills, 2)
    assert counted.problems(ids, TWO_EMAILS) == {}
    # Sends were in flight at the kills, and were retried once their heartbeats stopped.
    assert attempts["heartbeat timeout"] >= 1
    assert set(attempts) <= {"first", "heartbeat timeout"}


# --- the Temporal dev server killed and started again on its SQLite file ---------------------


async def _kill_temporal(
    c: Cluster, engine: Engine, journey: str, kills: int, *, down_seconds: float = 2.0
) -> int:
    """SIGKILL the dev server while runs are in flight, keep it down a moment, start it
    again on the same port and SQLite file."""
    done = 0
    while done < kills:
        await until(
            lambda: run_statuses(engine, journey).get("running", 0) >= 5,
            "runs in flight",
            120,
            poll=0.2,
        )
        c.kill("temporal")
        await asyncio.sleep(down_seconds)
        c.start_temporal()
        await c.temporal_up()
        done += 1
        await asyncio.sleep(3)
    return done


@pytest.mark.parametrize(
    ("customers", "kills"),
    [pytest.param(60, 1, id="short"), pytest.param(1000, 3, id="full", marks=FULL)],
)
async def test_temporal_killed_and_restarted_on_its_file_mid_journey(
    tmp_path: Path, customers: int, kills: int
) -> None:
    engine, _ = new_store("sqlite", tmp_path)
    journey = two_email_journey("outage", "outage-crm")
    ids = _customers("t", customers)
    async with cluster(tmp_path / "cluster", _url(engine)) as c:
        c.start_api()
        c.start_worker("worker-1")
        await c.ready("api", "worker-1")
        c.webhook.start(f"{c.api_url()}/webhooks/sendgrid")
        async with c.client() as api:
            await set_up_journey(api, journey)
            await add_customers(api, ids)
            killer = asyncio.create_task(_kill_temporal(c, engine, "outage", kills))
            await _flow(api, "outage-crm", ids, batch=20, pause=0.3)
            killed = await killer
            await all_runs_ended(engine, "outage", customers, seconds=120 + customers / 2)
        await c.webhook.drained()
        counted = count_sends(c.stub, engine, "outage")
        restarts = c.members["temporal"].starts - 1
        worker_alive = c.members["worker-1"].alive()
    assert killed == kills == restarts
    assert counted.problems(ids, TWO_EMAILS) == {}
    # The worker rode out the outages: it reconnected rather than died.
    assert worker_alive


# --- the provider failing 20% of requests with 503 and timing out on 5% ----------------------


def _timeline_kinds(engine: Engine, journey: str) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT kind, COUNT(*) FROM run_events WHERE journey_slug = :j GROUP BY 1"),
            {"j": journey},
        ).all()
    return Counter({kind: count for kind, count in rows})


@pytest.mark.parametrize(
    "customers",
    [pytest.param(100, id="short"), pytest.param(1000, id="full", marks=FULL)],
)
async def test_provider_failing_and_timing_out(
    tmp_path: Path, dev_server_env: Any, customers: int
) -> None:
    engine, _ = new_store("sqlite", tmp_path)
    address = dev_server_env.client.service_client.config.target_host
    # A stalled request is one SendGrid took and answered after the client gave up:
    # under the default `skip` policy the retry records it in doubt, and SendGrid's event,
    # a few seconds later, settles it as sent.
    faults = ProviderFaults(fail_rate=0.20, stall_rate=0.05, stall_seconds=2.5)
    journey = two_email_journey("flaky", "flaky-crm")
    ids = _customers("f", customers)
    async with cluster(
        tmp_path / "cluster",
        _url(engine),
        temporal_address=address,
        faults=faults,
        settings={"JOURNEYS_PROVIDER_TIMEOUT_SECONDS": "1.5"},
        webhook_delay_seconds=4.0,
    ) as c:
        c.start_api()
        c.start_worker("worker-1")
        await c.ready("api", "worker-1")
        c.webhook.start(f"{c.api_url()}/webhooks/sendgrid")
        async with c.client() as api:
            await set_up_journey(api, journey)
            await add_customers(api, ids)
            await _flow(api, "flaky-crm", ids, batch=100, pause=0.1)
            await all_runs_ended(engine, "flaky", customers, seconds=120 + customers / 2)
        await c.webhook.drained()
        counted = count_sends(c.stub, engine, "flaky")
    assert counted.problems(ids, TWO_EMAILS) == {}
    # Both faults happened: the 503s were sent again, the time-outs went through the
    # in-doubt path (not resent) and SendGrid's events settled them.
    assert faults.failed >= 1 and faults.stalled >= 1
    assert 1 <= _timeline_kinds(engine, "flaky")["in_doubt"] <= faults.stalled
