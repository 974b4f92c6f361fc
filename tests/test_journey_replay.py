"""Determinism: histories of runs covering every step type replay on today's code.

`test_every_step_type_replays` runs the journeys, replays their fresh histories and,
with JOURNEYS_RECORD_HISTORIES=1, saves them under tests/histories/.
`test_committed_histories_replay` replays the saved ones, so a workflow change that
would break runs in flight fails here (use `workflow.patched()` for such changes).
"""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from core.messages import SendMessageResult
from core.signals import (
    JOURNEY_EVENT_SIGNAL,
    SEGMENT_EXIT_SIGNAL,
    CustomerEventSignal,
    SegmentSignal,
    journey_workflow_id,
)
from store import customers as customer_store
from tests.utils.journey_runtime import (
    FakeMessenger,
    add_customers,
    client_for,
    definition,
    eventually,
    journey_input,
    journey_worker,
    query_state,
)
from workflows.journey import JourneyWorkflow

HISTORIES = Path(__file__).parent / "histories"

EVERY_STEP = {
    "slug": "every-step",
    "name": "Every step type",
    "trigger": {"segment": "default:champions"},
    "goal": {"event": "Purchase", "within": "P30D"},
    "exit_on_segment_exit": True,
    "reentry": {"policy": "never"},
    "start": "hello",
    "steps": {
        "hello": {"type": "sms", "template": "champions/hello.txt", "next": "tag"},
        "tag": {
            "type": "update_attribute",
            "attribute": "journey_stage",
            "value": "welcomed",
            "next": "route",
        },
        "route": {
            "type": "branch",
            "branches": [
                {"condition": {"attribute": "plan", "op": "eq", "value": "vip"}, "next": "vip"},
                {
                    "condition": {"not": {"attribute": "plan", "op": "exists"}},
                    "next": "wait",
                },
            ],
            "default": "bye",
        },
        "vip": {"type": "email", "template": "champions/vip_rewards.html", "next": "done"},
        "done": {"type": "exit"},
        "wait": {
            "type": "wait_for_event",
            "event": "AppOpen",
            "timeout": "PT1H",
            "on_event": "nap",
            "on_timeout": "bye",
        },
        "nap": {"type": "delay", "duration": "PT30M", "next": "welcome"},
        "welcome": {"type": "email", "template": "champions/welcome.html", "next": "click"},
        "click": {
            "type": "wait_for_event",
            "event": "email_clicked",
            "of_step": "welcome",
            "timeout": "P1D",
            "on_event": None,
            "on_timeout": None,
        },
        "bye": {"type": "exit"},
    },
}


def _replayer() -> Replayer:
    return Replayer(workflows=[JourneyWorkflow], data_converter=pydantic_data_converter)


async def test_every_step_type_replays(time_skipping_env, sqlite_engine) -> None:
    client = client_for(time_skipping_env)
    journey = definition(EVERY_STEP)
    tag = uuid.uuid4().hex[:8]
    customers = {
        "vip": f"vip-{tag}",
        "opener": f"opener-{tag}",
        "silent": f"silent-{tag}",
        "buyer": f"buyer-{tag}",
        "leaver": f"leaver-{tag}",
    }
    add_customers(sqlite_engine, [customers["vip"]], {"plan": "vip"})
    add_customers(sqlite_engine, [customers["silent"]], {"plan": "basic"})
    add_customers(sqlite_engine, [customers[k] for k in ("opener", "buyer", "leaver")])
    deferred: set[str] = set()

    def respond(request, previous):  # noqa: ANN001, ANN202
        if request.step_id == "welcome" and request.customer_id not in deferred:
            deferred.add(request.customer_id)
            return SendMessageResult(
                status="deferred",
                reason="frequency cap",
                deferred_until=now + timedelta(hours=2),
            )
        return SendMessageResult(status="sent")

    messenger = FakeMessenger(sqlite_engine, respond=respond)
    handles = {}
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        now = await time_skipping_env.get_current_time()
        for role, customer in customers.items():
            handles[role] = await client.start_workflow(
                JourneyWorkflow.run,
                journey_input(journey, customer, entered_at=now),
                id=journey_workflow_id(journey.slug, customer),
                task_queue=queue,
            )

        async def at_wait(role: str) -> bool:
            state = await query_state(handles[role])
            return state.step == "wait" and state.waiting_until is not None

        for role in ("opener", "buyer", "leaver"):
            await eventually(lambda role=role: at_wait(role), what=f"{role} waits")
        signal_at = await time_skipping_env.get_current_time()
        await handles["opener"].signal(
            JOURNEY_EVENT_SIGNAL, CustomerEventSignal(name="AppOpen", occurred_at=signal_at)
        )
        await handles["buyer"].signal(
            JOURNEY_EVENT_SIGNAL, CustomerEventSignal(name="Purchase", occurred_at=signal_at)
        )
        await handles["leaver"].signal(
            SEGMENT_EXIT_SIGNAL,
            SegmentSignal(segment="default:champions", transition_id=9, occurred_at=signal_at),
        )
        results = {role: await handle.result() for role, handle in handles.items()}

    assert {role: r.status for role, r in results.items()} == {
        "vip": "exited",
        "opener": "completed",
        "silent": "exited",
        "buyer": "converted",
        "leaver": "exited",
    }
    assert messenger.for_customer(customers["vip"]) == ["hello", "vip"]
    assert messenger.for_customer(customers["opener"]) == ["hello", "welcome", "welcome"]
    assert messenger.for_customer(customers["silent"]) == ["hello"]
    with sqlite_engine.connect() as conn:
        stage = customer_store.get_customer(conn, customer_id=customers["silent"])
    assert stage is not None and stage["attributes"]["journey_stage"] == "welcomed"

    histories = [await handle.fetch_history() for handle in handles.values()]
    for history in histories:
        result = await _replayer().replay_workflow(history, raise_on_replay_failure=False)
        assert result.replay_failure is None, (history.workflow_id, result.replay_failure)
    if os.environ.get("JOURNEYS_RECORD_HISTORIES") == "1":
        HISTORIES.mkdir(exist_ok=True)
        for role, history in zip(handles, histories, strict=True):
            (HISTORIES / f"journey_{role}.json").write_text(history.to_json())


async def test_committed_histories_replay() -> None:
    files = sorted(HISTORIES.glob("journey_*.json"))
    if not files:
        pytest.skip("no recorded histories (JOURNEYS_RECORD_HISTORIES=1 records them)")
    for path in files:
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        await _replayer().replay_workflow(history)
