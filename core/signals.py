"""Signals into a running journey: behavioural events, clicks, segment changes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

JOURNEY_EVENT_SIGNAL = "customer_event"
SEGMENT_ENTRY_SIGNAL = "segment_entered"
SEGMENT_EXIT_SIGNAL = "segment_exited"


class CustomerEventSignal(BaseModel):
    """An event that happened to the run's customer.

    `name` is the event name (`Purchase`) or `email_clicked` / `email_opened`, in which
    case `step` names the email step the click or open belongs to.
    """

    name: str
    occurred_at: datetime
    step: str | None = None
    event_id: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class SegmentSignal(BaseModel):
    """A segment entry or exit of the run's customer, from the transition outbox."""

    segment: str
    transition_id: int
    occurred_at: datetime
    context: dict[str, Any] = Field(default_factory=dict)


def journey_workflow_id(journey_slug: str, customer_id: str) -> str:
    """One workflow per (journey, customer)."""
    return f"journey:{journey_slug}:{customer_id}"
