"""Scheduled segment evaluation: one activity that evaluates a segment and its dependents."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.segments import (
        EVALUATE_SEGMENTS_ACTIVITY,
        EvaluateSegmentsInput,
        EvaluateSegmentsResult,
    )
    from core.segments import SEGMENT_WORKFLOW, SegmentEvaluationInput


@workflow.defn(name=SEGMENT_WORKFLOW)
class SegmentEvaluationWorkflow:
    """Started by the schedule `segment-eval:{slug}` (or by hand): evaluates as of the
    workflow's start time, so a retried activity computes the same pass."""

    @workflow.run
    async def run(self, request: SegmentEvaluationInput) -> EvaluateSegmentsResult:
        return await workflow.execute_activity(
            EVALUATE_SEGMENTS_ACTIVITY,
            EvaluateSegmentsInput(slug=request.slug, as_of=workflow.now(), version=request.version),
            result_type=EvaluateSegmentsResult,
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(minutes=2),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=2),
                maximum_interval=timedelta(minutes=1),
                maximum_attempts=5,
            ),
        )
