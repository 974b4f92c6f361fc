"""The transition dispatcher on the time-skipping server, against a real store:
outbox rows -> signal-with-start of JourneyWorkflow, re-entry policies, exits,
crash-safety, a version change while a run waits."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.engine import Engine

from activities.dispatch import TransitionDispatcher, signal_customer_events
from core.runs import JourneyRunState
from core.signals import journey_workflow_id
from core.tables import SegmentTransition, utcnow
from store import journeys as journey_store
from store import runs as run_store
from store import transitions as transition_store
from tests.utils.journey_runtime import (
    CHAMPIONS,
    FakeMessenger,
    add_customers,
    add_segment,
    client_for,
    eventually,
    journey_worker,
    query_state,
)
from workflows.journey import JourneyWorkflow

SEGMENT = "default:champions"
SHORT = {
    **CHAMPIONS,
    "slug": "short",
    "steps": {"welcome": {"type": "email", "template": "champions/welcome.html", "next": None}},
    "goal": None,
}


def _install(engine: Engine, raw: dict[str, Any]) -> None:
    with engine.begin() as conn:
        journey_store.create_journey(conn, raw=raw)
        journey_store.activate_journey(conn, slug=raw["slug"])


def _new_version(engine: Engine, raw: dict[str, Any]) -> None:
    with engine.begin() as conn:
        journey_store.put_journey(conn, slug=raw["slug"], raw=raw)
        journey_store.activate_journey(conn, slug=raw["slug"])


def _transition(engine: Engine, customers: list[str], kind: str = "entered") -> None:
    # Outbox rows as a scoring pass writes them (written directly: the dispatcher is
    # what is under test, not the membership diff).
    with engine.begin() as conn:
        conn.execute(
            insert(SegmentTransition.__table__),
            [
                {
                    "segment_slug": SEGMENT,
                    "customer_id": customer,
                    "kind": kind,
                    "source": "rfm-pass:3",
                    "context": {"pass_id": 3, "r": 5, "f": 4, "m": 5} if kind == "entered" else {},
                    "occurred_at": utcnow(),
                }
                for customer in customers
            ],
        )


def _undispatched(engine: Engine) -> int:
    with engine.connect() as conn:
        return len(transition_store.fetch_undispatched(conn, limit=1000))


def _runs(engine: Engine, customer: str) -> list[run_store.RunWithTimeline]:
    with engine.connect() as conn:
        return run_store.customer_runs(conn, customer_id=customer)


def _store(engine: Engine, customers: list[str], *journeys: dict[str, Any]) -> None:
    add_segment(engine, SEGMENT)
    add_customers(engine, customers)
    for raw in journeys:
        _install(engine, raw)


def _customers(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"d{i}-{tag}" for i in range(n)]


async def test_entries_start_runs_once_and_survive_a_redispatch(
    time_skipping_env, sqlite_engine
) -> None:
    client = client_for(time_skipping_env)
    customers = _customers(3)
    _store(sqlite_engine, customers, CHAMPIONS)
    _transition(sqlite_engine, customers)
    messenger = FakeMessenger(sqlite_engine)
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        dispatcher = TransitionDispatcher(sqlite_engine, client, task_queue=queue)
        counts = await dispatcher.dispatch_once()
        assert (counts.transitions, counts.entries) == (3, 3)
        assert _undispatched(sqlite_engine) == 0
        for customer in customers:
            handle = client.get_workflow_handle_for(
                JourneyWorkflow.run, journey_workflow_id("champions-nurture", customer)
            )
            description = await handle.describe()

            async def waiting(handle=handle) -> bool:
                state: JourneyRunState = await query_state(handle)
                return state.step == "wait_click" and state.waiting_until is not None

            await eventually(waiting, what=f"{customer} waits for the click")
            (run,) = _runs(sqlite_engine, customer)
            assert run.run_id == description.run_id
            assert run.version == 1 and run.entry_transition_id is not None
            assert run.timeline[0].reason == (
                f"segment transition {run.entry_transition_id}: entered default:champions"
                " (RFM pass 3, R5 F4 M5)"
            )

        # A crash between the signal and the mark: the same transitions come back.
        with sqlite_engine.begin() as conn:
            conn.execute(text("UPDATE segment_transitions SET dispatched_at = NULL"))
        again = await dispatcher.dispatch_once()
        assert (again.transitions, again.entries) == (3, 3)
        assert _undispatched(sqlite_engine) == 0
    for customer in customers:
        assert messenger.for_customer(customer) == ["welcome"]
        assert len(_runs(sqlite_engine, customer)) == 1


async def _complete(client, customer: str, slug: str) -> JourneyRunState:  # noqa: ANN001
    handle = client.get_workflow_handle_for(
        JourneyWorkflow.run, journey_workflow_id(slug, customer)
    )
    return await handle.result()


async def test_reentry_never(time_skipping_env, sqlite_engine) -> None:
    client = client_for(time_skipping_env)
    (customer,) = _customers(1)
    _store(sqlite_engine, [customer], {**SHORT, "reentry": {"policy": "never"}})
    messenger = FakeMessenger(sqlite_engine)
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        dispatcher = TransitionDispatcher(sqlite_engine, client, task_queue=queue)
        _transition(sqlite_engine, [customer])
        assert (await dispatcher.dispatch_once()).entries == 1
        await _complete(client, customer, "short")
        _transition(sqlite_engine, [customer], "exited")
        _transition(sqlite_engine, [customer], "entered")
        counts = await dispatcher.dispatch_once()
        assert (counts.transitions, counts.entries, counts.skipped) == (2, 0, 1)
    assert messenger.for_customer(customer) == ["welcome"]
    assert [run.status for run in _runs(sqlite_engine, customer)] == ["completed"]


async def test_reentry_after_completion_waits_for_the_cooldown(
    time_skipping_env, sqlite_engine
) -> None:
    client = client_for(time_skipping_env)
    (customer,) = _customers(1)
    raw = {**SHORT, "reentry": {"policy": "after_completion", "cooldown": "P1D"}}
    _store(sqlite_engine, [customer], raw)
    messenger = FakeMessenger(sqlite_engine)
    clock = {"now": utcnow()}
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        dispatcher = TransitionDispatcher(
            sqlite_engine, client, task_queue=queue, clock=lambda: clock["now"]
        )
        _transition(sqlite_engine, [customer])
        assert (await dispatcher.dispatch_once()).entries == 1
        first = await _complete(client, customer, "short")
        assert first.ended_at is not None

        clock["now"] = first.ended_at + timedelta(hours=23)
        _transition(sqlite_engine, [customer], "exited")
        _transition(sqlite_engine, [customer], "entered")
        inside = await dispatcher.dispatch_once()
        assert (inside.entries, inside.skipped) == (0, 1)

        clock["now"] = first.ended_at + timedelta(days=1, seconds=1)
        _transition(sqlite_engine, [customer], "exited")
        _transition(sqlite_engine, [customer], "entered")
        after = await dispatcher.dispatch_once()
        assert after.entries == 1
        await _complete(client, customer, "short")
    runs = _runs(sqlite_engine, customer)
    assert [run.status for run in runs] == ["completed", "completed"]
    assert runs[0].run_id != runs[1].run_id
    assert messenger.for_customer(customer) == ["welcome", "welcome"]


async def test_exit_transition_ends_runs_that_exit_on_segment_exit(
    time_skipping_env, sqlite_engine
) -> None:
    client = client_for(time_skipping_env)
    (customer,) = _customers(1)
    leaving = {**CHAMPIONS, "slug": "leaving", "exit_on_segment_exit": True}
    _store(sqlite_engine, [customer], CHAMPIONS, leaving)
    messenger = FakeMessenger(sqlite_engine)
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        dispatcher = TransitionDispatcher(sqlite_engine, client, task_queue=queue)
        _transition(sqlite_engine, [customer])
        assert (await dispatcher.dispatch_once()).entries == 2

        async def both_wait() -> bool:
            runs = _runs(sqlite_engine, customer)
            return len(runs) == 2 and all(r.waiting_for == "click on welcome" for r in runs)

        await eventually(both_wait, what="both runs wait for the click")
        _transition(sqlite_engine, [customer], "exited")
        counts = await dispatcher.dispatch_once()
        assert counts.exit_signals == 1
        final = await _complete(client, customer, "leaving")
        assert final.status == "exited"
        staying = await query_state(
            client.get_workflow_handle_for(
                JourneyWorkflow.run, journey_workflow_id("champions-nurture", customer)
            )
        )
        assert staying.status == "running"


async def test_version_change_while_a_run_waits(time_skipping_env, sqlite_engine) -> None:
    client = client_for(time_skipping_env)
    early, late = _customers(2)
    # Waits of seconds: the runs are started by the dispatcher, so the test does not
    # hold time-skipping handles; the timers simply run out.
    steps = {name: dict(step) for name, step in CHAMPIONS["steps"].items()}
    steps["wait_click"]["timeout"] = "PT3S"
    steps["pause"]["duration"] = "PT1S"
    quick = {**CHAMPIONS, "steps": steps}
    _store(sqlite_engine, [early, late], quick)
    messenger = FakeMessenger(sqlite_engine)
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        dispatcher = TransitionDispatcher(sqlite_engine, client, task_queue=queue)
        _transition(sqlite_engine, [early])
        await dispatcher.dispatch_once()
        await eventually(
            lambda: (
                (_runs(sqlite_engine, early) or [None])[0] is not None
                and _runs(sqlite_engine, early)[0].waiting_for is not None
            ),
            what="the early run waits",
        )
        changed = {
            **steps,
            "reminder": {**steps["reminder"], "template": "champions/share_story.html"},
        }
        _new_version(sqlite_engine, {**quick, "steps": changed})
        _transition(sqlite_engine, [late])
        await dispatcher.dispatch_once()
        for customer in (early, late):
            await _complete(client, customer, "champions-nurture")

    def reminder_of(customer: str) -> str:
        return next(
            c.request.template
            for c in messenger.calls
            if c.request.customer_id == customer and c.request.step_id == "reminder"
        )

    assert reminder_of(early) == "champions/reminder.html"
    assert reminder_of(late) == "champions/share_story.html"
    assert _runs(sqlite_engine, early)[0].version == 1
    assert _runs(sqlite_engine, late)[0].version == 2


async def test_customer_events_reach_the_runs_that_want_them(
    time_skipping_env, sqlite_engine
) -> None:
    client = client_for(time_skipping_env)
    (customer,) = _customers(1)
    _store(sqlite_engine, [customer], CHAMPIONS)
    messenger = FakeMessenger(sqlite_engine)
    async with journey_worker(client, sqlite_engine, messenger) as queue:
        dispatcher = TransitionDispatcher(sqlite_engine, client, task_queue=queue)
        _transition(sqlite_engine, [customer])
        await dispatcher.dispatch_once()
        await eventually(
            lambda: (
                _runs(sqlite_engine, customer)
                and _runs(sqlite_engine, customer)[0].waiting_for == "click on welcome"
            ),
            what="the run waits",
        )
        # The entry time is the transition's (wall clock), so the goal window is too.
        now = utcnow()
        events = [
            {"customer_id": customer, "name": "PageView", "occurred_at": now, "event_id": "v1"},
            {"customer_id": customer, "name": "Purchase", "occurred_at": now, "event_id": "p1"},
            {"customer_id": "nobody", "name": "Purchase", "occurred_at": now, "event_id": "p2"},
        ]
        sent = await signal_customer_events(client, sqlite_engine, events)
        assert sent == 1
        final = await _complete(client, customer, "champions-nurture")
    assert final.status == "converted"
    assert [e.name for e in final.received] == ["Purchase"]
