"""`/v1/rfm-models`: RFM model definitions, scoring passes, scores and summaries.

A model with a `schedule` has a Temporal Schedule (`rfm-score:{slug}`). Saving or
deleting such a model talks to Temporal inside the database transaction: if Temporal
cannot be reached the transaction is rolled back and the answer is 503, so a stored
model always has the schedule it says it has. The transaction and its statements run in
the thread pool, never on the event loop (see api/segments.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated

import orjson
from fastapi import Header, Request
from fastapi.concurrency import contextmanager_in_threadpool, run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, computed_field
from sqlalchemy.engine import Connection, Engine

from api.boundary import CONFLICT, NDJSON, NEEDS_TEMPORAL, PageLimit, resource_router
from api.deps import EngineDep, MarketerKey, TemporalUnavailable
from api.schedules import start_rfm_pass, sync_rfm_schedule
from core.bounds import Instant
from core.cursors import decode_cursor, encode_cursor
from core.errors import ErrorDetail, ValidationFailed
from core.rfm import RfmModelCreate, RfmModelPublic, RfmModelUpdate, segment_slug
from core.tables import utcnow
from store import rfm_models as model_store
from store import scoring as scoring_store
from store.rfm_models import StoredModel

router = resource_router(prefix="/v1/rfm-models", tags=["rfm"])

EXPORT_PAGE = 10_000


class RfmModelsPublic(BaseModel):
    data: list[RfmModelPublic]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


class RfmModelDeleted(BaseModel):
    slug: str
    deleted: bool = True
    exits: int = Field(description="customers who left the model's segments")


class ScoreRequest(BaseModel):
    as_of: Instant | None = Field(None, description="score as of this instant (default now)")


class ScorePassPublic(BaseModel):
    pass_id: int
    as_of: datetime
    scored: int
    entries: int
    exits: int
    duration_ms: int


class ScorePublic(BaseModel):
    customer_id: str
    recency_days: int
    frequency: int
    monetary: float
    r: int
    f: int
    m: int
    label: str


class ScoresPublic(BaseModel):
    data: list[ScorePublic]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


class LabelSummary(BaseModel):
    label: str
    segment: str
    count: int
    share: float = Field(description="count / scored customers (0 when nobody is scored)")
    monetary: float = Field(description="sum of the monetary measure of the label's customers")


class GridRow(BaseModel):
    r: int
    counts: list[int] = Field(description="customers with this R and F = 1..5")

    @computed_field(description='the same counts keyed by F score: {"F1": n, ..., "F5": n}')
    @property
    def by_f(self) -> dict[str, int]:
        return {f"F{f}": count for f, count in enumerate(self.counts, start=1)}


class SummaryPublic(BaseModel):
    model: str
    pass_id: int | None
    as_of: datetime | None
    scored: int
    labels: list[LabelSummary]
    grid: list[GridRow] = Field(description="R 5 down to 1, F 1..5 across")


# --- models ---------------------------------------------------------------------------


async def _sync_schedule(
    request: Request, slug: str, every: timedelta | None, *, version: int | None = None
) -> None:
    """Keep the model's schedule in step, and start the first pass of a saved `version`;
    503 when Temporal is away (the caller's transaction rolls back)."""
    settings = request.app.state.settings
    try:
        client = await asyncio.wait_for(request.app.state.temporal.get(), timeout=10)
        await asyncio.wait_for(
            sync_rfm_schedule(client, model_slug=slug, every=every, task_queue=settings.task_queue),
            timeout=10,
        )
        if version is not None:
            await asyncio.wait_for(
                start_rfm_pass(
                    client, model_slug=slug, version=version, task_queue=settings.task_queue
                ),
                timeout=10,
            )
    except Exception as exc:  # any failure to reach Temporal: nothing is saved
        raise TemporalUnavailable(
            f"Temporal at {settings.temporal_address} could not be reached to save the"
            f" schedule of RFM model {slug!r}; nothing was changed, try again"
            f" ({type(exc).__name__})",
            field="schedule",
        ) from exc


@router.post(
    "", response_model=RfmModelPublic, status_code=201, responses={**CONFLICT, **NEEDS_TEMPORAL}
)
async def create(
    body: RfmModelCreate, request: Request, engine: EngineDep, _: MarketerKey
) -> RfmModelPublic:
    """Create a model (version 1) and its label segments `slug:label`, and start its first
    scoring pass at once (a durable workflow)."""
    async with contextmanager_in_threadpool(engine.begin()) as conn:
        stored = await run_in_threadpool(model_store.create_model, conn, model=body, now=utcnow())
        await _sync_schedule(request, body.slug, body.schedule, version=stored.version)
    return stored.public()


@router.get("", response_model=RfmModelsPublic)
def list_(
    engine: EngineDep,
    _: MarketerKey,
    limit: PageLimit = 100,
    cursor: str | None = None,
) -> RfmModelsPublic:
    with engine.connect() as conn:
        rows = model_store.list_models(conn, limit=limit + 1, after=cursor)
    page = rows[:limit]
    return RfmModelsPublic(
        data=[m.public() for m in page],
        next_cursor=page[-1].slug if len(rows) > limit else None,
    )


@router.get("/{slug}", response_model=RfmModelPublic)
def get(slug: str, engine: EngineDep, _: MarketerKey) -> RfmModelPublic:
    with engine.connect() as conn:
        return model_store.get_model(conn, slug=slug).public()


@router.put("/{slug}", response_model=RfmModelPublic, responses={**CONFLICT, **NEEDS_TEMPORAL})
async def replace(
    slug: str, body: RfmModelUpdate, request: Request, engine: EngineDep, _: MarketerKey
) -> RfmModelPublic:
    """Store a new version and start a full pass of it at once (a durable workflow)."""
    if body.slug is not None and body.slug != slug:
        raise ValidationFailed(
            [ErrorDetail("invalid", f"slug {body.slug!r} is not the path's {slug!r}", "slug")]
        )

    def update(conn: Connection) -> tuple[StoredModel, StoredModel]:
        before = model_store.get_model(conn, slug=slug, lock=True)
        return before, model_store.update_model(conn, slug=slug, definition=body, now=utcnow())

    async with contextmanager_in_threadpool(engine.begin()) as conn:
        before, stored = await run_in_threadpool(update, conn)
        await _sync_schedule(request, slug, body.schedule, version=stored.version)
    return stored.public()


@router.delete("/{slug}", response_model=RfmModelDeleted, responses={**CONFLICT, **NEEDS_TEMPORAL})
async def delete(slug: str, request: Request, engine: EngineDep, _: MarketerKey) -> RfmModelDeleted:
    """Delete the model, its scores and segments (members exit, with transitions)."""

    def delete_(conn: Connection) -> tuple[StoredModel, int]:
        before = model_store.get_model(conn, slug=slug, lock=True)
        return before, model_store.delete_model(conn, slug=slug, now=utcnow())

    async with contextmanager_in_threadpool(engine.begin()) as conn:
        before, exits = await run_in_threadpool(delete_, conn)
        if before.definition.schedule is not None:
            await _sync_schedule(request, slug, None)
    return RfmModelDeleted(slug=slug, exits=exits)


# --- passes and scores ----------------------------------------------------------------


@router.post("/{slug}/score", response_model=ScorePassPublic)
def score(
    slug: str, engine: EngineDep, _: MarketerKey, body: ScoreRequest | None = None
) -> ScorePassPublic:
    """Run a full scoring pass now (as of `as_of`, default now), in one transaction."""
    as_of = (body.as_of if body else None) or datetime.now(UTC)
    with engine.begin() as conn:
        result = scoring_store.score_model(conn, model_slug=slug, as_of=as_of)
    return ScorePassPublic(
        pass_id=result.pass_id,
        as_of=result.as_of,
        scored=result.scored,
        entries=result.entries,
        exits=result.exits,
        duration_ms=result.duration_ms,
    )


def _stream_scores(engine: Engine, slug: str) -> Iterator[bytes]:
    after: str | None = None
    while True:
        with engine.connect() as conn:
            rows = scoring_store.page_scores(conn, model_slug=slug, limit=EXPORT_PAGE, after=after)
        if not rows:
            return
        yield b"".join(orjson.dumps(row) + b"\n" for row in rows)
        after = rows[-1]["customer_id"]


@router.get(
    "/{slug}/scores",
    response_model=ScoresPublic,
    responses={
        200: {"content": {NDJSON: {"schema": {"$ref": "#/components/schemas/ScorePublic"}}}}
    },
)
def scores(
    slug: str,
    engine: EngineDep,
    _: MarketerKey,
    limit: PageLimit = 100,
    cursor: str | None = None,
    accept: Annotated[str, Header()] = "application/json",
) -> ScoresPublic | StreamingResponse:
    """The model's scores by customer id: pages of JSON, or every row as NDJSON
    (`Accept: application/x-ndjson`)."""
    with engine.connect() as conn:
        model_store.get_model(conn, slug=slug)
        if NDJSON in accept:
            return StreamingResponse(_stream_scores(engine, slug), media_type=NDJSON)
        after = decode_cursor(cursor) if cursor else None
        rows = scoring_store.page_scores(conn, model_slug=slug, limit=limit + 1, after=after)
    page = rows[:limit]
    return ScoresPublic(
        data=[ScorePublic(**row) for row in page],
        next_cursor=encode_cursor(page[-1]["customer_id"]) if len(rows) > limit else None,
    )


@router.get("/{slug}/summary", response_model=SummaryPublic)
def summary(slug: str, engine: EngineDep, _: MarketerKey) -> SummaryPublic:
    """Per label: count, share and monetary; and the 5x5 R-by-F grid of counts."""
    with engine.connect() as conn:
        model = model_store.get_model(conn, slug=slug)
        last = model_store.latest_pass(conn, slug=slug)
        totals = scoring_store.summarize(conn, model_slug=slug)
    by_label = totals["labels"]
    scored = sum(item["count"] for item in by_label.values())
    labels = model.definition.labels() + sorted(set(by_label) - set(model.definition.labels()))
    return SummaryPublic(
        model=slug,
        pass_id=last["id"] if last else None,
        as_of=last["as_of"] if last else None,
        scored=scored,
        labels=[
            LabelSummary(
                label=label,
                segment=segment_slug(slug, label),
                count=by_label.get(label, {}).get("count", 0),
                share=(by_label.get(label, {}).get("count", 0) / scored) if scored else 0.0,
                monetary=by_label.get(label, {}).get("monetary", 0.0),
            )
            for label in labels
        ],
        grid=[GridRow(r=r, counts=totals["grid"][r - 1]) for r in (5, 4, 3, 2, 1)],
    )
