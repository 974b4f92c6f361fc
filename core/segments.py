"""What a scheduled segment evaluation is started with (shared by the API and the worker)."""

from __future__ import annotations

from pydantic import BaseModel

SEGMENT_WORKFLOW = "SegmentEvaluationWorkflow"


class SegmentEvaluationInput(BaseModel):
    """What a run evaluates: one segment, or every due one (`slug` None). `version`, set
    by a save, is the version the run must evaluate: until the save's transaction is
    visible, the activity fails and is retried."""

    slug: str | None = None
    version: int | None = None


def segment_schedule_id(slug: str) -> str:
    return f"segment-eval:{slug}"


def segment_save_workflow_id(slug: str, version: int) -> str:
    """The evaluation a save starts: one per saved version (a repeat start is a no-op)."""
    return f"segment-save:{slug}:v{version}"
