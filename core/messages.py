"""What a journey step asks of the messaging activity, and what it gets back.

The journey workflow calls the activity by name (`SEND_MESSAGE_ACTIVITY`) so that the
workflow module imports nothing that does I/O.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from core.journeys import FrequencyCap, QuietHours
from core.runs import RecordRunProgressInput

SEND_MESSAGE_ACTIVITY = "send_message"

Channel = Literal["email", "sms"]
InDoubtPolicy = Literal["skip", "resend"]
SendStatus = Literal["sent", "skipped", "failed", "in_doubt", "deferred"]


def idempotency_key(workflow_id: str, run_id: str, step_id: str) -> str:
    """The one key a send is recorded under: `{workflow id}:{run id}:{step id}`."""
    return f"{workflow_id}:{run_id}:{step_id}"


class SendMessageInput(BaseModel):
    workflow_id: str
    run_id: str
    step_id: str
    journey_slug: str
    version: int
    customer_id: str
    channel: Channel
    template: str
    in_doubt_policy: InDoubtPolicy = "skip"
    quiet_hours: QuietHours | None = None
    frequency_cap: FrequencyCap | None = None
    # Position of the run-timeline line this send writes (see RunEvent.seq).
    seq: int = 0
    # Optional: the workflow's time of the send (`workflow.now()`). Quiet hours and the
    # frequency cap are decided at the later of this and the worker's clock.
    scheduled_at: datetime | None = None
    # The run's timeline lines and position since its last write, written by the send in
    # its first transaction (instead of a local activity of their own just before it).
    progress: RecordRunProgressInput | None = None

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.workflow_id, self.run_id, self.step_id)


class SendMessageResult(BaseModel):
    status: SendStatus
    message_id: int | None = None
    # Why a send was skipped or failed, in words a support agent can read.
    reason: str | None = None
    subject: str | None = None
    # With status "deferred" (quiet hours, frequency cap): when to try again; the
    # workflow sleeps on a durable timer until then and calls again.
    deferred_until: datetime | None = None
