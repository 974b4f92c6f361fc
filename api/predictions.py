"""`/v1/predictive-models`: predictive model definitions, trainings with their validation
figures, and scores.

A model with a `schedule` has a Temporal Schedule (`prediction-train:{slug}`) and a save
starts its first training at once (a durable workflow). Saving or deleting such a model
talks to Temporal inside the database transaction: if Temporal cannot be reached the
transaction rolls back and the answer is 503. A model without a schedule needs no
Temporal: it trains when asked (`POST .../train`). Transactions run in the thread pool,
never on the event loop (see api/segments.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated

import orjson
from fastapi import Header, Request, Response
from fastapi.concurrency import contextmanager_in_threadpool, run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Connection, Engine

from api.boundary import CONFLICT, NEEDS_TEMPORAL, PageLimit, resource_router
from api.deps import EngineDep, MarketerKey, SupportKey, TemporalUnavailable
from api.schedules import start_prediction_training, sync_prediction_schedule
from core.bounds import Instant
from core.cursors import decode_cursor, encode_cursor
from core.errors import ErrorDetail, ValidationFailed
from core.predictions import (
    PredictiveModelCreate,
    PredictiveModelPublic,
    PredictiveModelUpdate,
    TrainingPublic,
)
from core.tables import utcnow
from store import predictions as prediction_store
from store.failures import forget_record
from store.prediction_training import train_and_score

router = resource_router(prefix="/v1/predictive-models", tags=["predictions"])

NDJSON = "application/x-ndjson"
EXPORT_PAGE = 10_000


class PredictiveModelsPublic(BaseModel):
    data: list[PredictiveModelPublic]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    as_of: Instant | None = Field(
        None,
        description="train on history before this instant, labels from the horizon ending"
        " at it, and score everyone as of it (default now)",
    )


class TrainingsPublic(BaseModel):
    data: list[TrainingPublic]


class PredictionScorePublic(BaseModel):
    customer_id: str
    probability: float
    level: str = Field(description="low | medium | high, from the model's levels")


class PredictionScoresPublic(BaseModel):
    data: list[PredictionScorePublic]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


def _public(
    conn: Connection, model: prediction_store.StoredPredictiveModel
) -> PredictiveModelPublic:
    return model.public(prediction_store.latest_training(conn, slug=model.slug))


async def _sync_schedule(
    request: Request, slug: str, every: timedelta | None, *, version: int | None = None
) -> None:
    """Keep the model's schedule in step and start the first training of a saved
    `version`; 503 when Temporal is away (the caller's transaction rolls back)."""
    settings = request.app.state.settings
    try:
        client = await asyncio.wait_for(request.app.state.temporal.get(), timeout=10)
        await asyncio.wait_for(
            sync_prediction_schedule(
                client, model_slug=slug, every=every, task_queue=settings.task_queue
            ),
            timeout=10,
        )
        if version is not None:
            await asyncio.wait_for(
                start_prediction_training(
                    client, model_slug=slug, version=version, task_queue=settings.task_queue
                ),
                timeout=10,
            )
    except Exception as exc:  # any failure to reach Temporal: nothing is saved
        raise TemporalUnavailable(
            f"Temporal at {settings.temporal_address} could not be reached to save the"
            f" schedule of predictive model {slug!r}; nothing was changed, try again"
            f" ({type(exc).__name__})",
            field="schedule",
        ) from exc


@router.post(
    "",
    response_model=PredictiveModelPublic,
    status_code=201,
    responses={**CONFLICT, **NEEDS_TEMPORAL},
)
async def create(
    body: PredictiveModelCreate, request: Request, engine: EngineDep, _: MarketerKey
) -> PredictiveModelPublic:
    """Create a model (version 1). With a `schedule`, its schedule is created and a first
    training starts at once; without, train it with `POST .../train`."""
    async with contextmanager_in_threadpool(engine.begin()) as conn:
        stored = await run_in_threadpool(
            prediction_store.create_model, conn, model=body, now=utcnow()
        )
        if body.schedule is not None:
            await _sync_schedule(request, body.slug, body.schedule, version=stored.version)
        return await run_in_threadpool(_public, conn, stored)


@router.get("", response_model=PredictiveModelsPublic)
def list_(
    engine: EngineDep,
    _: SupportKey,
    limit: PageLimit = 100,
    cursor: str | None = None,
) -> PredictiveModelsPublic:
    """Models by slug, each with its latest training's status."""
    after = decode_cursor(cursor) if cursor else None
    with engine.connect() as conn:
        rows = prediction_store.list_models(conn, limit=limit + 1, after=after)
        page = rows[:limit]
        latest = prediction_store.latest_trainings(conn, slugs=[m.slug for m in page])
    return PredictiveModelsPublic(
        data=[m.public(latest.get(m.slug)) for m in page],
        next_cursor=encode_cursor(page[-1].slug) if len(rows) > limit else None,
    )


@router.get("/{slug}", response_model=PredictiveModelPublic)
def get(slug: str, engine: EngineDep, _: SupportKey) -> PredictiveModelPublic:
    """The model, its status and its latest training with the validation figures."""
    with engine.connect() as conn:
        return _public(conn, prediction_store.get_model(conn, slug=slug))


@router.put(
    "/{slug}", response_model=PredictiveModelPublic, responses={**CONFLICT, **NEEDS_TEMPORAL}
)
async def replace(
    slug: str, body: PredictiveModelUpdate, request: Request, engine: EngineDep, _: MarketerKey
) -> PredictiveModelPublic:
    """Store a new version: the scores take its levels at once, and its target and
    features at the next training (a first one starts now when it has a schedule)."""
    if body.slug is not None and body.slug != slug:
        raise ValidationFailed(
            [ErrorDetail("invalid", f"slug {body.slug!r} is not the path's {slug!r}", "slug")]
        )

    def update(
        conn: Connection,
    ) -> tuple[prediction_store.StoredPredictiveModel, prediction_store.StoredPredictiveModel]:
        before = prediction_store.get_model(conn, slug=slug, lock=True)
        after = prediction_store.update_model(conn, slug=slug, definition=body, now=utcnow())
        forget_record(conn, kind="prediction_model", key=slug)
        return before, after

    async with contextmanager_in_threadpool(engine.begin()) as conn:
        before, stored = await run_in_threadpool(update, conn)
        if body.schedule is not None or before.definition.schedule is not None:
            version = stored.version if body.schedule is not None else None
            await _sync_schedule(request, slug, body.schedule, version=version)
        return await run_in_threadpool(_public, conn, stored)


@router.delete(
    "/{slug}",
    status_code=204,
    response_class=Response,
    responses={**CONFLICT, **NEEDS_TEMPORAL},
)
async def delete(slug: str, request: Request, engine: EngineDep, _: MarketerKey) -> Response:
    """Delete the model, its trainings and scores; 409 `in_use` while a condition names it."""

    def delete_(conn: Connection) -> prediction_store.StoredPredictiveModel:
        before = prediction_store.get_model(conn, slug=slug, lock=True)
        prediction_store.delete_model(conn, slug=slug)
        forget_record(conn, kind="prediction_model", key=slug)
        return before

    async with contextmanager_in_threadpool(engine.begin()) as conn:
        before = await run_in_threadpool(delete_, conn)
        if before.definition.schedule is not None:
            await _sync_schedule(request, slug, None)
    return Response(status_code=204)


@router.post("/{slug}/train", response_model=TrainingPublic, responses={**CONFLICT})
def train(
    slug: str, engine: EngineDep, _: MarketerKey, body: TrainRequest | None = None
) -> TrainingPublic:
    """Train now on the history before `as_of` (labels from the horizon that ends at it;
    nothing after it is read), score everyone as of it, and answer the validation
    figures: AUC, Brier score and calibration table on the time-based holdout beside the
    RFM heuristic and BG/NBD. 409 `not_enough_history` when the store holds too little."""
    as_of = (body.as_of if body else None) or datetime.now(UTC)
    if as_of > datetime.now(UTC):
        raise ValidationFailed(
            [
                ErrorDetail(
                    "invalid_value", "as_of is in the future: its horizon is not over", "as_of"
                )
            ]
        )
    outcome = train_and_score(engine, slug=slug, as_of=as_of)
    with engine.connect() as conn:
        return prediction_store.get_training(conn, training_id=outcome.training_id).public()


@router.get("/{slug}/trainings", response_model=TrainingsPublic)
def trainings(
    slug: str,
    engine: EngineDep,
    _: SupportKey,
    limit: PageLimit = 20,
) -> TrainingsPublic:
    """The model's trainings, newest first, each with its status and figures."""
    with engine.connect() as conn:
        prediction_store.get_model(conn, slug=slug)
        rows = prediction_store.list_trainings(conn, slug=slug, limit=limit)
    return TrainingsPublic(data=[t.public() for t in rows])


def _stream_scores(engine: Engine, slug: str) -> Iterator[bytes]:
    after: str | None = None
    while True:
        with engine.connect() as conn:
            rows = prediction_store.page_scores(conn, slug=slug, limit=EXPORT_PAGE, after=after)
        if not rows:
            return
        yield b"".join(orjson.dumps(row.model_dump()) + b"\n" for row in rows)
        after = rows[-1].customer_id


@router.get(
    "/{slug}/scores",
    response_model=PredictionScoresPublic,
    responses={
        200: {
            "content": {NDJSON: {"schema": {"$ref": "#/components/schemas/PredictionScorePublic"}}}
        }
    },
)
def scores(
    slug: str,
    engine: EngineDep,
    _: SupportKey,
    limit: PageLimit = 100,
    cursor: str | None = None,
    accept: Annotated[str, Header()] = "application/json",
) -> PredictionScoresPublic | StreamingResponse:
    """Every scored customer's probability and level by customer id: pages of JSON, or
    every row as NDJSON (`Accept: application/x-ndjson`)."""
    with engine.connect() as conn:
        prediction_store.get_model(conn, slug=slug)
        if NDJSON in accept:
            return StreamingResponse(_stream_scores(engine, slug), media_type=NDJSON)
        after = decode_cursor(cursor) if cursor else None
        rows = prediction_store.page_scores(conn, slug=slug, limit=limit + 1, after=after)
    page = rows[:limit]
    return PredictionScoresPublic(
        data=[PredictionScorePublic(**row.model_dump()) for row in page],
        next_cursor=encode_cursor(page[-1].customer_id) if len(rows) > limit else None,
    )
