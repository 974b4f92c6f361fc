"""Segment evaluation activity, and the Temporal Schedules that run it.

`SegmentActivities.evaluate_segments` evaluates one rule segment (or every due one),
then the rule segments that depend on what it evaluated, each in its own transaction,
heartbeating between segments. The API keeps one Temporal Schedule per rule segment
(api/schedules.py) that starts `SegmentEvaluationWorkflow` with this activity.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import BaseModel, Field
from sqlalchemy.engine import Connection, Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.saves import wait_for_save
from core.errors import NotFound
from store import segments as segment_store
from store.failures import FailureSubject, clear_failures, record_failure

log = logging.getLogger("journeys.segments")

EVALUATE_SEGMENTS_ACTIVITY = "evaluate_segments"


class EvaluateSegmentsInput(BaseModel):
    slug: str | None = None
    as_of: datetime | None = None
    include_dependents: bool = True
    # Set by a save: the version to evaluate, which may not be committed yet.
    version: int | None = None


class SegmentPassResult(BaseModel):
    slug: str
    entries: int
    exits: int
    duration_ms: int


class EvaluateSegmentsResult(BaseModel):
    passes: list[SegmentPassResult] = Field(default_factory=list)


def _segment_version(slug: str) -> Callable[[Connection], int | None]:
    def read(conn: Connection) -> int | None:
        try:
            return segment_store.get_segment(conn, slug=slug).version
        except NotFound:
            return None

    return read


class SegmentActivities:
    """Activities bound to the store they evaluate in."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @activity.defn(name=EVALUATE_SEGMENTS_ACTIVITY)
    def evaluate_segments(self, request: EvaluateSegmentsInput) -> EvaluateSegmentsResult:
        """Evaluate `request.slug` (or every due rule segment) and then its dependents."""
        now = request.as_of or datetime.now(UTC)
        if request.slug is not None and request.version is not None:
            wait_for_save(
                self.engine,
                read_version=_segment_version(request.slug),
                version=request.version,
                what=f"segment {request.slug!r}",
            )
        with self.engine.connect() as conn:
            if request.slug is None:
                slugs = segment_store.due_segments(conn, now=now)
            else:
                try:
                    segment = segment_store.get_segment(conn, slug=request.slug)
                except NotFound:
                    # A schedule can fire between a segment's deletion and its own.
                    log.info("segment %s is gone; nothing to evaluate", request.slug)
                    return EvaluateSegmentsResult()
                if segment.kind != "rule":
                    raise ApplicationError(
                        f"segment {request.slug!r} is {segment.kind}, not rule-based",
                        non_retryable=True,
                    )
                slugs = [request.slug]
            if request.include_dependents and slugs:
                later = segment_store.dependents_in_order(conn, segment_slugs=slugs)
                slugs += [s for s in later if s not in slugs]
        passes = []
        for done, slug in enumerate(slugs):
            activity.heartbeat(f"{done}/{len(slugs)} evaluating {slug}")
            done = self._evaluate_one(slug, now)
            if done is not None:
                passes.append(done)
            elif slug == request.slug:
                # The schedule's own segment failed (it is set aside with its error):
                # Temporal's retry policy tries it again with backoff.
                raise ApplicationError(f"segment {slug!r} could not be evaluated; see failures")
        return EvaluateSegmentsResult(passes=passes)

    def _evaluate_one(self, slug: str, now: datetime) -> SegmentPassResult | None:
        """One segment's pass in its own transaction; a failure is set aside, not raised,
        so the segments after it (its dependents, the other due ones) still run."""
        started = time.monotonic()
        subject = FailureSubject("segment", slug, "segment_pass")
        try:
            with self.engine.begin() as conn:
                diff = segment_store.evaluate_segment(conn, slug=slug, now=now)
                clear_failures(conn, kind="segment", stage="segment_pass", keys=[slug])
        except Exception as exc:  # noqa: BLE001 - set aside, never stop the others
            with self.engine.begin() as conn:
                failure = record_failure(conn, subject=subject, error=exc, now=datetime.now(UTC))
            log.error(
                "segment %s set aside (attempt %d): %s", slug, failure.attempts, failure.error
            )
            return None
        return SegmentPassResult(
            slug=slug,
            entries=diff.entries,
            exits=diff.exits,
            duration_ms=int((time.monotonic() - started) * 1000),
        )
