"""Journey analytics: the funnel of one journey (optionally one version, one entry window)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from api.boundary import resource_router
from api.deps import SessionDep, SupportKey
from core.bounds import MAX_VERSION, Instant
from core.errors import ErrorDetail, NotFound, ValidationFailed
from store.analytics import JourneyAnalytics, journey_analytics, journey_exists

router = resource_router(tags=["analytics"])


@router.get(
    "/v1/journeys/{slug}/analytics",
    response_model=JourneyAnalytics,
    summary="A journey's results: conversions and, per step, reach, sends and exits taken",
)
def get_journey_analytics(
    slug: Annotated[str, Path(min_length=1, max_length=200)],
    session: SessionDep,
    _: SupportKey,
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
    entered_from: Annotated[
        Instant | None, Query(alias="from", description="Runs that entered at or after.")
    ] = None,
    entered_to: Annotated[
        Instant | None, Query(alias="to", description="Runs that entered before.")
    ] = None,
) -> JourneyAnalytics:
    """Triggered, converted, conversion rate, average days from entry to the goal event,
    in progress, exited early; per step entered, sent, delivered, opened, clicked,
    failed, skipped, in doubt, and each decision point's exits with their shares."""
    for name, value in (("from", entered_from), ("to", entered_to)):
        if value is not None and value.tzinfo is None:
            raise ValidationFailed(
                [ErrorDetail("invalid", f"{name} must carry a time zone (e.g. Z)", name)]
            )
    if entered_from and entered_to and entered_from >= entered_to:
        raise ValidationFailed([ErrorDetail("invalid", "from must be before to", "from")])
    conn = session.connection()
    if not journey_exists(conn, journey_slug=slug):
        raise NotFound(f"no journey {slug!r}", field="slug")
    return journey_analytics(
        conn,
        journey_slug=slug,
        version=version,
        entered_from=entered_from,
        entered_to=entered_to,
    )
