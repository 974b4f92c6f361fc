"""Customer profiles: create or replace, merge, bulk upsert, and the whole picture of one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, EmailStr, Field

from api.boundary import resource_router
from api.bulk import BulkResult, PartlyRejected, read_batch
from api.deps import EngineDep, IngestKey, require_role
from api.runs import RunPublic
from core.bounds import DataObject
from core.errors import NotFound
from core.events import CustomerBulkLine, CustomerIn
from core.predictions import CustomerPrediction
from core.tables import utcnow
from store.customers import (
    customer_segments,
    get_customer,
    patch_customer,
    put_customer,
    upsert_customers,
)
from store.keys import VerifiedKey
from store.predictions import customer_predictions
from store.rfm_models import CustomerScore, customer_scores
from store.runs import customer_runs

router = resource_router(prefix="/v1/customers", tags=["customers"])

CustomerId = Annotated[str, Path(min_length=1, max_length=255)]
ReaderKey = Annotated[VerifiedKey, Depends(require_role("support", "marketer", "ingest"))]


class CustomerPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    email: EmailStr | None = None
    phone: str | None = Field(default=None, pattern=r"^\+?[0-9 ()-]{4,31}$")
    attributes: DataObject = Field(default_factory=dict)


class Subscription(BaseModel):
    email: bool
    sms: bool
    email_unsubscribed_at: datetime | None = None
    sms_unsubscribed_at: datetime | None = None


class SegmentMembershipPublic(BaseModel):
    segment: str
    since: datetime


class CustomerPublic(BaseModel):
    id: str
    email: str | None
    phone: str | None
    attributes: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    subscription: Subscription


class CustomerDetail(CustomerPublic):
    scores: list[CustomerScore] = Field(default_factory=list)
    predictions: list[CustomerPrediction] = Field(
        default_factory=list, description="each predictive model's probability and level"
    )
    segments: list[SegmentMembershipPublic] = Field(default_factory=list)
    journeys: list[RunPublic] = Field(default_factory=list)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "email": row["email"],
        "phone": row["phone"],
        "attributes": row["attributes"] or {},
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "subscription": Subscription(
            email=row["email_unsubscribed_at"] is None,
            sms=row["sms_unsubscribed_at"] is None,
            email_unsubscribed_at=row["email_unsubscribed_at"],
            sms_unsubscribed_at=row["sms_unsubscribed_at"],
        ),
    }


@router.put(
    "/{customer_id}",
    response_model=CustomerPublic,
    status_code=201,
    responses={200: {"model": CustomerPublic, "description": "replaced"}},
)
def put(
    customer_id: CustomerId, body: CustomerIn, engine: EngineDep, _: IngestKey, response: Response
) -> CustomerPublic:
    """Create or replace a profile (attributes not given are removed)."""
    with engine.begin() as conn:
        row, created = put_customer(conn, customer_id=customer_id, profile=body, now=utcnow())
    response.status_code = 201 if created else 200
    return CustomerPublic(**_public(row))


@router.patch("/{customer_id}", response_model=CustomerPublic)
def patch(
    customer_id: CustomerId, body: CustomerPatch, engine: EngineDep, _: IngestKey
) -> CustomerPublic:
    """Merge attributes (a null value removes one); email and phone replaced when given."""
    changes = body.model_dump(exclude_unset=True)
    with engine.begin() as conn:
        row, _created = patch_customer(conn, customer_id=customer_id, changes=changes, now=utcnow())
    return CustomerPublic(**_public(row))


@router.get("/{customer_id}", response_model=CustomerDetail)
def get(customer_id: CustomerId, engine: EngineDep, _: ReaderKey) -> CustomerDetail:
    """The profile, each RFM model's scores and label, each predictive model's probability
    and level, segments, journey runs, subscriptions."""
    with engine.connect() as conn:
        row = get_customer(conn, customer_id=customer_id)
        if row is None:
            raise NotFound(f"no customer {customer_id}", field="customer_id")
        segments = customer_segments(conn, customer_id=customer_id)
        scores = customer_scores(conn, customer_id=customer_id)
        predictions = customer_predictions(conn, customer_id=customer_id)
        journeys = [
            RunPublic.model_validate(run.model_dump(exclude={"timeline"}))
            for run in customer_runs(conn, customer_id=customer_id)
        ]
    return CustomerDetail(
        **_public(row),
        segments=segments,
        scores=scores,
        predictions=predictions,
        journeys=journeys,
    )


@router.post(
    "/bulk",
    response_model=BulkResult,
    responses={
        400: {"description": "an empty body, or not NDJSON or a JSON array"},
        422: {"description": "some lines rejected; the body reports what was stored"},
    },
)
async def post_customers_bulk(request: Request, engine: EngineDep, _: IngestKey) -> BulkResult:
    """NDJSON of `{"customer_id", "email", "phone", "attributes"}`: upserts, attributes merged."""
    settings = request.app.state.settings
    batch = await read_batch(request, CustomerBulkLine, settings.max_bulk_lines)

    def store() -> int:
        with engine.begin() as conn:
            return upsert_customers(conn, lines=batch.records, now=utcnow())

    accepted = await run_in_threadpool(store) if batch.records else 0
    result = BulkResult(accepted=accepted, rejected=batch.rejected)
    if batch.rejected:
        raise PartlyRejected(result)
    return result
