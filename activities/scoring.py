"""The RFM scoring activity: one full pass in one transaction, heartbeating while it runs."""

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
from core.rfm import RUN_RFM_PASS_ACTIVITY, RfmPassSummary, RfmScoringInput
from core.settings import Settings
from store.failures import FailureSubject, clear_failures, record_failure
from store.rfm_models import get_model
from store.scoring import score_model

log = logging.getLogger("journeys.scoring")


def _model_version(slug: str) -> Callable[[Connection], int | None]:
    def read(conn: Connection) -> int | None:
        try:
            return get_model(conn, slug=slug).version
        except NotFound:
            return None

    return read


class ScoringActivities:
    """Activities bound to the store they score in."""

    def __init__(self, engine: Engine, settings: Settings, *, heartbeat_seconds: float = 5.0):
        self.engine = engine
        self.settings = settings
        self.heartbeat_seconds = heartbeat_seconds

    def run_pass(self, request: RfmScoringInput, step: list[str]) -> RfmPassSummary:
        """The pass itself (blocking): everything in one transaction."""
        as_of = request.as_of or datetime.now(UTC)

        def progress(done: int, total: int, next_step: str) -> None:
            step[0] = f"{done}/{total} {next_step}"

        subject = FailureSubject("rfm_model", request.model_slug, "rfm_pass")
        if request.version is not None:
            wait_for_save(
                self.engine,
                read_version=_model_version(request.model_slug),
                version=request.version,
                what=f"RFM model {request.model_slug!r}",
            )
        try:
            with self.engine.begin() as conn:
                result = score_model(
                    conn, model_slug=request.model_slug, as_of=as_of, progress=progress
                )
                clear_failures(conn, kind="rfm_model", stage="rfm_pass", keys=[subject.key])
        except NotFound:
            raise
        except Exception as exc:
            # Shown to admins and on the model; Temporal's retry policy tries again later.
            with self.engine.begin() as conn:
                record_failure(conn, subject=subject, error=exc, now=datetime.now(UTC))
            raise
        return RfmPassSummary(
            pass_id=result.pass_id,
            model_slug=result.model_slug,
            as_of=result.as_of,
            scored=result.scored,
            entries=result.entries,
            exits=result.exits,
            duration_ms=result.duration_ms,
        )

    @activity.defn(name=RUN_RFM_PASS_ACTIVITY)
    async def run_rfm_pass(self, request: RfmScoringInput) -> RfmPassSummary:
        """Run a full pass of `request.model_slug` as of `request.as_of` (default: now).

        The SQL runs in a thread; this coroutine heartbeats the current step meanwhile,
        so a dead worker is noticed within the heartbeat timeout and the pass retried
        (the transaction of the dead attempt never committed). An unknown model is a
        non-retryable failure.
        """
        step = ["starting"]
        task = asyncio.ensure_future(asyncio.to_thread(self.run_pass, request, step))
        while True:
            activity.heartbeat(step[0])
            finished, _ = await asyncio.wait({task}, timeout=self.heartbeat_seconds)
            if finished:
                break
        try:
            summary = task.result()
        except NotFound as exc:
            raise ApplicationError(exc.message, type="NotFound", non_retryable=True) from exc
        log.info(
            "rfm pass %s of %s: %s scored, %s entries, %s exits in %s ms",
            summary.pass_id,
            summary.model_slug,
            summary.scored,
            summary.entries,
            summary.exits,
            summary.duration_ms,
        )
        return summary
