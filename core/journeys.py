"""Journey definitions (DESIGN.md "Journey definitions"), validated by pydantic.

A run carries a snapshot of the `JourneyDefinition` version it entered on, so these
models cross into the workflow: they must stay plain data.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.conditions import Condition
from core.durations import Duration


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmailStep(_Strict):
    type: Literal["email"]
    template: str = Field(min_length=1)
    next: str | None


class SmsStep(_Strict):
    type: Literal["sms"]
    template: str = Field(min_length=1)
    next: str | None


class DelayStep(_Strict):
    type: Literal["delay"]
    duration: Duration
    next: str | None


class WaitForEventStep(_Strict):
    """Wait for an event (any name, or `email_clicked` / `email_opened` of `of_step`)."""

    type: Literal["wait_for_event"]
    event: str = Field(min_length=1)
    of_step: str | None = None
    timeout: Duration
    on_event: str | None
    on_timeout: str | None


class BranchCase(_Strict):
    condition: Condition
    next: str | None


class BranchStep(_Strict):
    """Ordered conditions, evaluated for the customer when the run reaches the step."""

    type: Literal["branch"]
    branches: list[BranchCase] = Field(min_length=1)
    default: str | None


class UpdateAttributeStep(_Strict):
    type: Literal["update_attribute"]
    attribute: str = Field(min_length=1)
    value: Any
    next: str | None


class ExitStep(_Strict):
    type: Literal["exit"]


Step = Annotated[
    EmailStep | SmsStep | DelayStep | WaitForEventStep | BranchStep | UpdateAttributeStep | ExitStep,
    Field(discriminator="type"),
]


class Trigger(_Strict):
    segment: str = Field(min_length=1)


class Goal(_Strict):
    event: str = Field(min_length=1)
    within: Duration = timedelta(days=30)


class Reentry(_Strict):
    policy: Literal["never", "after_completion"] = "never"
    cooldown: Duration | None = None


class QuietHours(_Strict):
    """Sends that fall between `start` and `end` (local time of the customer) wait."""

    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    end: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    timezone_attribute: str = "timezone"
    default_timezone: str = "UTC"


class FrequencyCap(_Strict):
    max_messages: int = Field(ge=1)
    per: Duration
    action: Literal["defer", "skip"] = "defer"


class JourneyDefinition(_Strict):
    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=200)
    name: str = Field(min_length=1)
    trigger: Trigger
    goal: Goal | None = None
    exit_on_segment_exit: bool = False
    reentry: Reentry = Reentry()
    in_doubt_policy: Literal["skip", "resend"] = "skip"
    quiet_hours: QuietHours | None = None
    frequency_cap: FrequencyCap | None = None
    start: str
    steps: dict[str, Step] = Field(min_length=1)
