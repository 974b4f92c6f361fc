"""JourneyWorkflow: one customer's run through one journey version snapshot.

The run interprets the definition it was started with (never the store's), so editing
or re-activating a journey never changes a run in flight. Every wait is a durable
timer; every send is one `send_message` activity, which also writes the timeline lines and
position the run gathered since its last write; the other writes go through the local
activity `record_run_progress`, which rides in the workflow task instead of costing a
server round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from core.durations import format_duration
    from core.journeys import (
        BranchStep,
        DelayStep,
        EmailStep,
        ExitStep,
        SmsStep,
        UpdateAttributeStep,
        WaitForEventStep,
    )
    from core.messages import SEND_MESSAGE_ACTIVITY, SendMessageInput, SendMessageResult
    from core.runs import (
        EVALUATE_BRANCH_ACTIVITY,
        JOURNEY_WORKFLOW,
        RECORD_RUN_PROGRESS_ACTIVITY,
        UPDATE_ATTRIBUTE_ACTIVITY,
        EvaluateBranchInput,
        EvaluateBranchResult,
        JourneyEntry,
        JourneyInput,
        JourneyRunState,
        ReceivedEvent,
        RecordRunProgressInput,
        RunIdentity,
        RunLine,
        RunPosition,
        UpdateAttributeInput,
    )
    from core.signals import (
        JOURNEY_EVENT_SIGNAL,
        SEGMENT_ENTRY_SIGNAL,
        SEGMENT_EXIT_SIGNAL,
        CustomerEventSignal,
        SegmentSignal,
    )

SEND_TIMEOUT = timedelta(minutes=2)
# The send heartbeats (activities/heartbeats.py): an attempt whose worker died is retried
# after this, not after SEND_TIMEOUT, while a slow but live attempt is never cut short
# (which would start a second attempt beside it and leave the send in doubt).
SEND_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
SEND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
    # Sends are idempotent by key, so retrying a provider outage for a day is safe.
    maximum_attempts=300,
)
STORE_TIMEOUT = timedelta(seconds=30)
STORE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=100,
    non_retryable_error_types=["CustomerNotFound", "ValidationError"],
)
# A deferred send without a time to wait for still waits, rather than spinning.
DEFAULT_DEFERRAL = timedelta(minutes=15)
# Received events kept in state (and carried across continue-as-new).
MAX_RECEIVED_EVENTS = 200
# From this runtime on, the send activity writes the bookkeeping gathered before it;
# runs started with an older one (their histories) keep their local activity.
SEND_WRITES_PROGRESS = 2

_EVENT_WORDS = {"email_clicked": "click", "email_opened": "open"}


def describe_entry(entry: JourneyEntry) -> str:
    """`segment transition 42: entered default:champions (RFM pass 7, R5 F4 M5)`."""
    details: list[str] = []
    context = entry.context
    pass_id = context.get("pass_id")
    if pass_id is None and entry.source.startswith("rfm-pass:"):
        pass_id = entry.source.split(":", 1)[1]
    if pass_id is not None:
        details.append(f"RFM pass {pass_id}")
    scores = [
        f"{letter.upper()}{context[letter]}" for letter in ("r", "f", "m") if letter in context
    ]
    if scores:
        details.append(" ".join(scores))
    if not details and entry.source:
        details.append(entry.source)
    head = (
        f"segment transition {entry.transition_id}"
        if entry.transition_id is not None
        else "segment entry"
    )
    tail = f" ({', '.join(details)})" if details else ""
    return f"{head}: entered {entry.segment}{tail}"


def _what_is_awaited(step: WaitForEventStep) -> str:
    if step.of_step and step.event in _EVENT_WORDS:
        return f"{_EVENT_WORDS[step.event]} on {step.of_step}"
    if step.of_step:
        return f"{step.event} of {step.of_step}"
    return step.event


def _human(duration: timedelta) -> str:
    seconds = int(duration.total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return format_duration(duration)


class _ContinueAsNew(Exception):
    """Raised inside a wait when the history has grown past the threshold."""


# Outside the sandbox: it re-imports and wraps modules for every run, which cost about a
# quarter of the worker's CPU per run (bench/realtime.py). This module stays deterministic
# by its own rules (no I/O, clock or randomness; only core contracts imported).
@workflow.defn(name=JOURNEY_WORKFLOW, sandboxed=False)
class JourneyWorkflow:
    @workflow.init
    def __init__(self, input: JourneyInput) -> None:
        self._input = input
        self._definition = input.definition
        self._state = (
            input.state.model_copy(deep=True) if input.state is not None else JourneyRunState()
        )
        self._lines: list[RunLine] = []
        self._position_dirty = False
        self._goal: ReceivedEvent | None = None
        self._exit: SegmentSignal | None = None

    # --- messages in ---------------------------------------------------------------

    @workflow.signal(name=JOURNEY_EVENT_SIGNAL)
    def customer_event(self, signal: CustomerEventSignal) -> None:
        if self._state.status != "running":
            return
        event = ReceivedEvent.of(signal, workflow.now())
        self._state.received.append(event)
        if len(self._state.received) > MAX_RECEIVED_EVENTS:
            dropped = len(self._state.received) - MAX_RECEIVED_EVENTS
            del self._state.received[:dropped]
            self._state.wait_received_from = max(0, self._state.wait_received_from - dropped)
        if self._goal is None and self._is_goal(event):
            self._goal = event

    @workflow.signal(name=SEGMENT_ENTRY_SIGNAL)
    def segment_entered(self, signal: SegmentSignal) -> None:
        # The start signal of signal-with-start, or a repeated entry of a running
        # customer: the run already started from its input, so this changes nothing.
        return

    @workflow.signal(name=SEGMENT_EXIT_SIGNAL)
    def segment_exited(self, signal: SegmentSignal) -> None:
        if (
            self._definition.exit_on_segment_exit
            and signal.segment == self._definition.trigger.segment
            and self._exit is None
        ):
            self._exit = signal

    @workflow.query(name="state")
    def state(self) -> JourneyRunState:
        """Where the run is: step, since, what it waits for and until when, events seen."""
        return self._state

    def _is_goal(self, event: ReceivedEvent) -> bool:
        goal = self._definition.goal
        entered_at = self._state.entered_at or self._input.entry.occurred_at
        return (
            goal is not None
            and event.name == goal.event
            and entered_at <= event.occurred_at <= entered_at + goal.within
        )

    def _interrupted(self) -> bool:
        return self._goal is not None or self._exit is not None

    # --- the run -------------------------------------------------------------------

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyRunState:
        state = self._state
        resuming = input.state is not None
        if not resuming:
            state.run_id = workflow.info().first_execution_run_id
            state.entered_at = input.entry.occurred_at
            state.step = self._definition.start
            self._line("entered", describe_entry(input.entry), step=None)
        # A goal event may have arrived before a continue-as-new, or with the start.
        for event in state.received:
            if self._goal is None and self._is_goal(event):
                self._goal = event

        current: str | None = state.step
        try:
            while current is not None and not self._interrupted():
                if self._history_too_long() and not state.waiting_until:
                    await self._continue_as_new(current)
                # Only a run continued as new in the middle of a wait resumes that wait.
                resume_wait = resuming and state.waiting_until is not None
                current = await self._run_step(current, resume_wait=resume_wait)
                resuming = False
        except _ContinueAsNew:
            await self._continue_as_new(state.step)
        except ActivityError as err:
            cause = err.cause.message if err.cause is not None else str(err)
            self._finish("failed", f"step {state.step} failed: {cause}", kind="failed")
            await self._flush()
            await workflow.wait_condition(workflow.all_handlers_finished)
            return state

        if self._goal is not None:
            state.converted_at = self._goal.occurred_at
            self._finish(
                "converted",
                f"goal event {self._goal.name} at {self._goal.occurred_at.isoformat()}",
                kind="goal_reached",
            )
        elif self._exit is not None:
            self._finish(
                "exited",
                f"segment transition {self._exit.transition_id}: left {self._exit.segment}",
                kind="exited",
            )
        elif state.status == "running":
            self._finish("completed", "reached the end of the journey", kind="completed")
        await self._flush()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return state

    async def _run_step(self, step_id: str, *, resume_wait: bool) -> str | None:
        """Run one step and return the id of the next (None: the journey ends)."""
        step = self._definition.steps[step_id]
        state = self._state
        if not resume_wait:
            state.visits[step_id] = state.visits.get(step_id, 0) + 1
            self._move(step_id)
        if isinstance(step, EmailStep | SmsStep):
            return await self._send(step_id, step)
        if isinstance(step, DelayStep):
            until = state.waiting_until if resume_wait else workflow.now() + step.duration
            await self._wait(waiting_for="delay", until=until, ready=lambda: False)
            if not self._interrupted():
                self._line("timer_fired", f"delay of {_human(step.duration)} over", step=step_id)
            return step.next
        if isinstance(step, WaitForEventStep):
            return await self._wait_for_event(step_id, step, resume_wait=resume_wait)
        if isinstance(step, BranchStep):
            return await self._branch(step_id, step)
        if isinstance(step, UpdateAttributeStep):
            await self._flush()
            await workflow.execute_activity(
                UPDATE_ATTRIBUTE_ACTIVITY,
                UpdateAttributeInput(
                    customer_id=self._input.customer_id,
                    attribute=step.attribute,
                    value=step.value,
                ),
                start_to_close_timeout=STORE_TIMEOUT,
                retry_policy=STORE_RETRY,
            )
            self._line("attribute_updated", f"set {step.attribute} = {step.value!r}", step=step_id)
            return step.next
        if isinstance(step, ExitStep):
            self._finish("exited", f"exit step {step_id}", kind="exited", step=step_id)
            return None
        raise ValueError(f"unknown step type at {step_id}")

    async def _send(self, step_id: str, step: EmailStep | SmsStep) -> str | None:
        state = self._state
        visit = state.visits.get(step_id, 1)
        send_key = step_id if visit <= 1 else f"{step_id}#{visit}"
        while True:
            seq = self._next_seq()
            progress = None
            if self._input.runtime >= SEND_WRITES_PROGRESS:
                progress = self._take_progress()
            else:
                await self._flush()
            try:
                result = await self._send_message(step, send_key, seq, progress)
            except ActivityError:
                if progress is not None:
                    # Not written (or written already: insert-if-absent): the run's own
                    # write of its failure takes them along.
                    self._lines = progress.lines + self._lines
                    self._position_dirty = True
                raise
            if result.status != "deferred":
                return step.next
            until = result.deferred_until or workflow.now() + DEFAULT_DEFERRAL
            await self._wait(
                waiting_for=f"send window ({result.reason or 'deferred'})",
                until=until,
                ready=lambda: False,
            )
            if self._interrupted():
                return None
            self._move(step_id)

    async def _send_message(
        self,
        step: EmailStep | SmsStep,
        send_key: str,
        seq: int,
        progress: RecordRunProgressInput | None,
    ) -> SendMessageResult:
        state = self._state
        return await workflow.execute_activity(
            SEND_MESSAGE_ACTIVITY,
            SendMessageInput(
                workflow_id=workflow.info().workflow_id,
                run_id=state.run_id,
                step_id=send_key,
                journey_slug=self._input.journey_slug,
                version=self._input.version,
                customer_id=self._input.customer_id,
                channel=step.type,
                template=step.template,
                in_doubt_policy=self._definition.in_doubt_policy,
                quiet_hours=self._definition.quiet_hours,
                frequency_cap=self._definition.frequency_cap,
                seq=seq,
                # Quiet hours and the cap are decided at the later of this and the
                # worker's clock: a worker whose clock is behind the server's (or the
                # time-skipping test server) must not find the timer it woke from early
                # and defer again to the same time, at once, in a loop.
                scheduled_at=workflow.now(),
                progress=progress,
            ),
            result_type=SendMessageResult,
            start_to_close_timeout=SEND_TIMEOUT,
            heartbeat_timeout=SEND_HEARTBEAT_TIMEOUT,
            retry_policy=SEND_RETRY,
        )

    async def _wait_for_event(
        self, step_id: str, step: WaitForEventStep, *, resume_wait: bool
    ) -> str | None:
        state = self._state
        if not resume_wait:
            state.wait_received_from = len(state.received)

        def arrived() -> ReceivedEvent | None:
            if step.of_step:
                # A click can come in before the wait starts (during the send): it counts.
                candidates = state.received
            else:
                candidates = state.received[state.wait_received_from :]
            for event in candidates:
                if event.name == step.event and (
                    step.of_step is None or event.step == step.of_step
                ):
                    return event
            return None

        awaited = _what_is_awaited(step)
        until = state.waiting_until if resume_wait else workflow.now() + step.timeout
        started = state.wait_started_at if resume_wait else workflow.now()
        if arrived() is None:
            await self._wait(waiting_for=awaited, until=until, ready=lambda: arrived() is not None)
        if self._interrupted():
            return None
        event = arrived()
        if event is not None:
            waited = workflow.now() - (started or workflow.now())
            self._line(
                "event_received",
                f"{_EVENT_WORDS.get(step.event, step.event)} signal"
                + (f" on {step.of_step}" if step.of_step else "")
                + (f" after {_human(waited)}" if waited >= timedelta(minutes=1) else ""),
                step=step_id,
                detail={"event": event.name, "occurred_at": event.occurred_at.isoformat()},
            )
            return step.on_event
        self._line(
            "timer_fired",
            f"timer fired after {_human(step.timeout)}: no {awaited}",
            step=step_id,
        )
        return step.on_timeout

    async def _branch(self, step_id: str, step: BranchStep) -> str | None:
        await self._flush()
        result: EvaluateBranchResult = await workflow.execute_local_activity(
            EVALUATE_BRANCH_ACTIVITY,
            EvaluateBranchInput(
                customer_id=self._input.customer_id,
                conditions=[case.condition for case in step.branches],
                now=workflow.now(),
            ),
            result_type=EvaluateBranchResult,
            start_to_close_timeout=STORE_TIMEOUT,
            retry_policy=STORE_RETRY,
        )
        if result.matched is None:
            target = step.default
            reason = f"no condition held: default -> {target or 'end'}"
        else:
            target = step.branches[result.matched].next
            reason = f"condition {result.matched + 1} held -> {target or 'end'}"
        self._line("branch_taken", reason, step=step_id, detail={"matched": result.matched})
        return target

    # --- waiting -------------------------------------------------------------------

    async def _wait(
        self, *, waiting_for: str, until: datetime | None, ready: Callable[[], bool]
    ) -> None:
        """Wait on a durable timer until `until`, `ready()`, a goal or a segment exit."""
        state = self._state
        now = workflow.now()
        until = until or now
        if not (state.waiting_until and state.waiting_for == waiting_for):
            state.wait_started_at = now
        state.waiting_for = waiting_for
        state.waiting_until = until
        self._position_dirty = True
        await self._flush()
        try:
            while True:
                remaining = until - workflow.now()
                if remaining <= timedelta(0):
                    break
                await workflow.wait_condition(
                    lambda: ready() or self._interrupted() or self._history_too_long(),
                    timeout=remaining,
                )
                if ready() or self._interrupted():
                    break
                if self._history_too_long():
                    raise _ContinueAsNew()
        except TimeoutError:
            pass
        if self._interrupted():
            return
        state.waiting_for = None
        state.waiting_until = None
        self._position_dirty = True

    def _history_too_long(self) -> bool:
        return workflow.info().get_current_history_length() > self._input.history_event_threshold

    async def _continue_as_new(self, step_id: str | None) -> None:
        self._state.step = step_id
        await self._flush()
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(self._input.model_copy(update={"state": self._state}))

    # --- timeline bookkeeping ------------------------------------------------------

    def _next_seq(self) -> int:
        seq = self._state.seq
        self._state.seq += 1
        return seq

    def _line(
        self, kind: str, reason: str, *, step: str | None, detail: dict | None = None
    ) -> None:
        self._lines.append(
            RunLine(
                seq=self._next_seq(),
                step=step,
                kind=kind,
                reason=reason,
                occurred_at=workflow.now(),
                detail=detail or {},
            )
        )

    def _move(self, step_id: str) -> None:
        state = self._state
        state.step = step_id
        state.since = workflow.now()
        state.waiting_for = None
        state.waiting_until = None
        self._position_dirty = True

    def _finish(self, status: str, reason: str, *, kind: str, step: str | None = None) -> None:
        state = self._state
        state.status = status  # type: ignore[assignment]
        state.ended_at = workflow.now()
        state.waiting_for = None
        state.waiting_until = None
        self._line(kind, reason, step=step if step is not None else state.step)
        self._position_dirty = True

    def _take_progress(self) -> RecordRunProgressInput | None:
        """The timeline lines and position not yet written, now handed over (or None)."""
        if not self._lines and not self._position_dirty:
            return None
        state = self._state
        progress = RecordRunProgressInput(
            run=RunIdentity(
                workflow_id=workflow.info().workflow_id,
                run_id=state.run_id,
                journey_slug=self._input.journey_slug,
                version=self._input.version,
                customer_id=self._input.customer_id,
                entered_at=state.entered_at or self._input.entry.occurred_at,
                entry_transition_id=self._input.entry.transition_id,
            ),
            lines=self._lines,
            position=RunPosition(
                status=state.status,
                step=state.step,
                step_since=state.since,
                waiting_for=state.waiting_for,
                waiting_until=state.waiting_until,
                converted_at=state.converted_at,
                ended_at=state.ended_at,
            ),
        )
        self._lines = []
        self._position_dirty = False
        return progress

    async def _flush(self) -> None:
        """Write pending timeline lines and the run's position (no server round trip)."""
        progress = self._take_progress()
        if progress is None:
            return
        await workflow.execute_local_activity(
            RECORD_RUN_PROGRESS_ACTIVITY,
            progress,
            start_to_close_timeout=STORE_TIMEOUT,
            retry_policy=STORE_RETRY,
        )
