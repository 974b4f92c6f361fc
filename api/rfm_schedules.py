"""The Temporal Schedule of each RFM model with a `schedule` (no store access here).

One schedule per model, id `rfm-score:{slug}`, starting `RfmScoringWorkflow` every
`schedule`; a run still going when the next is due makes the next one skipped, never
stacked. The API calls these through its Temporal client when a model is saved or
deleted; they are idempotent, so a retried request converges.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.service import RPCError, RPCStatusCode

from core.rfm import RFM_SCORING_WORKFLOW, RfmScoringInput, rfm_schedule_id


def rfm_schedule(*, model_slug: str, every: timedelta, task_queue: str) -> Schedule:
    """The schedule of a model's passes (each run scores as of its own start time)."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            RFM_SCORING_WORKFLOW,
            RfmScoringInput(model_slug=model_slug),
            id=rfm_schedule_id(model_slug),
            task_queue=task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        state=ScheduleState(note=f"RFM scoring of model {model_slug!r}, every {every}"),
    )


async def upsert_rfm_schedule(
    client: Client, *, model_slug: str, every: timedelta, task_queue: str
) -> None:
    """Create the model's schedule, or replace its spec and action if it exists."""
    desired = rfm_schedule(model_slug=model_slug, every=every, task_queue=task_queue)
    try:
        await client.create_schedule(rfm_schedule_id(model_slug), desired)
    except ScheduleAlreadyRunningError:

        def replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=desired)

        await client.get_schedule_handle(rfm_schedule_id(model_slug)).update(replace)


async def delete_rfm_schedule(client: Client, *, model_slug: str) -> None:
    """Delete the model's schedule; nothing to do if it has none."""
    try:
        await client.get_schedule_handle(rfm_schedule_id(model_slug)).delete()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise


async def sync_rfm_schedule(
    client: Client, *, model_slug: str, every: timedelta | None, task_queue: str
) -> None:
    """Make the model's schedule match `every` (None: no schedule)."""
    if every is None:
        await delete_rfm_schedule(client, model_slug=model_slug)
    else:
        await upsert_rfm_schedule(client, model_slug=model_slug, every=every, task_queue=task_queue)
