"""The real journey workflow's send step inside Temporal, with the real send_message and
run bookkeeping activities: a worker process SIGKILLed between the provider call and the
activity's completion, and deferrals (quiet hours, frequency cap) slept on durable timers
on the time-skipping server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy.engine import Engine
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from activities.messaging import MessagingActivities
from api.app import create_app
from core.journeys import JourneyDefinition
from core.runs import JourneyRunState
from core.signals import journey_workflow_id
from store import runs as run_store
from store.runs import TimelineLine
from tests.utils.journey_runtime import (
    client_for,
    definition,
    journey_input,
    journey_worker,
)
from tests.utils.messaging import (
    ProviderStub,
    SendGridSigner,
    add_customer,
    message_rows,
    provider_settings,
    run_events,
)
from workflows.journey import SEND_HEARTBEAT_TIMEOUT, SEND_TIMEOUT, JourneyWorkflow

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def stub() -> Iterator[ProviderStub]:
    server = ProviderStub().start()
    yield server
    server.stop()


def _journey(*emails: tuple[str, str], **changes: Any) -> JourneyDefinition:
    """A journey of `emails` (step id, template) in a row, with top-level changes."""
    steps = {
        step_id: {
            "type": "email",
            "template": template,
            "next": emails[i + 1][0] if i + 1 < len(emails) else None,
        }
        for i, (step_id, template) in enumerate(emails)
    }
    return definition(start=emails[0][0], steps=steps, goal=None, **changes)


async def _start(
    client: Client, env: Any, journey: JourneyDefinition, customer_id: str, task_queue: str
) -> WorkflowHandle[Any, JourneyRunState]:
    return await client.start_workflow(
        JourneyWorkflow.run,
        journey_input(journey, customer_id, entered_at=await env.get_current_time()),
        id=journey_workflow_id(journey.slug, customer_id),
        task_queue=task_queue,
    )


def _timeline(engine: Engine, customer_id: str) -> list[TimelineLine]:
    with engine.connect() as conn:
        (run,) = run_store.customer_runs(conn, customer_id=customer_id)
    return run.timeline


async def _timers_fired(handle: WorkflowHandle[Any, Any]) -> int:
    history = await handle.fetch_history()
    return sum(1 for e in history.events if e.event_type == EventType.EVENT_TYPE_TIMER_FIRED)


async def _result(
    handle: WorkflowHandle[Any, JourneyRunState], within: timedelta = timedelta(minutes=1)
) -> JourneyRunState:
    # A bound on waiting, not a timed assertion: a run that never ends (a send deferred
    # again and again) fails the test instead of hanging it; the worker's exit ends it.
    try:
        return await asyncio.wait_for(handle.result(), within.total_seconds())
    except TimeoutError:
        raise AssertionError(f"the run did not end within {within}") from None


async def _wait_for(path: Path, process: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
    # Polling for a file the worker writes; not a timed assertion, only a bound on waiting.
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(
                f"worker exited early: {process.stdout.read().decode() if process.stdout else ''}"
            )
        if time.monotonic() > deadline:
            raise AssertionError("the worker never reached the provider")
        await asyncio.sleep(0.05)


async def _send_attempts(handle: WorkflowHandle[Any, Any]) -> list[Any]:
    """The send's ActivityTaskStarted events: the attempt and the failure before it."""
    history = await handle.fetch_history()
    return [
        e.activity_task_started_event_attributes
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]


async def test_worker_killed_after_the_provider_call_sends_once_and_resolves(
    sqlite_engine: Engine, stub: ProviderStub, dev_server_env: Any, tmp_path: Path
) -> None:
    # On the real dev server: the time-skipping one holds its clock while the dead
    # worker's attempt is outstanding, so only real time runs out its timeout.
    env = dev_server_env
    customer_id = f"c-{uuid.uuid4().hex[:8]}"
    add_customer(sqlite_engine, customer_id)
    database_url = sqlite_engine.url.render_as_string(hide_password=False)
    client = client_for(env)
    address = env.client.service_client.config.target_host
    task_queue = f"sigkill-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "provider-answered"
    journey = _journey(("welcome", "champions/welcome.html"))
    # The worker process runs the journey and its activities until it is killed.
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.utils.messaging_worker",
            address,
            task_queue,
            database_url,
            stub.url,
            str(marker),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        handle = await _start(client, env, journey, customer_id, task_queue)
        await _wait_for(marker, process)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert message_rows(sqlite_engine)[0]["status"] == "sending"

        settings = provider_settings(stub, database_url=database_url)
        messaging = MessagingActivities(engine=sqlite_engine, settings=settings)
        async with journey_worker(client, sqlite_engine, messaging, task_queue=task_queue):
            # Nothing tells Temporal the worker died: its heartbeats stop, the attempt
            # runs out the send's heartbeat timeout, and this worker takes the retry.
            final = await _result(handle, within=SEND_HEARTBEAT_TIMEOUT + timedelta(seconds=50))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert final.status == "completed"
    # The dead attempt ended by its heartbeat timeout (seconds), not by the send's
    # start-to-close timeout (minutes). Temporal records only the attempt that finished.
    [retry] = await _send_attempts(handle)
    assert retry.attempt == 2
    assert (
        retry.last_failure.timeout_failure_info.timeout_type == TimeoutType.TIMEOUT_TYPE_HEARTBEAT
    )
    assert SEND_HEARTBEAT_TIMEOUT <= SEND_TIMEOUT / 4
    assert len(stub.of_path("/v3/mail/send")) == 1
    [row] = message_rows(sqlite_engine)
    assert row["status"] == "in_doubt"
    assert [line["kind"] for line in run_events(sqlite_engine)] == [
        "entered",
        "in_doubt",
        "completed",
    ]

    # SendGrid's signed webhook, carrying the key from custom_args, resolves it.
    signer = SendGridSigner.generate()
    app = create_app(
        settings.model_copy(update={"sendgrid_webhook_public_key": signer.public_key_base64}),
        sqlite_engine,
    )
    key = row["idempotency_key"]
    payload = json.dumps(
        [
            {
                "event": "delivered",
                "email": "ada@example.com",
                "timestamp": int(datetime.now(UTC).timestamp()),
                "sg_event_id": "ev-1",
                "idempotency_key": key,
            }
        ]
    ).encode()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as api:
        response = await api.post(
            "/webhooks/sendgrid", content=payload, headers=signer.headers(payload)
        )
    assert response.status_code == 200
    assert message_rows(sqlite_engine)[0]["status"] == "delivered"
    assert len(stub.of_path("/v3/mail/send")) == 1


async def test_quiet_hours_wait_on_a_durable_timer(
    sqlite_engine: Engine, stub: ProviderStub, time_skipping_env: Any
) -> None:
    client = client_for(time_skipping_env)
    # Quiet all day but the minute before midnight in the customer's zone: whenever
    # the test runs, the send waits (on a timer) until 23:59 there, then goes.
    add_customer(sqlite_engine, "c-1", attributes={"first_name": "Ada", "tz": "America/New_York"})
    messaging = MessagingActivities(engine=sqlite_engine, settings=provider_settings(stub))
    journey = _journey(
        ("welcome", "champions/welcome.html"),
        quiet_hours={"start": "00:00", "end": "23:59", "timezone_attribute": "tz"},
    )
    async with journey_worker(client, sqlite_engine, messaging) as task_queue:
        handle = await _start(client, time_skipping_env, journey, "c-1", task_queue)
        final = await _result(handle)
    timeline = _timeline(sqlite_engine, "c-1")
    sends = [line for line in timeline if line.step == "welcome" and line.kind != "completed"]
    new_york = ZoneInfo("America/New_York")
    if sends[0].occurred_at.astimezone(new_york).strftime("%H:%M") == "23:59":
        pytest.skip("the test ran in the one minute that is not quiet")
    assert final.status == "completed"
    assert [line.kind for line in sends] == ["deferred", "sent"]
    until = datetime.fromisoformat(sends[0].detail["deferred_until"])
    assert until.astimezone(new_york).strftime("%H:%M") == "23:59"
    # The run slept on a durable timer until then, and sent after it fired.
    assert await _timers_fired(handle) == 1
    assert sends[1].occurred_at >= until
    assert len(stub.of_path("/v3/mail/send")) == 1
    assert [row["status"] for row in message_rows(sqlite_engine)] == ["sent"]
    assert [line["kind"] for line in run_events(sqlite_engine)] == [
        "entered",
        "deferred",
        "sent",
        "completed",
    ]


async def test_frequency_cap_defers_on_a_durable_timer(
    sqlite_engine: Engine, stub: ProviderStub, time_skipping_env: Any
) -> None:
    client = client_for(time_skipping_env)
    add_customer(sqlite_engine, "c-1")
    messaging = MessagingActivities(engine=sqlite_engine, settings=provider_settings(stub))
    journey = _journey(
        ("welcome", "champions/welcome.html"),
        ("vip", "champions/vip_rewards.html"),
        frequency_cap={"max_messages": 1, "per": "P3D", "action": "defer"},
    )
    async with journey_worker(client, sqlite_engine, messaging) as task_queue:
        handle = await _start(client, time_skipping_env, journey, "c-1", task_queue)
        final = await _result(handle)
    assert final.status == "completed"
    # The second send waited three days of (skipped) time for the first to leave the window.
    timeline = _timeline(sqlite_engine, "c-1")
    sends = [line for line in timeline if line.kind in ("sent", "deferred")]
    assert [(line.step, line.kind) for line in sends] == [
        ("welcome", "sent"),
        ("vip", "deferred"),
        ("vip", "sent"),
    ]
    until = datetime.fromisoformat(sends[1].detail["deferred_until"])
    assert until >= sends[0].occurred_at + timedelta(days=3)
    assert await _timers_fired(handle) == 1
    assert sends[2].occurred_at >= until
    assert [line["kind"] for line in run_events(sqlite_engine)] == [
        "entered",
        "sent",
        "deferred",
        "sent",
        "completed",
    ]
    assert len(stub.of_path("/v3/mail/send")) == 2
    assert [row["status"] for row in message_rows(sqlite_engine)] == ["sent", "sent"]


async def test_a_send_slower_than_its_heartbeat_timeout_is_not_cut_short(
    sqlite_engine: Engine, dev_server_env: Any
) -> None:
    # The provider answers after longer than the heartbeat timeout: the send's own
    # heartbeats keep the attempt alive, so it is sent once, by its first attempt, and not
    # left in doubt by a second attempt started beside it.
    server = ProviderStub(delay_seconds=SEND_HEARTBEAT_TIMEOUT.total_seconds() + 2).start()
    try:
        client = client_for(dev_server_env)
        customer_id = f"c-{uuid.uuid4().hex[:8]}"
        add_customer(sqlite_engine, customer_id)
        settings = provider_settings(server, provider_timeout_seconds=60.0)
        messaging = MessagingActivities(engine=sqlite_engine, settings=settings)
        journey = _journey(("welcome", "champions/welcome.html"))
        async with journey_worker(client, sqlite_engine, messaging) as task_queue:
            handle = await _start(client, dev_server_env, journey, customer_id, task_queue)
            final = await _result(handle)
        [started] = await _send_attempts(handle)
    finally:
        server.stop()
    assert final.status == "completed"
    assert started.attempt == 1
    assert len(server.of_path("/v3/mail/send")) == 1
    assert [row["status"] for row in message_rows(sqlite_engine)] == ["sent"]


async def test_a_send_cancelled_in_flight_still_records_what_the_provider_answered(
    sqlite_engine: Engine, dev_server_env: Any
) -> None:
    # The run is cancelled (its journey archived) while the provider call is in flight.
    # The send's heartbeat brings the cancellation to the activity; it must not cut the
    # send between the provider's answer and its record, which would leave it `sending`.
    server = ProviderStub(delay_seconds=4).start()
    try:
        client = client_for(dev_server_env)
        customer_id = f"c-{uuid.uuid4().hex[:8]}"
        add_customer(sqlite_engine, customer_id)
        messaging = MessagingActivities(engine=sqlite_engine, settings=provider_settings(server))
        journey = _journey(("welcome", "champions/welcome.html"))
        async with journey_worker(client, sqlite_engine, messaging) as task_queue:
            handle = await _start(client, dev_server_env, journey, customer_id, task_queue)
            for _ in range(600):  # a bound on waiting for the request, not a timed assertion
                if server.of_path("/v3/mail/send"):
                    break
                await asyncio.sleep(0.05)
            await handle.cancel()
            # However the run takes it (it records the failed step and ends), it ends.
            with contextlib.suppress(WorkflowFailureError):
                await _result(handle)
            for _ in range(300):  # the attempt records the answer once the provider gives it
                if message_rows(sqlite_engine)[0]["status"] != "sending":
                    break
                await asyncio.sleep(0.05)
    finally:
        server.stop()
    assert len(server.of_path("/v3/mail/send")) == 1
    assert [row["status"] for row in message_rows(sqlite_engine)] == ["sent"]
