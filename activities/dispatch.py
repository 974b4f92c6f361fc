"""The transition dispatcher: segment entries and exits from the outbox into journey runs.

Entries start `JourneyWorkflow` (id `journey:{slug}:{customer}`) with the conflict
policy "use existing", so a customer already running a journey keeps that run. A
transition is marked dispatched only after Temporal accepted everything it asked for; a
crash in between re-sends it, which that policy makes harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection, Engine
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.outages import riding_out_outages
from core.db import sqlite_writer_role
from core.journeys import JourneyDefinition
from core.observability import TRACE_HANDOFF_WINDOW, client_traces, continued_trace
from core.runs import (
    CURRENT_RUNTIME,
    DISPATCH_TRANSITIONS_ACTIVITY,
    DISPATCHER_WORKFLOW,
    DISPATCHER_WORKFLOW_ID,
    JOURNEY_WORKFLOW,
    DispatchCounts,
    DispatcherInput,
    DispatchTransitionsInput,
    JourneyEntry,
    JourneyInput,
    RunIdentity,
)
from core.settings import Settings
from core.signals import (
    JOURNEY_EVENT_SIGNAL,
    SEGMENT_EXIT_SIGNAL,
    CustomerEventSignal,
    SegmentSignal,
    journey_workflow_id,
)
from core.tables import UTCDateTime, utcnow
from store import journeys as journey_store
from store import runs as run_store
from store import transitions as transition_store
from store.failures import FailureSubject, record_failure
from store.runs import RunSummary
from store.trace_handoffs import recent_handoffs
from store.writer import group_writer

log = logging.getLogger(__name__)

# Errors Temporal will give again however often we ask: the transition is settled.
_PERMANENT_RPC = {RPCStatusCode.INVALID_ARGUMENT, RPCStatusCode.FAILED_PRECONDITION}


@dataclass
class _Start:
    transition_id: int
    journey_slug: str
    version: int
    customer_id: str
    journey_input: JourneyInput
    signal: SegmentSignal
    never_again: bool


@dataclass
class _ExitSignal:
    transition_id: int
    workflow_id: str
    signal: SegmentSignal


@dataclass
class _CustomerPlan:
    """One customer's transitions, done in outbox order."""

    transition_ids: list[int] = field(default_factory=list)
    actions: dict[int, list[_Start | _ExitSignal]] = field(default_factory=dict)
    traceparent: str | None = None  # the trace of the event that led here (tracing on)


@dataclass
class _CustomerOutcome:
    done_ids: list[int] = field(default_factory=list)
    started: list[RunIdentity] = field(default_factory=list)
    counts: DispatchCounts = field(default_factory=DispatchCounts)
    set_aside: list[_SetAside] = field(default_factory=list)


@dataclass
class _SetAside:
    """A transition or journey that failed here: recorded, and the others go on."""

    subject: FailureSubject
    error: BaseException


def _set_aside(subject: FailureSubject, error: BaseException, counts: DispatchCounts) -> _SetAside:
    log.error("%s %s set aside by the dispatcher: %s", subject.kind, subject.key, error)
    counts.failed += 1
    return _SetAside(subject, error)


def reentry_allows(definition: JourneyDefinition, last: RunSummary | None, now: datetime) -> bool:
    """Whether the journey's re-entry policy lets this customer start a run now.

    `never`: never again after any run. `after_completion`: once the last run has ended
    and its cooldown (if any) has passed. A customer whose run is still going is let
    through: starting a run whose id is running keeps the running one.
    """
    if last is None:
        return True
    if definition.reentry.policy == "never":
        return False
    if last.status == "running" or last.ended_at is None:
        return True
    cooldown = definition.reentry.cooldown or timedelta(0)
    return now >= last.ended_at + cooldown


def _normalise(row: Mapping[str, Any]) -> dict[str, Any]:
    # The outbox is read with raw SQL: SQLite hands back JSON and times as text.
    values = dict(row)
    if isinstance(values.get("context"), str):
        values["context"] = json.loads(values["context"])
    values["occurred_at"] = UTCDateTime().process_result_value(values["occurred_at"], None)
    return values


class TransitionDispatcher:
    """Reads undispatched transitions and turns them into journey runs and signals."""

    def __init__(
        self,
        engine: Engine,
        client: Client,
        *,
        task_queue: str,
        concurrency: int = 64,
        history_event_threshold: int = 2_000,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        # The re-entry cooldown is judged against this clock (tests move it).
        self.clock = clock
        self.client = client
        self.task_queue = task_queue
        self.concurrency = concurrency
        self.history_event_threshold = history_event_threshold
        self.traces = client_traces(client)

    async def dispatch_once(self, *, limit: int = 500) -> DispatchCounts:
        """Dispatch up to `limit` of the oldest undispatched transitions."""
        plans, counts, planning_failures = await asyncio.to_thread(self._plan, limit)
        if not plans:
            return counts
        gate = asyncio.Semaphore(self.concurrency)

        async def one(plan: _CustomerPlan) -> _CustomerOutcome:
            async with gate:
                with continued_trace(plan.traceparent):
                    return await self._carry_out(plan)

        outcomes = await asyncio.gather(*(one(plan) for plan in plans.values()))
        done_ids = [i for outcome in outcomes for i in outcome.done_ids]
        started = [run for outcome in outcomes for run in outcome.started]
        set_aside = planning_failures + [s for o in outcomes for s in o.set_aside]
        for outcome in outcomes:
            counts.add(outcome.counts)
        counts.transitions = len(done_ids)
        await asyncio.to_thread(self._settle, started, done_ids, set_aside)
        return counts

    def _plan(self, limit: int) -> tuple[dict[str, _CustomerPlan], DispatchCounts, list[_SetAside]]:
        counts = DispatchCounts()
        set_aside: list[_SetAside] = []
        now = self.clock()
        with self.engine.connect() as conn:
            rows = [_normalise(r) for r in transition_store.fetch_undispatched(conn, limit=limit)]
            if not rows:
                return {}, counts, set_aside
            entered = [r for r in rows if r["kind"] == "entered"]
            exited = [r for r in rows if r["kind"] != "entered"]
            journeys: dict[str, list[Any]] = {}
            for segment in sorted({r["segment_slug"] for r in entered}):
                journeys[segment] = []
                for journey in journey_store.triggered_journeys(conn, segment_slug=segment):
                    if isinstance(journey, journey_store.UnreadableJourney):
                        subject = FailureSubject("journey", journey.slug, "dispatch")
                        set_aside.append(_set_aside(subject, ValueError(journey.error), counts))
                    else:
                        journeys[segment].append(journey)
            last: dict[tuple[str, str], RunSummary] = {}
            for segment, active in journeys.items():
                customers = [r["customer_id"] for r in entered if r["segment_slug"] == segment]
                for journey in active:
                    found = run_store.last_runs(
                        conn, journey_slug=journey.slug, customer_ids=customers
                    )
                    last.update({(journey.slug, c): run for c, run in found.items()})
            running = run_store.running_runs_of_customers(
                conn, customer_ids=[r["customer_id"] for r in exited]
            )
            traces = self._handoffs(conn, entered, now)
        plans: dict[str, _CustomerPlan] = {}
        for row in rows:
            plan = plans.setdefault(
                row["customer_id"], _CustomerPlan(traceparent=traces.get(row["customer_id"]))
            )
            plan.transition_ids.append(row["id"])
            try:
                self._plan_row(row, plan, journeys, last, running, counts, now, set_aside)
            except Exception as exc:  # noqa: BLE001 - set aside: its plan stays empty, so done
                plan.actions[row["id"]] = []
                subject = FailureSubject("transition", str(row["id"]), "dispatch")
                set_aside.append(_set_aside(subject, exc, counts))
        return plans, counts, set_aside

    def _handoffs(self, conn: Any, entered: list[dict[str, Any]], now: datetime) -> dict[str, str]:
        if not self.traces or not entered:
            return {}
        customers = [r["customer_id"] for r in entered]
        return recent_handoffs(conn, customer_ids=customers, since=now - TRACE_HANDOFF_WINDOW)

    def _plan_row(
        self,
        row: dict[str, Any],
        plan: _CustomerPlan,
        journeys: dict[str, list[Any]],
        last: dict[tuple[str, str], RunSummary],
        running: list[tuple[RunSummary, dict[str, Any] | None]],
        counts: DispatchCounts,
        now: datetime,
        set_aside: list[_SetAside],
    ) -> None:
        signal = SegmentSignal(
            segment=row["segment_slug"],
            transition_id=row["id"],
            occurred_at=row["occurred_at"],
            context=row["context"] or {},
        )
        actions: list[_Start | _ExitSignal] = plan.actions.setdefault(row["id"], [])
        if row["kind"] == "entered":
            for journey in journeys.get(row["segment_slug"], []):
                key = (journey.slug, row["customer_id"])
                try:
                    allowed = reentry_allows(journey.definition, last.get(key), now)
                    start = self._start(row, journey, signal) if allowed else None
                except Exception as exc:  # noqa: BLE001 - this journey only, not the entry
                    subject = FailureSubject("journey", journey.slug, "dispatch")
                    set_aside.append(_set_aside(subject, exc, counts))
                    continue
                if start is None:
                    counts.skipped += 1
                    continue
                actions.append(start)
                # A second entry in this same batch meets this run, not the old one.
                last[key] = RunSummary(
                    workflow_id=journey_workflow_id(journey.slug, row["customer_id"]),
                    run_id="",
                    journey_slug=journey.slug,
                    version=journey.version,
                    customer_id=row["customer_id"],
                    status="running",
                    entered_at=row["occurred_at"],
                )
        else:
            for run, definition in running:
                if run.customer_id != row["customer_id"] or not definition:
                    continue
                wants_exit = definition.get("exit_on_segment_exit") and (
                    (definition.get("trigger") or {}).get("segment") == row["segment_slug"]
                )
                if wants_exit:
                    actions.append(_ExitSignal(row["id"], run.workflow_id, signal))

    def _start(self, row: Mapping[str, Any], journey: Any, signal: SegmentSignal) -> _Start:
        definition = journey.definition
        if not isinstance(definition, JourneyDefinition):
            definition = JourneyDefinition.model_validate(definition)
        journey_input = JourneyInput(
            journey_slug=journey.slug,
            version=journey.version,
            customer_id=row["customer_id"],
            definition=definition,
            entry=JourneyEntry(
                segment=row["segment_slug"],
                transition_id=row["id"],
                occurred_at=row["occurred_at"],
                source=row.get("source") or "",
                context=row["context"] or {},
            ),
            history_event_threshold=self.history_event_threshold,
            runtime=CURRENT_RUNTIME,
        )
        return _Start(
            transition_id=row["id"],
            journey_slug=journey.slug,
            version=journey.version,
            customer_id=row["customer_id"],
            journey_input=journey_input,
            signal=signal,
            never_again=definition.reentry.policy == "never",
        )

    async def _carry_out(self, plan: _CustomerPlan) -> _CustomerOutcome:
        outcome = _CustomerOutcome()
        for transition_id in plan.transition_ids:
            try:
                for action in plan.actions.get(transition_id, []):
                    if isinstance(action, _Start):
                        await self._start_run(action, outcome)
                    else:
                        await self.client.get_workflow_handle(action.workflow_id).signal(
                            SEGMENT_EXIT_SIGNAL, action.signal
                        )
                        outcome.counts.exit_signals += 1
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    # The run ended before the exit reached it: nothing left to tell.
                    outcome.done_ids.append(transition_id)
                    continue
                if err.status in _PERMANENT_RPC:
                    log.error("transition %s refused by Temporal: %s", transition_id, err)
                    outcome.counts.failed += 1
                    outcome.done_ids.append(transition_id)
                    continue
                log.warning("transition %s not dispatched yet: %s", transition_id, err)
                # Later transitions of this customer wait, to keep their order.
                break
            except Exception as exc:  # noqa: BLE001 - not Temporal's answer: set it aside
                subject = FailureSubject("transition", str(transition_id), "dispatch")
                outcome.set_aside.append(_set_aside(subject, exc, outcome.counts))
            outcome.done_ids.append(transition_id)
        return outcome

    async def _start_run(self, action: _Start, outcome: _CustomerOutcome) -> None:
        workflow_id = journey_workflow_id(action.journey_slug, action.customer_id)
        try:
            # A running run of this id is kept as it is (a repeated entry changes
            # nothing), so a re-sent transition is harmless. Eager: the server hands the
            # run's first workflow task straight back to this process's worker.
            handle = await self.client.start_workflow(
                JOURNEY_WORKFLOW,
                action.journey_input,
                id=workflow_id,
                task_queue=self.task_queue,
                id_reuse_policy=(
                    WorkflowIDReusePolicy.REJECT_DUPLICATE
                    if action.never_again
                    else WorkflowIDReusePolicy.ALLOW_DUPLICATE
                ),
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                request_eager_start=True,
            )
        except WorkflowAlreadyStartedError:
            # `never` and a closed run of this id exist in Temporal: nothing to start.
            outcome.counts.skipped += 1
            return
        outcome.counts.entries += 1
        # Only a server that says it started a new run gets a row here; otherwise the
        # run's own first bookkeeping write creates it (insert-if-absent either way).
        response = getattr(handle, "_start_workflow_response", None)
        if not getattr(response, "started", False) or not handle.result_run_id:
            return
        outcome.counts.started += 1
        outcome.started.append(
            RunIdentity(
                workflow_id=workflow_id,
                run_id=handle.result_run_id,
                journey_slug=action.journey_slug,
                version=action.version,
                customer_id=action.customer_id,
                entered_at=action.journey_input.entry.occurred_at,
                entry_transition_id=action.transition_id,
            )
        )

    def _settle(
        self, started: Sequence[RunIdentity], done_ids: Sequence[int], set_aside: list[_SetAside]
    ) -> None:
        now = utcnow()

        def settle(conn: Connection) -> None:
            run_store.ensure_runs(conn, identities=started)
            transition_store.mark_dispatched(conn, ids=done_ids, now=now)
            for failure in set_aside:
                record_failure(conn, subject=failure.subject, error=failure.error, now=now)

        # With the process's other writes (store/writer.py): one lock, one commit.
        group_writer(self.engine).run(settle)

    # --- the activity --------------------------------------------------------------

    @activity.defn(name=DISPATCH_TRANSITIONS_ACTIVITY)
    async def dispatch_transitions(self, request: DispatchTransitionsInput) -> DispatchCounts:
        """Dispatch transitions for `run_for_seconds`, heartbeating, then return."""
        total = DispatchCounts()
        sqlite_writer_role.set("dispatcher")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.run_for_seconds
        self.task_queue = request.task_queue
        self.concurrency = request.concurrency
        self.history_event_threshold = request.history_event_threshold

        async def keep_heartbeating() -> None:
            # A large batch against a slow server can outlast the heartbeat timeout.
            while True:
                activity.heartbeat(total.model_dump())
                await asyncio.sleep(5)

        heartbeats = asyncio.create_task(keep_heartbeating())
        try:
            while loop.time() < deadline:
                counts = await riding_out_outages(
                    lambda: self.dispatch_once(limit=request.batch_size), "dispatcher"
                )
                total.add(counts)
                if counts.transitions == 0 and counts.skipped == 0:
                    await asyncio.sleep(request.poll_seconds)
        finally:
            heartbeats.cancel()
        return total

    def activities(self) -> list[Callable[..., Any]]:
        return [self.dispatch_transitions]


def dispatch_input(settings: Settings) -> DispatcherInput:
    """The dispatcher's configuration, taken from the settings."""
    return DispatcherInput(
        dispatch=DispatchTransitionsInput(
            task_queue=settings.task_queue,
            poll_seconds=settings.dispatch_poll_seconds,
            history_event_threshold=settings.history_event_threshold,
        )
    )


async def ensure_dispatcher(
    client: Client, settings: Settings, *, workflow_id: str = DISPATCHER_WORKFLOW_ID
) -> str:
    """Start the one DispatcherWorkflow unless it runs already; returns its workflow id."""
    await client.start_workflow(
        DISPATCHER_WORKFLOW,
        dispatch_input(settings),
        id=workflow_id,
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    return workflow_id


def _interest(definition: Mapping[str, Any] | None) -> set[str] | None:
    """Event names a journey version listens to (its waits and its goal); None: unknown."""
    if not definition:
        return None
    names = {
        step.get("event")
        for step in (definition.get("steps") or {}).values()
        if isinstance(step, Mapping) and step.get("type") == "wait_for_event"
    }
    goal = definition.get("goal") or {}
    if goal.get("event"):
        names.add(goal["event"])
    return {name for name in names if name}


def _event_field(event: Any, name: str) -> Any:
    return event.get(name) if isinstance(event, Mapping) else getattr(event, name, None)


async def signal_customer_events(
    client: Client, engine: Engine, events: Sequence[Any], *, concurrency: int = 64
) -> int:
    """Signal each event to the running journey runs of its customer that wait for it or
    have it as their goal. `events` are stored events (rows or mappings with
    customer_id, name, occurred_at, event_id, properties). Returns the signals sent.
    A run that ended meanwhile is skipped."""
    if not events:
        return 0
    customer_ids = sorted({str(_event_field(e, "customer_id")) for e in events})

    def runs_of_customers() -> list[tuple[RunSummary, dict[str, Any] | None]]:
        with engine.connect() as conn:
            return run_store.running_runs_of_customers(conn, customer_ids=customer_ids)

    running = await asyncio.to_thread(runs_of_customers)
    by_customer: dict[str, list[tuple[str, set[str] | None]]] = {}
    for run, definition in running:
        by_customer.setdefault(run.customer_id, []).append((run.workflow_id, _interest(definition)))
    sends: list[tuple[str, CustomerEventSignal]] = []
    for event in events:
        name = _event_field(event, "name")
        for workflow_id, interest in by_customer.get(str(_event_field(event, "customer_id")), []):
            if interest is not None and name not in interest:
                continue
            sends.append(
                (
                    workflow_id,
                    CustomerEventSignal(
                        name=name,
                        occurred_at=_event_field(event, "occurred_at"),
                        event_id=_event_field(event, "event_id"),
                        properties=_event_field(event, "properties") or {},
                    ),
                )
            )
    gate = asyncio.Semaphore(concurrency)

    async def send(workflow_id: str, signal: CustomerEventSignal) -> int:
        async with gate:
            try:
                await client.get_workflow_handle(workflow_id).signal(JOURNEY_EVENT_SIGNAL, signal)
                return 1
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    return 0
                raise

    return sum(await asyncio.gather(*(send(w, s) for w, s in sends)))
