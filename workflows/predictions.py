"""Scheduled training of a predictive model: one workflow per training, in one activity."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from core.predictions import (
        PREDICTION_TRAINING_WORKFLOW,
        TRAIN_PREDICTION_ACTIVITY,
        PredictionTrainingInput,
        PredictionTrainingSummary,
    )


@workflow.defn(name=PREDICTION_TRAINING_WORKFLOW)
class PredictionTrainingWorkflow:
    """Started by the schedule `prediction-train:{slug}`, by a save, or by hand. Trains as
    of `as_of`, or the workflow's start time, so every retry trains the same instant."""

    @workflow.run
    async def run(self, request: PredictionTrainingInput) -> PredictionTrainingSummary:
        as_of = request.as_of or workflow.now()
        return await workflow.execute_activity(
            TRAIN_PREDICTION_ACTIVITY,
            PredictionTrainingInput(
                model_slug=request.model_slug, as_of=as_of, version=request.version
            ),
            result_type=PredictionTrainingSummary,
            start_to_close_timeout=timedelta(hours=4),
            heartbeat_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=10),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(minutes=10),
                maximum_attempts=3,
                non_retryable_error_types=["NotFound", "NotEnoughHistory"],
            ),
        )
