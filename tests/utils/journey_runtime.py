"""Helpers for the journey runtime tests: a fake send activity, a worker, store rows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.engine import Engine
from temporalio import activity
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from activities.dispatch import TransitionDispatcher
from activities.runs import RunActivities
from core.journeys import JourneyDefinition
from core.messages import SEND_MESSAGE_ACTIVITY, SendMessageInput, SendMessageResult
from core.runs import (
    CURRENT_RUNTIME,
    JourneyEntry,
    JourneyInput,
    JourneyRunState,
    RunIdentity,
    RunLine,
)
from core.tables import Customer, Segment, utcnow
from store import runs as run_store
from workflows.dispatch import DispatcherWorkflow
from workflows.journey import JourneyWorkflow

CHAMPIONS = {
    "slug": "champions-nurture",
    "name": "Champions RFM campaign",
    "trigger": {"segment": "default:champions"},
    "goal": {"event": "Purchase", "within": "P30D"},
    "exit_on_segment_exit": False,
    "reentry": {"policy": "after_completion", "cooldown": "P30D"},
    "start": "welcome",
    "steps": {
        "welcome": {"type": "email", "template": "champions/welcome.html", "next": "wait_click"},
        "wait_click": {
            "type": "wait_for_event",
            "event": "email_clicked",
            "of_step": "welcome",
            "timeout": "P3D",
            "on_event": "vip",
            "on_timeout": "reminder",
        },
        "reminder": {"type": "email", "template": "champions/reminder.html", "next": "vip"},
        "vip": {"type": "email", "template": "champions/vip_rewards.html", "next": "pause"},
        "pause": {"type": "delay", "duration": "P2D", "next": "recs"},
        "recs": {"type": "email", "template": "champions/recommendations.html", "next": None},
    },
}


def definition(base: dict[str, Any] | None = None, **changes: Any) -> JourneyDefinition:
    """A journey definition: the Champions flow of docs/journeys.md without its story
    steps, with top-level changes."""
    raw = {**(base or CHAMPIONS), **changes}
    return JourneyDefinition.model_validate(raw)


def client_for(env: Any) -> Client:
    """The environment's client with the product's pydantic data converter."""
    config = env.client.config()
    config["data_converter"] = pydantic_data_converter
    return Client(**config)


@dataclass
class SendCall:
    request: SendMessageInput
    scheduled_at: datetime


@dataclass
class FakeMessenger:
    """Registered under the real `send_message` name; records each call and, like the
    real one, writes the run's bookkeeping it is handed and the run-timeline line at the
    `seq` it is given."""

    engine: Engine
    respond: Callable[[SendMessageInput, int], SendMessageResult] | None = None
    calls: list[SendCall] = field(default_factory=list)

    def for_customer(self, customer_id: str) -> list[str]:
        return [c.request.step_id for c in self.calls if c.request.customer_id == customer_id]

    @activity.defn(name=SEND_MESSAGE_ACTIVITY)
    async def send_message(self, request: SendMessageInput) -> SendMessageResult:
        previous = sum(
            1 for c in self.calls if c.request.idempotency_key == request.idempotency_key
        )
        self.calls.append(SendCall(request, activity.info().current_attempt_scheduled_time))
        result = (
            self.respond(request, previous)
            if self.respond
            else SendMessageResult(status="sent", subject=f"subject of {request.template}")
        )
        line = RunLine(
            seq=request.seq,
            step=request.step_id,
            kind=result.status,
            reason=f"{result.status} {request.channel} {request.template}",
            occurred_at=activity.info().current_attempt_scheduled_time,
        )
        run = RunIdentity(
            workflow_id=request.workflow_id,
            run_id=request.run_id,
            journey_slug=request.journey_slug,
            version=request.version,
            customer_id=request.customer_id,
            entered_at=activity.info().current_attempt_scheduled_time,
        )

        def write() -> None:
            with self.engine.begin() as conn:
                progress = request.progress
                if progress is not None:
                    # As the real send does: the run's bookkeeping it was handed.
                    run_store.record_progress(
                        conn, run=progress.run, lines=progress.lines, position=progress.position
                    )
                run_store.append_run_events(conn, run=run, lines=[line])

        await asyncio.to_thread(write)
        return result


@asynccontextmanager
async def journey_worker(
    client: Client,
    engine: Engine,
    messenger: Any,
    *,
    task_queue: str | None = None,
    dispatcher: TransitionDispatcher | None = None,
) -> AsyncIterator[str]:
    """A worker on a fresh task queue with the journey workflows and activities."""
    queue = task_queue or f"journeys-test-{uuid.uuid4()}"
    activities: list[Any] = [messenger.send_message, *RunActivities(engine).all()]
    if dispatcher is not None:
        activities += dispatcher.activities()
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with Worker(
            client,
            task_queue=queue,
            workflows=[JourneyWorkflow, DispatcherWorkflow],
            activities=activities,
            activity_executor=executor,
        ):
            try:
                yield queue
            finally:
                await terminate_running_runs(client, engine)


async def terminate_running_runs(client: Client, engine: Engine) -> None:
    """End the runs a test left waiting: on the shared time-skipping server a timer of
    a run whose worker is gone would hold time still for every later test."""
    with engine.connect() as conn:
        running = conn.execute(
            text("SELECT DISTINCT workflow_id FROM journey_runs WHERE status = 'running'")
        ).scalars()
        workflow_ids = list(running)
    for workflow_id in workflow_ids:
        with suppress(RPCError):
            await client.get_workflow_handle(workflow_id).terminate("test over")


def journey_input(
    definition: JourneyDefinition,
    customer_id: str,
    *,
    entered_at: datetime,
    version: int = 1,
    threshold: int = 2_000,
    transition_id: int | None = 42,
    context: dict[str, Any] | None = None,
    runtime: int = CURRENT_RUNTIME,
) -> JourneyInput:
    return JourneyInput(
        journey_slug=definition.slug,
        version=version,
        customer_id=customer_id,
        definition=definition,
        entry=JourneyEntry(
            segment=definition.trigger.segment,
            transition_id=transition_id,
            occurred_at=entered_at,
            source="rfm-pass:7",
            context=context if context is not None else {"r": 5, "f": 4, "m": 5},
        ),
        history_event_threshold=threshold,
        runtime=runtime,
    )


def add_customers(engine: Engine, ids: list[str], attributes: dict[str, Any] | None = None) -> None:
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(Customer.__table__),
            [
                {
                    "id": customer_id,
                    "email": f"{customer_id}@example.com",
                    "attributes": attributes or {},
                    "created_at": now,
                    "updated_at": now,
                }
                for customer_id in ids
            ],
        )


def add_segment(engine: Engine, slug: str) -> None:
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(Segment.__table__).values(
                slug=slug, name=slug, kind="external", version=1, created_at=now, updated_at=now
            )
        )


async def query_state(handle: Any, *, attempts: int = 5) -> JourneyRunState:
    """A run's `state` query, asked again when it times out: the test server now and then
    lets a query sent as a run starts (seen right after a continue-as-new) run out its
    deadline, and the next one is answered. The client's own deadline comes back as
    CANCELLED ("Timeout expired"), the server's as DEADLINE_EXCEEDED."""
    for attempt in range(1, attempts + 1):
        try:
            return await handle.query(JourneyWorkflow.state, rpc_timeout=timedelta(seconds=10))
        except RPCError as exc:
            timed_out = (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED)
            if exc.status not in timed_out or attempt == attempts:
                raise
    raise AssertionError("attempts must be at least 1")


async def eventually(check: Callable[[], Any], *, what: str, attempts: int = 400) -> Any:
    """Poll `check` until it returns something truthy (the worker runs concurrently)."""
    for _ in range(attempts):
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")
