"""Why a customer is where they are: `GET /v1/customers/{id}/explain` (support and up)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from api.boundary import resource_router
from api.deps import EngineDep, SupportKey
from core.bounds import MAX_ID_LENGTH
from core.errors import ErrorDetail, ValidationFailed
from core.tables import utcnow
from store.explain import (
    Explanation,
    explain_journey,
    explain_personalization,
    explain_segment,
)

router = resource_router(tags=["customers"])

Slug = Annotated[str | None, Query(min_length=1, max_length=MAX_ID_LENGTH)]


@router.get(
    "/v1/customers/{customer_id}/explain",
    response_model=Explanation,
    summary="Why a customer is (or is not) in a segment, a journey branch or an experience",
)
def get_explanation(
    customer_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH)],
    engine: EngineDep,
    _: SupportKey,
    segment: Slug = None,
    journey: Slug = None,
    step: Annotated[
        str | None,
        Query(min_length=1, max_length=MAX_ID_LENGTH, description="a branch step of `journey`"),
    ] = None,
    personalization: Slug = None,
) -> Explanation:
    """Give one of `segment`, `journey` (its trigger; with `step`, that branch step) or
    `personalization`. The answer is the condition tree with each node evaluated for the
    customer now (`result`, and the `value` it compared), each from the node's own
    compiled SQL: the same SQL the segment evaluation, the branch and the decision run."""
    given = [
        name
        for name, value in (
            ("segment", segment),
            ("journey", journey),
            ("personalization", personalization),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise ValidationFailed(
            [
                ErrorDetail(
                    "invalid",
                    "give exactly one of segment, journey (with step for a branch) or"
                    " personalization",
                    given[1] if len(given) > 1 else "segment",
                )
            ]
        )
    if step is not None and journey is None:
        raise ValidationFailed([ErrorDetail("invalid", "step goes with journey", "step")])
    now = utcnow()
    with engine.connect() as conn:
        if segment is not None:
            return explain_segment(conn, customer_id=customer_id, slug=segment, now=now)
        if journey is not None:
            return explain_journey(conn, customer_id=customer_id, slug=journey, step=step, now=now)
        assert personalization is not None
        return explain_personalization(conn, customer_id=customer_id, slug=personalization, now=now)
