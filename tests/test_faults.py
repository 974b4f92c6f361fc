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
import contextlib
import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle

from core.db import make_engine
from core.rfm import RFM_SCORING_WORKFLOW, RfmPassSummary, RfmScoringInput
from tests.conftest import POSTGRES_URL, new_store
from tests.utils.api import settings_for_tests
from tests.utils.cluster import (
    TWO_EMAILS,
    Answers,
    Cluster,
    ProviderFaults,
    add_customers,
    all_runs_ended,
    call,
    chunks,
    cluster,
    count_sends,
    enter,
    journey_histories,
    run_statuses,
    set_up_journey,
    two_email_journey,
    until,
)
from tests.utils.rfm import model_body
from worker import connect_client

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
    c: Cluster, engine: Engine, journey: str, runs: int, kills: int, *, every: float
) -> int:
    """SIGKILL a worker every `every` seconds while runs are in flight, and start it
    again at once, as a supervisor would; the other keeps polling. Returns the kills."""
    rng = random.Random(3)
    done = 0
    while done < kills:
        await asyncio.sleep(every * rng.uniform(0.5, 1.5))
        statuses = run_statuses(engine, journey)
        if sum(statuses.values()) - statuses.get("running", 0) >= runs:
            break  # every run ended: nothing is left to kill in the middle of
        if not statuses.get("running"):
            continue
        name = rng.choice(["worker-1", "worker-2"])
        c.kill(name)
        c.start_worker(name)
        done += 1
    return done


@pytest.mark.parametrize(
    ("customers", "kills"),
    [pytest.param(60, 2, id="short"), pytest.param(1000, 15, id="full", marks=FULL)],
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
            killer = asyncio.create_task(
                _kill_workers(c, engine, "kills", customers, kills, every=2.0)
            )
            await _flow(api, "kills-crm", ids)
            killed = await killer
            await all_runs_ended(engine, "kills", customers, seconds=120 + customers / 2)
        await c.webhook.drained()
        counted = count_sends(c.stub, engine, "kills")
        attempts = (await journey_histories(address, c.task_queue)).attempts
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
    [pytest.param(40, 1, id="short"), pytest.param(1000, 3, id="full", marks=FULL)],
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
    [pytest.param(60, id="short"), pytest.param(1000, id="full", marks=FULL)],
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


# --- PostgreSQL connections cut during bulk ingest, a scoring pass and sends ------------------


class Cutter:
    """Cuts every connection the cluster's processes hold to PostgreSQL (they all connect
    under one application_name), every `every` seconds while it runs."""

    def __init__(self, application_name: str) -> None:
        self.application_name = application_name
        self.admin = make_engine(POSTGRES_URL)
        self.cuts = 0
        self.connections_cut = 0
        self._task: asyncio.Task[None] | None = None

    def cut(self) -> int:
        with self.admin.connect() as conn:
            cut = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = :app AND pid <> pg_backend_pid()"
                ),
                {"app": self.application_name},
            ).scalar_one()
            conn.commit()
        self.cuts += 1
        self.connections_cut += int(cut)
        return int(cut)

    async def _loop(self, every: float) -> None:
        while True:
            await asyncio.to_thread(self.cut)
            await asyncio.sleep(every)

    def start(self, every: float) -> None:
        self._task = asyncio.create_task(self._loop(every))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _purchases(customers: list[str], batch: int, size: int) -> list[dict[str, Any]]:
    moment = datetime.now(UTC) - timedelta(days=1)
    return [
        {
            "event_id": f"b{batch}-{i}",
            "customer_id": customers[(batch * size + i) % len(customers)],
            "name": "Purchase",
            "occurred_at": (moment - timedelta(hours=i % 500)).isoformat(),
            "properties": {"total_price": 10 + i % 90},
        }
        for i in range(size)
    ]


def _count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


async def _pass_retried_or_ended(handle: WorkflowHandle[Any, Any]) -> bool:
    description = await handle.describe()
    if description.status != WorkflowExecutionStatus.RUNNING:
        return True
    pending = description.raw_description.pending_activities
    return bool(pending) and pending[0].attempt >= 2


async def _last_attempt(handle: WorkflowHandle[Any, Any]) -> int:
    history = await handle.fetch_history()
    return max(
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    )


@pytest.mark.parametrize(
    ("customers", "batches", "batch_size", "journeys"),
    [
        pytest.param(1000, 3, 500, 20, id="short"),
        pytest.param(20_000, 20, 5000, 1000, id="full", marks=FULL),
    ],
)
async def test_postgres_connections_cut_during_ingest_scoring_and_sends(
    postgres_engine: Engine,
    tmp_path: Path,
    dev_server_env: Any,
    customers: int,
    batches: int,
    batch_size: int,
    journeys: int,
) -> None:
    engine = postgres_engine
    address = dev_server_env.client.service_client.config.target_host
    application = f"journeys_cut_{uuid.uuid4().hex[:8]}"
    url = f"{_url(engine)}&application_name={application}"
    cutter = Cutter(application)
    answers = Answers()
    ids = _customers("p", customers)
    journey = two_email_journey("cuts", "cuts-crm")
    try:
        async with cluster(tmp_path / "cluster", url, temporal_address=address) as c:
            c.start_api()
            c.start_worker("worker-1")
            await c.ready("api", "worker-1")
            c.webhook.start(f"{c.api_url()}/webhooks/sendgrid")
            async with c.client() as api:
                await set_up_journey(api, journey)
                await add_customers(api, ids)
                model = model_body(slug="cuts")
                assert (await call(api, "POST", "/v1/rfm-models", json=model)).is_success

                # Bulk ingest while the connections are cut: 503s, retried with the same
                # event ids, store every event once.
                cutter.start(every=0.15)
                for batch in range(batches):
                    events = _purchases(ids, batch, batch_size)
                    response = await call(
                        api, "POST", "/v1/events/bulk?realtime=false", answers, json=events
                    )
                    assert response.status_code == 200, response.text
                await cutter.stop()
                stored = _count(engine, "SELECT COUNT(*) FROM events")
                again = await call(
                    api,
                    "POST",
                    "/v1/events/bulk?realtime=false",
                    json=_purchases(ids, 0, batch_size),
                )
                assert again.json()["duplicates"] == batch_size

                # A scoring pass (the worker's, as a schedule starts it) cut until an
                # attempt failed: Temporal runs it again and it scores everyone once.
                temporal = await connect_client(
                    settings_for_tests(temporal_address=address, task_queue=c.task_queue)
                )
                handle = await temporal.start_workflow(
                    RFM_SCORING_WORKFLOW,
                    RfmScoringInput(model_slug="cuts"),
                    id=f"rfm-pass-{uuid.uuid4().hex[:8]}",
                    task_queue=c.task_queue,
                    result_type=RfmPassSummary,
                )
                cutter.start(every=0.05)
                while not await _pass_retried_or_ended(handle):
                    await asyncio.sleep(0.05)
                await cutter.stop()
                summary = await asyncio.wait_for(handle.result(), 300)
                pass_attempt = await _last_attempt(handle)

                # Sends while the connections are cut (and SendGrid's events with them).
                cutter.start(every=0.5)
                await _flow(api, "cuts-crm", ids[:journeys], batch=20, pause=0.2)
                await all_runs_ended(engine, "cuts", journeys, seconds=120 + journeys / 2)
                await cutter.stop()
            await c.webhook.drained()
            counted = count_sends(c.stub, engine, "cuts")
    finally:
        await cutter.stop()
        cutter.admin.dispose()

    # The API answered 503 with Retry-After while its connections were cut; never a 500.
    assert answers.statuses[503] >= 1
    assert set(answers.statuses) <= {200, 201, 503}
    assert set(answers.retry_after) == {"1"}
    assert stored == batches * batch_size
    assert _count(engine, "SELECT COUNT(DISTINCT event_id) FROM events") == stored
    assert pass_attempt >= 2
    assert summary.scored == customers
    assert _count(engine, "SELECT COUNT(*) FROM rfm_scores WHERE model_slug = 'cuts'") == customers
    assert counted.problems(ids[:journeys], TWO_EMAILS) == {}
