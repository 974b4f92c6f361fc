"""Scheduled RFM scoring: one workflow per pass, the pass itself in one activity."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from core.rfm import (
        RFM_SCORING_WORKFLOW,
        RUN_RFM_PASS_ACTIVITY,
        RfmPassSummary,
        RfmScoringInput,
    )


@workflow.defn(name=RFM_SCORING_WORKFLOW)
class RfmScoringWorkflow:
    """Started by the schedule `rfm-score:{slug}` or by hand. Scores as of `as_of`, or
    the workflow's start time, so every retry of the activity computes the same pass."""

    @workflow.run
    async def run(self, request: RfmScoringInput) -> RfmPassSummary:
        as_of = request.as_of or workflow.now()
        return await workflow.execute_activity(
            RUN_RFM_PASS_ACTIVITY,
            RfmScoringInput(model_slug=request.model_slug, as_of=as_of, version=request.version),
            result_type=RfmPassSummary,
            start_to_close_timeout=timedelta(hours=2),
            heartbeat_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=5),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(minutes=5),
                maximum_attempts=5,
                non_retryable_error_types=["NotFound"],
            ),
        )
