"""The training activity of predictive models: one training and a rescoring of everyone,
heartbeating its step while it runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.engine import Connection, Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.saves import wait_for_save
from core.errors import NotFound
from core.predictions import (
    TRAIN_PREDICTION_ACTIVITY,
    PredictionTrainingInput,
    PredictionTrainingSummary,
)
from store import predictions as prediction_store
from store.prediction_training import NotEnoughHistory, TrainingOutcome, train_and_score

log = logging.getLogger("journeys.predictions")


def _model_version(slug: str) -> Callable[[Connection], int | None]:
    def read(conn: Connection) -> int | None:
        try:
            return prediction_store.get_model(conn, slug=slug).version
        except NotFound:
            return None

    return read


def summary(slug: str, outcome: TrainingOutcome) -> PredictionTrainingSummary:
    baselines = {b.method: b.auc for b in outcome.report.baselines}
    return PredictionTrainingSummary(
        training_id=outcome.training_id,
        model_slug=slug,
        as_of=outcome.report.as_of,
        status=outcome.status,  # type: ignore[arg-type]
        scored=outcome.scored,
        auc=outcome.report.model.auc,
        rfm_heuristic_auc=baselines.get("rfm_heuristic"),
        bgnbd_auc=baselines.get("bgnbd"),
        duration_ms=outcome.duration_ms,
    )


class PredictionActivities:
    """Activities bound to the store they train in."""

    def __init__(self, engine: Engine, *, heartbeat_seconds: float = 5.0):
        self.engine = engine
        self.heartbeat_seconds = heartbeat_seconds

    def run_training(self, request: PredictionTrainingInput, step: list[str]) -> TrainingOutcome:
        """The training itself (blocking)."""
        if request.version is not None:
            wait_for_save(
                self.engine,
                read_version=_model_version(request.model_slug),
                version=request.version,
                what=f"predictive model {request.model_slug!r}",
            )

        def progress(what: str) -> None:
            step[0] = what

        return train_and_score(
            self.engine,
            slug=request.model_slug,
            as_of=request.as_of or datetime.now(UTC),
            progress=progress,
        )

    @activity.defn(name=TRAIN_PREDICTION_ACTIVITY)
    async def train_prediction_model(
        self, request: PredictionTrainingInput
    ) -> PredictionTrainingSummary:
        """Train `request.model_slug` as of `request.as_of` (default now) and rescore
        everyone. The work runs in a thread; this coroutine heartbeats its step, so a dead
        worker is noticed within the heartbeat timeout and the training retried. An unknown
        model, or a store with too little history, is a non-retryable failure."""
        step = ["starting"]
        task = asyncio.ensure_future(asyncio.to_thread(self.run_training, request, step))
        while True:
            activity.heartbeat(step[0])
            finished, _ = await asyncio.wait({task}, timeout=self.heartbeat_seconds)
            if finished:
                break
        try:
            outcome = task.result()
        except NotFound as exc:
            raise ApplicationError(exc.message, type="NotFound", non_retryable=True) from exc
        except NotEnoughHistory as exc:
            raise ApplicationError(
                exc.message, type="NotEnoughHistory", non_retryable=True
            ) from exc
        log.info(
            "prediction training %s of %s: %s, %s scored in %s ms",
            outcome.training_id,
            request.model_slug,
            outcome.status,
            outcome.scored,
            outcome.duration_ms,
        )
        return summary(request.model_slug, outcome)
