"""The Temporal Schedules the API keeps in step with what is saved (no store access here).

One schedule per RFM model with a `schedule` (id `rfm-score:{slug}`) and one per rule
segment (id `segment-eval:{slug}`); a run still going when the next is due makes the
next one skipped, never stacked. The calls are idempotent, so a retried request
converges.
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
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from core.predictions import (
    PREDICTION_TRAINING_WORKFLOW,
    PredictionTrainingInput,
    prediction_save_workflow_id,
    prediction_schedule_id,
)
from core.rfm import (
    RFM_SCORING_WORKFLOW,
    RfmScoringInput,
    rfm_save_workflow_id,
    rfm_schedule_id,
)
from core.segments import (
    SEGMENT_WORKFLOW,
    SegmentEvaluationInput,
    segment_save_workflow_id,
    segment_schedule_id,
)


def _interval_schedule(
    workflow: str, arg: object, *, workflow_id: str, every: timedelta, task_queue: str
) -> Schedule:
    """Start `workflow` every `every`; a run still going when the next is due skips it."""
    return Schedule(
        action=ScheduleActionStartWorkflow(workflow, arg, id=workflow_id, task_queue=task_queue),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


def rfm_schedule(*, model_slug: str, every: timedelta, task_queue: str) -> Schedule:
    """The schedule of a model's passes (each run scores as of its own start time)."""
    schedule = _interval_schedule(
        RFM_SCORING_WORKFLOW,
        RfmScoringInput(model_slug=model_slug),
        workflow_id=rfm_schedule_id(model_slug),
        every=every,
        task_queue=task_queue,
    )
    schedule.state = ScheduleState(note=f"RFM scoring of model {model_slug!r}, every {every}")
    return schedule


async def upsert_schedule(client: Client, *, schedule_id: str, schedule: Schedule) -> None:
    """Create the schedule, or replace its spec and action if it exists."""
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:

        def replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(schedule_id).update(replace)


async def delete_schedule(client: Client, *, schedule_id: str) -> None:
    """Delete the schedule; one already gone is fine."""
    try:
        await client.get_schedule_handle(schedule_id).delete()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise


async def upsert_rfm_schedule(
    client: Client, *, model_slug: str, every: timedelta, task_queue: str
) -> None:
    desired = rfm_schedule(model_slug=model_slug, every=every, task_queue=task_queue)
    await upsert_schedule(client, schedule_id=rfm_schedule_id(model_slug), schedule=desired)


async def delete_rfm_schedule(client: Client, *, model_slug: str) -> None:
    await delete_schedule(client, schedule_id=rfm_schedule_id(model_slug))


async def sync_rfm_schedule(
    client: Client, *, model_slug: str, every: timedelta | None, task_queue: str
) -> None:
    """Make the model's schedule match `every` (None: no schedule)."""
    if every is None:
        await delete_rfm_schedule(client, model_slug=model_slug)
    else:
        await upsert_rfm_schedule(client, model_slug=model_slug, every=every, task_queue=task_queue)


def segment_schedule(*, slug: str, every: timedelta, task_queue: str) -> Schedule:
    """The schedule of a rule segment's evaluations."""
    return _interval_schedule(
        SEGMENT_WORKFLOW,
        SegmentEvaluationInput(slug=slug),
        workflow_id=segment_schedule_id(slug),
        every=every,
        task_queue=task_queue,
    )


async def upsert_segment_schedule(
    client: Client, *, slug: str, every: timedelta, task_queue: str
) -> None:
    desired = segment_schedule(slug=slug, every=every, task_queue=task_queue)
    await upsert_schedule(client, schedule_id=segment_schedule_id(slug), schedule=desired)


async def delete_segment_schedule(client: Client, *, slug: str) -> None:
    await delete_schedule(client, schedule_id=segment_schedule_id(slug))


async def start_segment_evaluation(
    client: Client, *, slug: str, version: int, task_queue: str
) -> None:
    """Evaluate `slug` at `version` now, durably: a workflow per saved version."""
    await client.start_workflow(
        SEGMENT_WORKFLOW,
        SegmentEvaluationInput(slug=slug, version=version),
        id=segment_save_workflow_id(slug, version),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )


async def start_rfm_pass(client: Client, *, model_slug: str, version: int, task_queue: str) -> None:
    """Score `model_slug` at `version` now, durably: a first pass per saved version."""
    await client.start_workflow(
        RFM_SCORING_WORKFLOW,
        RfmScoringInput(model_slug=model_slug, version=version),
        id=rfm_save_workflow_id(model_slug, version),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )


async def sync_prediction_schedule(
    client: Client, *, model_slug: str, every: timedelta | None, task_queue: str
) -> None:
    """Make the predictive model's training schedule match `every` (None: no schedule);
    each run trains as of its own start time and rescores everyone."""
    schedule_id = prediction_schedule_id(model_slug)
    if every is None:
        await delete_schedule(client, schedule_id=schedule_id)
        return
    schedule = _interval_schedule(
        PREDICTION_TRAINING_WORKFLOW,
        PredictionTrainingInput(model_slug=model_slug),
        workflow_id=schedule_id,
        every=every,
        task_queue=task_queue,
    )
    schedule.state = ScheduleState(
        note=f"training of predictive model {model_slug!r}, every {every}"
    )
    await upsert_schedule(client, schedule_id=schedule_id, schedule=schedule)


async def start_prediction_training(
    client: Client, *, model_slug: str, version: int, task_queue: str
) -> None:
    """Train `model_slug` at `version` now, durably: a first training per saved version."""
    await client.start_workflow(
        PREDICTION_TRAINING_WORKFLOW,
        PredictionTrainingInput(model_slug=model_slug, version=version),
        id=prediction_save_workflow_id(model_slug, version),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
