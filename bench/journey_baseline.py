"""The bare workflow `bench/journeys.py` compares the Champions flow with: the same
timers, signals and send activities, and none of the journey runtime's bookkeeping."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.runs import RunActivities
    from core.messages import SEND_MESSAGE_ACTIVITY, SendMessageInput, SendMessageResult
    from core.signals import JOURNEY_EVENT_SIGNAL, CustomerEventSignal
    from workflows.journey import JourneyWorkflow


class BareFlowInput(BaseModel):
    customer_id: str
    wait_seconds: float
    delay_seconds: float


def noop_send_message(runs: RunActivities):  # noqa: ANN201
    """The send activity of both flows: no provider, so they compare orchestration only;
    the journey's bookkeeping that rides with a send is written, as the real send does."""

    @activity.defn(name=SEND_MESSAGE_ACTIVITY)
    async def send_message(request: SendMessageInput) -> SendMessageResult:
        if request.progress is not None:
            await asyncio.to_thread(runs.writer.write, request.progress)
        return SendMessageResult(status="sent")

    return send_message


# The same runner as JourneyWorkflow's (sandboxed or not).
@workflow.defn(
    name="BareChampionsFlow",
    sandboxed=workflow._Definition.must_from_class(JourneyWorkflow).sandboxed,
)
class BareChampionsFlow:
    def __init__(self) -> None:
        self.clicked = False

    @workflow.signal(name=JOURNEY_EVENT_SIGNAL)
    def customer_event(self, signal: CustomerEventSignal) -> None:
        if signal.name == "email_clicked":
            self.clicked = True

    async def _send(self, request: BareFlowInput, step: str) -> None:
        await workflow.execute_activity(
            SEND_MESSAGE_ACTIVITY,
            SendMessageInput(
                workflow_id=workflow.info().workflow_id,
                run_id=workflow.info().run_id,
                step_id=step,
                journey_slug="bare",
                version=1,
                customer_id=request.customer_id,
                channel="email",
                template=f"champions/{step}.html",
            ),
            result_type=SendMessageResult,
            start_to_close_timeout=timedelta(minutes=2),
            retry_policy=RetryPolicy(maximum_attempts=5),
        )

    @workflow.run
    async def run(self, request: BareFlowInput) -> None:
        await self._send(request, "welcome")
        try:
            await workflow.wait_condition(
                lambda: self.clicked, timeout=timedelta(seconds=request.wait_seconds)
            )
        except TimeoutError:
            await self._send(request, "reminder")
        await self._send(request, "vip")
        await workflow.sleep(timedelta(seconds=request.delay_seconds))
        await self._send(request, "recs")
