"""JourneyWorkflow on the time-skipping server: a real worker, a fake send activity
registered under the real name, and a real store for the bookkeeping activities."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from temporalio.exceptions import ApplicationError

from core.messages import SendMessageResult
from core.runs import CURRENT_RUNTIME, JourneyRunState
from core.signals import (
    JOURNEY_EVENT_SIGNAL,
    SEGMENT_ENTRY_SIGNAL,
    SEGMENT_EXIT_SIGNAL,
    CustomerEventSignal,
    SegmentSignal,
    journey_workflow_id,
)
from store import runs as run_store
from tests.utils.journey_runtime import (
    CHAMPIONS,
    FakeMessenger,
    client_for,
    definition,
    eventually,
    journey_input,
    journey_worker,
    query_state,
)
from workflows.journey import JourneyWorkflow


def _customer() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


async def _at_step(handle, step: str, waiting: bool = True) -> JourneyRunState:  # noqa: ANN001
    async def check() -> JourneyRunState | None:
        state = await query_state(handle)
        ready = state.step == step and (state.waiting_until is not None or not waiting)
        return state if ready else None

    return await eventually(check, what=f"run reached {step}")


async def _start(client, queue, journey, customer, **kwargs):  # noqa: ANN001, ANN202
    now = await _env_now(client)
    return await client.start_workflow(
        JourneyWorkflow.run,
        journey_input(journey, customer, entered_at=now, **kwargs),
        id=journey_workflow_id(journey.slug, customer),
        task_queue=queue,
    )


_ENV = {}


async def _env_now(client):  # noqa: ANN001, ANN202
    return await _ENV["env"].get_current_time()


def _runs(engine, customer):  # noqa: ANN001, ANN202
    with engine.connect() as conn:
        return run_store.customer_runs(conn, customer_id=customer)


async def test_champions_clicker_and_non_clicker(time_skipping_env, sqlite_engine) -> None:
    _ENV["env"] = time_skipping_env
    client = client_for(time_skipping_env)
    messenger = FakeMessenger(sqlite_engine)
    journey = definition()
    clicker, non_clicker = _customer(), _customer()
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        clicking = await _start(client, queue, journey, clicker)
        ignoring = await _start(client, queue, journey, non_clicker)
        await _at_step(clicking, "wait_click")
        state = await _at_step(ignoring, "wait_click")
        assert state.waiting_for == "click on welcome"
        assert state.waiting_until - state.since == timedelta(days=3)

        await clicking.signal(
            JOURNEY_EVENT_SIGNAL,
            CustomerEventSignal(
                name="email_clicked", step="welcome", occurred_at=await _env_now(client)
            ),
        )
        await time_skipping_env.sleep(timedelta(days=3, hours=1))
        await _at_step(ignoring, "pause")
        assert "reminder" in messenger.for_customer(non_clicker)
        clicked_final = await clicking.result()
        ignored_final = await ignoring.result()

    assert messenger.for_customer(clicker) == ["welcome", "vip", "recs"]
    assert messenger.for_customer(non_clicker) == ["welcome", "reminder", "vip", "recs"]
    assert clicked_final.status == ignored_final.status == "completed"

    (run,) = _runs(sqlite_engine, non_clicker)
    assert run.status == "completed" and run.ended_at is not None
    kinds = [(line.step, line.kind) for line in run.timeline]
    assert kinds == [
        (None, "entered"),
        ("welcome", "sent"),
        ("wait_click", "timer_fired"),
        ("reminder", "sent"),
        ("vip", "sent"),
        ("pause", "timer_fired"),
        ("recs", "sent"),
        ("recs", "completed"),
    ]
    lines = {line.kind: line for line in run.timeline}
    assert lines["entered"].reason == (
        "segment transition 42: entered default:champions (RFM pass 7, R5 F4 M5)"
    )
    timer = run.timeline[2]
    assert timer.reason == "timer fired after 3 days: no click on welcome"
    assert timer.occurred_at - run.timeline[0].occurred_at >= timedelta(days=3)
    reminder = next(c for c in messenger.calls if c.request.step_id == "reminder")
    welcome = next(
        c
        for c in messenger.calls
        if c.request.step_id == "welcome" and c.request.customer_id == non_clicker
    )
    assert reminder.scheduled_at - welcome.scheduled_at >= timedelta(days=3)

    (clicked_run,) = _runs(sqlite_engine, clicker)
    assert [line.kind for line in clicked_run.timeline][:3] == ["entered", "sent", "event_received"]
    assert clicked_run.timeline[2].reason.startswith("click signal on welcome")


async def test_click_before_the_wait_counts(time_skipping_env, sqlite_engine) -> None:
    _ENV["env"] = time_skipping_env
    client = client_for(time_skipping_env)
    customer = _customer()
    handle_box = {}

    def respond(request, previous):  # noqa: ANN001, ANN202
        return SendMessageResult(status="sent")

    messenger = FakeMessenger(sqlite_engine, respond=respond)
    journey = definition()
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        # The click is signalled with the start, before the welcome email is even sent.
        now = await _env_now(client)
        handle_box["h"] = await client.start_workflow(
            JourneyWorkflow.run,
            journey_input(journey, customer, entered_at=now),
            id=journey_workflow_id(journey.slug, customer),
            task_queue=queue,
            start_signal=JOURNEY_EVENT_SIGNAL,
            start_signal_args=[
                CustomerEventSignal(name="email_clicked", step="welcome", occurred_at=now)
            ],
        )
        final = await handle_box["h"].result()
    assert messenger.for_customer(customer) == ["welcome", "vip", "recs"]
    assert final.status == "completed"


async def test_goal_event_converts(time_skipping_env, sqlite_engine) -> None:
    _ENV["env"] = time_skipping_env
    client = client_for(time_skipping_env)
    messenger = FakeMessenger(sqlite_engine)
    journey = definition()
    customer = _customer()
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        handle = await _start(client, queue, journey, customer)
        await _at_step(handle, "wait_click")
        bought_at = await _env_now(client)
        await handle.signal(
            JOURNEY_EVENT_SIGNAL,
            CustomerEventSignal(name="Purchase", occurred_at=bought_at, event_id="e1"),
        )
        final = await handle.result()
    assert final.status == "converted"
    assert final.converted_at == bought_at
    assert messenger.for_customer(customer) == ["welcome"]
    (run,) = _runs(sqlite_engine, customer)
    assert run.status == "converted" and run.converted_at == bought_at
    assert run.timeline[-1].kind == "goal_reached"


async def test_goal_event_before_entry_does_not_convert(time_skipping_env, sqlite_engine) -> None:
    _ENV["env"] = time_skipping_env
    client = client_for(time_skipping_env)
    messenger = FakeMessenger(sqlite_engine)
    journey = definition()
    customer = _customer()
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        handle = await _start(client, queue, journey, customer)
        state = await _at_step(handle, "wait_click")
        await handle.signal(
            JOURNEY_EVENT_SIGNAL,
            CustomerEventSignal(name="Purchase", occurred_at=state.entered_at - timedelta(hours=1)),
        )
        final = await handle.result()
    assert final.status == "completed"
    assert len(final.received) == 1


async def test_exit_on_segment_exit(time_skipping_env, sqlite_engine) -> None:
    _ENV["env"] = time_skipping_env
    client = client_for(time_skipping_env)
    messenger = FakeMessenger(sqlite_engine)
    journey = definition(exit_on_segment_exit=True)
    customer = _customer()
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        handle = await _start(client, queue, journey, customer)
        await _at_step(handle, "wait_click")
        now = await _env_now(client)
        # Leaving another segment changes nothing; leaving the trigger ends the run.
        await handle.signal(
            SEGMENT_EXIT_SIGNAL,
            SegmentSignal(segment="default:regulars", transition_id=50, occurred_at=now),
        )
        state = await query_state(handle)
        assert state.status == "running"
        await handle.signal(
            SEGMENT_EXIT_SIGNAL,
            SegmentSignal(segment="default:champions", transition_id=51, occurred_at=now),
        )
        final = await handle.result()
    assert final.status == "exited"
    assert messenger.for_customer(customer) == ["welcome"]
    (run,) = _runs(sqlite_engine, customer)
    assert run.status == "exited"
    assert run.timeline[-1].reason == "segment transition 51: left default:champions"


async def test_segment_exit_ignored_without_exit_on_segment_exit(
    time_skipping_env, sqlite_engine
) -> None:
    _ENV["env"] = time_skipping_env
    client = client_for(time_skipping_env)
    messenger = FakeMessenger(sqlite_engine)
    journey = definition()
    customer = _customer()
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        handle = await _start(client, queue, journey, customer)
        await _at_step(handle, "wait_click")
        await handle.signal(
            SEGMENT_EXIT_SIGNAL,
            SegmentSignal(
                segment="default:champions", transition_id=51, occurred_at=await _env_now(client)
            ),
        )
        final = await handle.result()
    assert final.status == "completed"
    assert messenger.for_customer(customer) == ["welcome", "reminder", "vip", "recs"]


async def test_repeated_entry_is_a_no_op(time_skipping_env, sqlite_engine) -> None:
    _ENV["env"] = time_skipping_env
    client = client_for(time_skipping_env)
    messenger = FakeMessenger(sqlite_engine)
    journey = definition()
    customer = _customer()
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        handles = []
        for transition_id in (70, 71):
            now = await _env_now(client)
            handles.append(
                await client.start_workflow(
                    JourneyWorkflow.run,
                    journey_input(journey, customer, entered_at=now, transition_id=transition_id),
                    id=journey_workflow_id(journey.slug, customer),
                    task_queue=queue,
                    start_signal=SEGMENT_ENTRY_SIGNAL,
                    start_signal_args=[
                        SegmentSignal(
                            segment="default:champions",
                            transition_id=transition_id,
                            occurred_at=now,
                        )
                    ],
                )
            )
            await _at_step(handles[-1], "wait_click")
        assert handles[0].result_run_id == handles[1].result_run_id
        final = await handles[0].result()
    assert messenger.for_customer(customer) == ["welcome", "reminder", "vip", "recs"]
    assert final.status == "completed"
    (run,) = _runs(sqlite_engine, customer)
    assert run.entry_transition_id == 70
    assert [line.kind for line in run.timeline].count("entered") == 1


async def test_deferred_send_sleeps_until_deferred_until(time_skipping_env, sqlite_engine) -> None:
    _ENV["env"] = time_skipping_env
    client = client_for(time_skipping_env)
    window: dict[str, object] = {}

    def respond(request, previous):  # noqa: ANN001, ANN202
        if request.step_id == "welcome" and "until" not in window:
            window["until"] = _ENV["now"] + timedelta(hours=9)
            return SendMessageResult(
                status="deferred", reason="quiet hours", deferred_until=window["until"]
            )
        return SendMessageResult(status="sent")

    messenger = FakeMessenger(sqlite_engine, respond=respond)
    journey = definition(
        steps={"welcome": {"type": "email", "template": "champions/welcome.html", "next": None}},
        goal=None,
        quiet_hours={"start": "21:00", "end": "08:00"},
    )
    customer = _customer()
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        _ENV["now"] = await _env_now(client)
        handle = await _start(client, queue, journey, customer)
        state = await _at_step(handle, "welcome")
        assert state.waiting_for == "send window (quiet hours)"
        assert state.waiting_until == window["until"]
        final = await handle.result()
    first, second = [c for c in messenger.calls if c.request.customer_id == customer]
    assert first.request.quiet_hours is not None
    assert second.scheduled_at >= window["until"]
    assert second.request.seq > first.request.seq
    assert first.request.idempotency_key == second.request.idempotency_key
    assert final.status == "completed"


async def test_skipped_and_failed_sends_go_on(time_skipping_env, sqlite_engine) -> None:
    _ENV["env"] = time_skipping_env
    client = client_for(time_skipping_env)

    def respond(request, previous):  # noqa: ANN001, ANN202
        status = {"welcome": "skipped", "reminder": "failed", "vip": "in_doubt"}
        return SendMessageResult(status=status.get(request.step_id, "sent"), reason="unsubscribed")

    messenger = FakeMessenger(sqlite_engine, respond=respond)
    journey = definition()
    customer = _customer()
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        handle = await _start(client, queue, journey, customer)
        final = await handle.result()
    assert messenger.for_customer(customer) == ["welcome", "reminder", "vip", "recs"]
    assert final.status == "completed"


async def test_continue_as_new_carries_state(time_skipping_env, sqlite_engine) -> None:
    _ENV["env"] = time_skipping_env
    client = client_for(time_skipping_env)
    messenger = FakeMessenger(sqlite_engine)
    steps = {
        f"d{i}": {"type": "delay", "duration": "PT1H", "next": f"d{i + 1}" if i < 5 else "wait"}
        for i in range(6)
    }
    steps["wait"] = {
        "type": "wait_for_event",
        "event": "Review",
        "timeout": "P2D",
        "on_event": "thanks",
        "on_timeout": None,
    }
    steps["thanks"] = {"type": "email", "template": "champions/share_story.html", "next": None}
    journey = definition(start="d0", steps=steps, goal=None)
    customer = _customer()
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        handle = await _start(client, queue, journey, customer, threshold=25)
        await time_skipping_env.sleep(timedelta(hours=7))
        before = await _at_step(handle, "wait")
        waiting_run = (await client.get_workflow_handle(handle.id).describe()).run_id
        # Signals during the wait grow the history past the threshold: it continues as
        # new in the middle of the wait and keeps the same deadline.
        for n in range(12):
            await handle.signal(
                JOURNEY_EVENT_SIGNAL,
                CustomerEventSignal(
                    name="PageView", occurred_at=await _env_now(client), event_id=f"p{n}"
                ),
            )

        async def continued() -> bool:
            description = await client.get_workflow_handle(handle.id).describe()
            return description.run_id != waiting_run

        await eventually(continued, what="continue-as-new")
        latest = client.get_workflow_handle_for(JourneyWorkflow.run, handle.id)
        after = await _at_step(latest, "wait")
        assert after.waiting_until == before.waiting_until
        assert after.run_id == handle.first_execution_run_id
        await latest.signal(
            JOURNEY_EVENT_SIGNAL,
            CustomerEventSignal(name="Review", occurred_at=await _env_now(client)),
        )
        final = await latest.result()
    assert final.status == "completed"
    assert messenger.for_customer(customer) == ["thanks"]
    assert {c.request.run_id for c in messenger.calls} == {handle.first_execution_run_id}
    (run,) = _runs(sqlite_engine, customer)
    assert run.run_id == handle.first_execution_run_id and run.status == "completed"
    seqs = [line.seq for line in run.timeline]
    assert seqs == list(range(len(seqs)))
    assert [line.kind for line in run.timeline].count("timer_fired") == 6
    assert run.timeline[-3].kind == "event_received"


def test_champions_template_steps_exist() -> None:
    # The test definition is the Champions flow of docs/journeys.md without its story
    # steps; keep it a valid definition.
    assert definition().steps.keys() == CHAMPIONS["steps"].keys()


@pytest.mark.parametrize("runtime", [1, CURRENT_RUNTIME])
async def test_a_send_that_fails_for_good_keeps_the_whole_timeline(
    time_skipping_env, sqlite_engine, runtime: int
) -> None:
    _ENV["env"] = time_skipping_env
    client = client_for(time_skipping_env)

    def refuse(request, previous):  # noqa: ANN001, ANN202
        raise ApplicationError("the send cannot be made", non_retryable=True)

    messenger = FakeMessenger(sqlite_engine, respond=refuse)
    customer = _customer()
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        handle = await _start(client, queue, definition(), customer, runtime=runtime)
        state = await handle.result()
    assert state.status == "failed"
    [run] = _runs(sqlite_engine, customer)
    # Runtime 2 handed the entry line to the send, which never wrote it: the run's own
    # write of its failure carries it.
    assert [(line.seq, line.kind) for line in run.timeline] == [(0, "entered"), (2, "failed")]
    assert (run.status, run.step) == ("failed", "welcome")
