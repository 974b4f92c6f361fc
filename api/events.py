"""Behavioural events in: one at a time or in bulk, idempotent by `event_id`."""

from __future__ import annotations

from fastapi import Query, Request, Response
from pydantic import BaseModel

from api.boundary import resource_router
from api.bulk import BulkResult, PartlyRejected, read_batch
from api.deps import BrowserKey, IngestKey
from api.observability import remember_trace
from core.events import EventIn, EventRecord
from store.event_writers import BulkWriter, EventWriter

router = resource_router(prefix="/v1/events", tags=["events"])


class EventAccepted(BaseModel):
    event_id: str
    duplicate: bool


@router.post(
    "",
    response_model=EventAccepted,
    status_code=201,
    responses={200: {"model": EventAccepted, "description": "a repeat of a stored event_id"}},
)
async def post_event(
    event: EventIn, request: Request, _: BrowserKey, response: Response
) -> EventAccepted:
    """Store one event; a repeated `event_id` answers 200 `{"duplicate": true}`. Roles
    ingest and web (a storefront page posts its visitor's events)."""
    writer: EventWriter = request.app.state.event_writer
    inserted = await writer.write(event)
    await remember_trace(request, event.customer_id)
    if not inserted:
        response.status_code = 200
    return EventAccepted(event_id=event.event_id, duplicate=not inserted)


@router.post(
    "/bulk",
    response_model=BulkResult,
    responses={
        400: {"description": "an empty body, or not NDJSON or a JSON array"},
        422: {"description": "some lines rejected; the body reports what was stored"},
    },
)
async def post_events_bulk(
    request: Request,
    _: IngestKey,
    realtime: bool = Query(
        True, description="false for a history import: no real-time rescoring or journeys"
    ),
) -> BulkResult:
    """NDJSON or a JSON array of events: valid lines are stored, invalid ones reported."""
    settings = request.app.state.settings
    batch = await read_batch(request, EventRecord, settings.max_bulk_lines)

    writer: BulkWriter = request.app.state.bulk_writer
    accepted = await writer.write(batch.records, realtime=realtime)
    result = BulkResult(
        accepted=accepted, duplicates=len(batch.records) - accepted, rejected=batch.rejected
    )
    if batch.rejected:
        raise PartlyRejected(result)
    return result
