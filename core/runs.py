"""What a journey run carries and reports: workflow input and state, timeline lines.

These models cross between the dispatcher, the journey workflow and its activities, so
they live here (the workflow imports only core models and activity names).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from core.conditions import Condition
from core.journeys import JourneyDefinition
from core.signals import CustomerEventSignal

JOURNEY_WORKFLOW = "JourneyWorkflow"
DISPATCHER_WORKFLOW = "DispatcherWorkflow"
DISPATCHER_WORKFLOW_ID = "journeys-transition-dispatcher"

RECORD_RUN_PROGRESS_ACTIVITY = "record_run_progress"
EVALUATE_BRANCH_ACTIVITY = "evaluate_branch"
UPDATE_ATTRIBUTE_ACTIVITY = "update_customer_attribute"
DISPATCH_TRANSITIONS_ACTIVITY = "dispatch_transitions"

# The runtime new runs start with (JourneyInput.runtime).
CURRENT_RUNTIME = 2

RunStatus = Literal["running", "completed", "converted", "exited", "failed", "cancelled"]
ENDED_STATUSES = ("completed", "converted", "exited", "failed", "cancelled")


class JourneyEntry(BaseModel):
    """The segment entry that started a run (from the transition outbox)."""

    segment: str
    transition_id: int | None = None
    occurred_at: datetime
    source: str = ""
    # Whatever the transition carried, e.g. {"pass_id": 7, "r": 5, "f": 4, "m": 5}.
    context: dict[str, Any] = Field(default_factory=dict)


class ReceivedEvent(BaseModel):
    """An event signalled into the run; kept so a click before its wait still counts."""

    name: str
    step: str | None = None
    occurred_at: datetime
    received_at: datetime
    event_id: str | None = None

    @classmethod
    def of(cls, signal: CustomerEventSignal, received_at: datetime) -> ReceivedEvent:
        return cls(
            name=signal.name,
            step=signal.step,
            occurred_at=signal.occurred_at,
            received_at=received_at,
            event_id=signal.event_id,
        )


class JourneyRunState(BaseModel):
    """Everything a run needs to carry on, and what the `state` query shows support."""

    run_id: str = ""
    entered_at: datetime | None = None
    status: RunStatus = "running"
    step: str | None = None
    since: datetime | None = None
    waiting_for: str | None = None
    waiting_until: datetime | None = None
    converted_at: datetime | None = None
    ended_at: datetime | None = None
    # Next timeline position; every line and every send takes one.
    seq: int = 0
    received: list[ReceivedEvent] = Field(default_factory=list)
    # Visits per step, so a step reached twice (a loop) sends under a distinct key.
    visits: dict[str, int] = Field(default_factory=dict)
    # Where a wait started, so a continued-as-new run resumes the same wait and deadline.
    wait_started_at: datetime | None = None
    wait_received_from: int = 0


class JourneyInput(BaseModel):
    """One run of one journey version for one customer; `definition` is the snapshot."""

    journey_slug: str
    version: int
    customer_id: str
    definition: JourneyDefinition
    entry: JourneyEntry
    # Passed in so the workflow reads no settings (Settings.history_event_threshold).
    history_event_threshold: int = 2_000
    # How the run keeps its books, fixed when it starts so that its history replays: 1, a
    # local activity writes the timeline before each send; 2, the send writes it.
    # Starters set CURRENT_RUNTIME; a run started without it is an older one.
    runtime: int = 1
    # Set when the run continues as new.
    state: JourneyRunState | None = None


class RunLine(BaseModel):
    """One line of a run's readable timeline."""

    seq: int
    step: str | None = None
    kind: str
    reason: str
    occurred_at: datetime
    detail: dict[str, Any] = Field(default_factory=dict)


class RunPosition(BaseModel):
    """Where a run is now, as `journey_runs` shows it."""

    status: RunStatus = "running"
    step: str | None = None
    step_since: datetime | None = None
    waiting_for: str | None = None
    waiting_until: datetime | None = None
    converted_at: datetime | None = None
    ended_at: datetime | None = None


class RunIdentity(BaseModel):
    workflow_id: str
    run_id: str
    journey_slug: str
    version: int
    customer_id: str
    entered_at: datetime
    entry_transition_id: int | None = None


class RecordRunProgressInput(BaseModel):
    run: RunIdentity
    lines: list[RunLine] = Field(default_factory=list)
    position: RunPosition


class EvaluateBranchInput(BaseModel):
    customer_id: str
    conditions: list[Condition]
    now: datetime


class EvaluateBranchResult(BaseModel):
    # Index of the first condition that holds, or None for the default.
    matched: int | None


class UpdateAttributeInput(BaseModel):
    customer_id: str
    attribute: str
    value: Any = None


class DispatchTransitionsInput(BaseModel):
    """One stint of the dispatcher activity (it returns so its workflow can loop)."""

    task_queue: str
    run_for_seconds: float = 3_600.0
    poll_seconds: float = 0.2
    batch_size: int = 1_000
    concurrency: int = 64
    history_event_threshold: int = 2_000


class DispatchCounts(BaseModel):
    transitions: int = 0
    # Signal-with-start calls Temporal accepted (a new run, or a no-op signal to one).
    entries: int = 0
    # Of those, runs Temporal says it started (servers that report it).
    started: int = 0
    skipped: int = 0
    exit_signals: int = 0
    failed: int = 0

    def add(self, other: DispatchCounts) -> None:
        for name in DispatchCounts.model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class DispatcherInput(BaseModel):
    dispatch: DispatchTransitionsInput
    stints_before_continue: int = 24
