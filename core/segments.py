"""What a scheduled segment evaluation is started with (shared by the API and the worker)."""

from __future__ import annotations

from pydantic import BaseModel

SEGMENT_WORKFLOW = "SegmentEvaluationWorkflow"


class SegmentEvaluationInput(BaseModel):
    """What a scheduled run evaluates: one segment, or every due one (`slug` None)."""

    slug: str | None = None


def segment_schedule_id(slug: str) -> str:
    return f"segment-eval:{slug}"
