"""Segments: rule-based definitions, preview, evaluation, members, transitions, and the
entries / exits of externally owned segments.

Saving or deleting a rule segment creates, updates or deletes its Temporal Schedule
(`segment-eval:{slug}`) in the same request; if Temporal cannot be reached the change is
rolled back and the answer is 503, so a stored rule segment always has its schedule.
Those routes await Temporal, so they are async, and their store calls go to the thread
pool: a SQLite write waiting for the lock on the event loop would stop every request,
the one holding the lock among them (its commit is scheduled there), for the busy timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from api.boundary import CONFLICT, NDJSON, NEEDS_TEMPORAL, PageLimit, resource_router, wants_ndjson
from api.deps import EngineDep, IngestKey, MarketerKey, SessionDep, SupportKey, TemporalUnavailable
from api.schedules import (
    delete_segment_schedule,
    start_segment_evaluation,
    upsert_segment_schedule,
)
from core.bounds import MAX_INSTANT, MIN_INSTANT, Instant
from core.conditions import parse_instant
from core.cursors import MAX_POSITION, decode_cursor, encode_cursor
from core.durations import parse_duration
from core.errors import Conflict, ErrorDetail, ValidationFailed
from core.segments import segment_save_workflow_id
from core.tables import UTCDateTime, utcnow
from store import segments as segment_store
from store.failures import FailureRecord, errors_by_key, forget_record
from store.transitions import MembershipDiff, record_transitions

router = resource_router(prefix="/v1/segments", tags=["segments"])

SLUG_PATTERN = r"^[a-z0-9][a-z0-9_.:\-]{0,199}$"
MAX_CUSTOMER_IDS = 10_000


# --- request and response models -------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentCreate(_Body):
    slug: str = Field(pattern=SLUG_PATTERN, description="lower case; letters, digits, _ . : -")
    name: str = Field(min_length=1, max_length=255)
    condition: Any = Field(
        default=None, description="the condition language (docs/conditions.md); none when external"
    )
    schedule: str | None = Field(default=None, description="ISO 8601 interval, default PT5M")
    owner: Literal["journeys", "external"] = Field(
        default="journeys", description='"external": members are posted to /entries and /exits'
    )


class SegmentUpdate(_Body):
    name: str = Field(min_length=1, max_length=255)
    condition: Any = None
    schedule: str | None = None


class SegmentPublic(BaseModel):
    slug: str
    name: str
    kind: str = Field(description="rule | external | rfm")
    owner: str = Field(description="journeys | external | rfm-model:<slug>")
    condition: dict[str, Any] | None
    schedule: str | None = Field(description="evaluation interval of a rule segment")
    version: int
    created_at: datetime
    updated_at: datetime
    evaluated_at: datetime | None
    state: Literal["evaluating", "ready"] = Field(
        description=(
            "evaluating: the saved version has not had its full evaluation yet (it started"
            " at the save); ready: members are those of the saved definition"
        )
    )
    evaluated_version: int | None = Field(description="the version the last full pass evaluated")
    member_count: int
    progress: str | None = Field(
        default=None, description="while evaluating (one segment's GET): the pass's step"
    )
    status: Literal["ok", "failing"] = Field(
        description="failing: set aside by real-time or scheduled evaluation (see error)"
    )
    error: str | None = Field(description="why it is failing; retried with backoff")


class SegmentsPublic(BaseModel):
    data: list[SegmentPublic]
    next_cursor: str | None = Field(
        default=None, description="pass as ?cursor= for the next page; null at the end"
    )


class PreviewRequest(_Body):
    condition: Any
    sample: int = Field(default=20, ge=0, le=1_000)
    as_of: Instant | None = Field(
        default=None, description="evaluate as of this instant (default now), for backtests"
    )


class EvaluateRequest(_Body):
    as_of: Instant | None = Field(
        default=None, description="evaluate as of this instant (default now)"
    )


DEFAULT_WAIT_SECONDS = 30.0
WaitQuery = Annotated[
    bool, Query(description="answer once the saved version's evaluation is ready")
]
WaitSecondsQuery = Annotated[
    float, Query(gt=0, le=300, description="how long ?wait=true waits at most")
]


class PreviewPublic(BaseModel):
    count: int
    sample: list[str]


class SegmentPassPublic(BaseModel):
    slug: str
    entries: int
    exits: int
    error: str | None = Field(
        default=None, description="why this segment was set aside instead of evaluated"
    )


class EvaluationFailed(Conflict):
    code = "evaluation_failed"


class EvaluationPublic(BaseModel):
    slug: str
    entries: int
    exits: int
    duration_ms: int
    dependents: list[SegmentPassPublic] = Field(description="rule segments re-evaluated after it")


class MemberPublic(BaseModel):
    customer_id: str
    since: datetime


class MembersPage(BaseModel):
    data: list[MemberPublic]
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next page; null at the end"
    )


class TransitionPublic(BaseModel):
    id: int
    customer_id: str
    kind: str = Field(description="entered | exited")
    source: str
    occurred_at: datetime


class TransitionsPage(BaseModel):
    data: list[TransitionPublic]
    next_cursor: str | None = Field(
        description="the last id returned: pass as ?since= to follow; null when none were returned"
    )


class CustomerIdsRequest(_Body):
    customer_ids: list[Annotated[str, Field(min_length=1, max_length=255)]] = Field(
        min_length=1, max_length=MAX_CUSTOMER_IDS
    )


class MembershipChangePublic(BaseModel):
    entries: int
    exits: int
    created_customers: int = 0


# --- helpers ---------------------------------------------------------------------------


def _publics(conn: Connection, segments: list[segment_store.SegmentRecord]) -> list[SegmentPublic]:
    errors = errors_by_key(conn, kind="segment")
    counts = segment_store.member_counts(conn, slugs=[s.slug for s in segments])
    return [_public(s, error=errors.get(s.slug), members=counts[s.slug]) for s in segments]


def _public(
    segment: segment_store.SegmentRecord,
    *,
    error: str | None,
    members: int,
    progress: str | None = None,
) -> SegmentPublic:
    owner = {"rule": "journeys", "external": "external"}.get(
        segment.kind, f"rfm-model:{segment.model_slug}"
    )
    return SegmentPublic(
        state=segment.evaluation_state,
        evaluated_version=segment.evaluated_version,
        member_count=members,
        progress=progress,
        status="failing" if error else "ok",
        error=error,
        slug=segment.slug,
        name=segment.name,
        kind=segment.kind,
        owner=owner,
        condition=segment.condition,
        schedule=segment.schedule_or_default if segment.kind == "rule" else None,
        version=segment.version,
        created_at=segment.created_at,
        updated_at=segment.updated_at,
        evaluated_at=segment.evaluated_at,
    )


async def _answer(
    request: Request, session: SessionDep, slug: str, *, wait: bool, wait_seconds: float
) -> SegmentPublic:
    """The saved segment; with `wait`, once its evaluation is ready (or the time is up).
    Waiting commits the save first: the evaluation cannot see it before."""
    if wait:
        await run_in_threadpool(session.commit)
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while True:
            current = await run_in_threadpool(_current, request, slug)
            if current.state == "ready" or asyncio.get_running_loop().time() >= deadline:
                return current
            await asyncio.sleep(0.1)
    [public] = await run_in_threadpool(
        lambda: _publics(_conn(session), [segment_store.get_segment(_conn(session), slug=slug)])
    )
    return public


def _current(request: Request, slug: str) -> SegmentPublic:
    with request.app.state.engine.connect() as conn:
        [public] = _publics(conn, [segment_store.get_segment(conn, slug=slug)])
    return public


async def _evaluation_progress(request: Request, slug: str, version: int) -> str | None:
    """The step the saved version's evaluation reports (its heartbeat), best effort."""
    try:
        client = await asyncio.wait_for(request.app.state.temporal.get(), timeout=2)
        handle = client.get_workflow_handle(segment_save_workflow_id(slug, version))
        described = await asyncio.wait_for(handle.describe(), timeout=2)
    except Exception:  # noqa: BLE001 - progress is a nicety; state says the rest
        return None
    pending = described.raw_description.pending_activities
    if not pending or not pending[0].heartbeat_details.payloads:
        return "starting" if described.status is not None else None
    return pending[0].heartbeat_details.payloads[0].data.decode(errors="replace").strip('"')


async def _schedules(
    request: Request,
    slug: str,
    *,
    every: str | None,
    delete: bool = False,
    version: int | None = None,
) -> None:
    """Create / update (or delete) the segment's schedule, and start the evaluation of
    a saved `version`; 503 when Temporal is away (the caller's transaction rolls back)."""
    settings = request.app.state.settings
    try:
        client = await asyncio.wait_for(request.app.state.temporal.get(), timeout=10)
        if delete:
            await asyncio.wait_for(delete_segment_schedule(client, slug=slug), timeout=10)
        else:
            await asyncio.wait_for(
                upsert_segment_schedule(
                    client,
                    slug=slug,
                    every=parse_duration(every or segment_store.DEFAULT_SCHEDULE),
                    task_queue=settings.task_queue,
                ),
                timeout=10,
            )
        if version is not None:
            await asyncio.wait_for(
                start_segment_evaluation(
                    client, slug=slug, version=version, task_queue=settings.task_queue
                ),
                timeout=10,
            )
    except Exception as exc:  # any failure to reach Temporal: nothing is saved
        raise TemporalUnavailable(
            f"Temporal at {settings.temporal_address} could not be reached to "
            f"{'delete' if delete else 'save'} the schedule of segment {slug!r}; nothing was "
            f"changed, try again ({type(exc).__name__})",
        ) from exc


def _conn(session: SessionDep) -> Connection:
    return session.connection()


def _create_customers(conn: Connection, ids: list[str]) -> int:
    """Create the customers not known yet (as the events API does); how many were new."""
    known = set(
        conn.execute(
            text("SELECT id FROM customers WHERE id IN :ids").bindparams(
                bindparam("ids", expanding=True)
            ),
            {"ids": ids},
        ).scalars()
    )
    missing = [i for i in ids if i not in known]
    if missing:
        now = utcnow()
        cast = "CAST('{}' AS jsonb)" if conn.dialect.name == "postgresql" else "'{}'"
        conn.execute(
            text(
                "INSERT INTO customers (id, attributes, created_at, updated_at)"
                f" VALUES (:id, {cast}, :now, :now) ON CONFLICT (id) DO NOTHING"
            ).bindparams(bindparam("now", type_=UTCDateTime())),
            [{"id": i, "now": now} for i in missing],
        )
    return len(missing)


# --- routes ----------------------------------------------------------------------------


@router.post(
    "",
    response_model=SegmentPublic,
    status_code=201,
    summary="Create a segment",
    responses={**CONFLICT, **NEEDS_TEMPORAL},
)
async def create_segment(
    body: SegmentCreate,
    request: Request,
    session: SessionDep,
    _: MarketerKey,
    wait: WaitQuery = False,
    wait_seconds: WaitSecondsQuery = DEFAULT_WAIT_SECONDS,
) -> SegmentPublic:
    """Store the segment and start its full evaluation at once (`state` says when its
    members are whole); `?wait=true` answers once it is ready, or after `wait_seconds`."""
    kind = "external" if body.owner == "external" else "rule"
    if kind == "external" and body.schedule is not None:
        raise ValidationFailed(
            [ErrorDetail("invalid", "an external segment has no schedule", "schedule")]
        )
    segment = await run_in_threadpool(
        lambda: segment_store.create_segment(
            _conn(session),
            slug=body.slug,
            name=body.name,
            kind=kind,
            condition=body.condition,
            schedule=body.schedule,
            now=utcnow(),
        )
    )
    if kind == "rule":
        await _schedules(request, segment.slug, every=segment.schedule, version=segment.version)
    return await _answer(request, session, segment.slug, wait=wait, wait_seconds=wait_seconds)


@router.get("", response_model=SegmentsPublic, summary="List segments")
def list_segments(
    session: SessionDep,
    _: SupportKey,
    limit: PageLimit = 100,
    cursor: str | None = None,
) -> SegmentsPublic:
    """Segments by slug with their state and member counts, `limit` at a time."""
    conn = _conn(session)
    after = decode_cursor(cursor) if cursor else ""
    segments = [s for s in segment_store.list_segments(conn) if s.slug > after]
    segments.sort(key=lambda s: s.slug)
    page = segments[:limit]
    more = len(segments) > limit
    return SegmentsPublic(
        data=_publics(conn, page), next_cursor=encode_cursor(page[-1].slug) if more else None
    )


@router.post(
    "/preview", response_model=PreviewPublic, summary="Count and sample a condition's customers"
)
def preview_segment(body: PreviewRequest, session: SessionDep, _: MarketerKey) -> PreviewPublic:
    conn = _conn(session)
    condition = segment_store.validate_definition(conn, slug="", condition=body.condition)
    now = body.as_of or utcnow()
    result = segment_store.preview(conn, condition=condition, now=now, sample=body.sample)
    return PreviewPublic(count=result.count, sample=result.sample)


@router.get("/{slug}", response_model=SegmentPublic, summary="One segment")
async def get_segment(
    slug: str, request: Request, session: SessionDep, _: SupportKey
) -> SegmentPublic:
    """The segment, its state and member count; while evaluating, the pass's step."""
    [public] = await run_in_threadpool(
        lambda: _publics(_conn(session), [segment_store.get_segment(_conn(session), slug=slug)])
    )
    if public.state == "evaluating":
        public.progress = await _evaluation_progress(request, slug, public.version)
    return public


@router.put(
    "/{slug}",
    response_model=SegmentPublic,
    summary="Replace a segment's definition",
    responses={**CONFLICT, **NEEDS_TEMPORAL},
)
async def update_segment(
    slug: str,
    body: SegmentUpdate,
    request: Request,
    session: SessionDep,
    _: MarketerKey,
    wait: WaitQuery = False,
    wait_seconds: WaitSecondsQuery = DEFAULT_WAIT_SECONDS,
) -> SegmentPublic:
    """A new version; its full evaluation starts at once, as on create (`?wait=true`)."""

    def update() -> segment_store.SegmentRecord:
        conn = _conn(session)
        segment = segment_store.update_segment(
            conn,
            slug=slug,
            name=body.name,
            condition=body.condition,
            schedule=body.schedule,
            now=utcnow(),
        )
        forget_record(conn, kind="segment", key=slug)  # a new definition starts afresh
        return segment

    segment = await run_in_threadpool(update)
    if segment.kind == "rule":
        await _schedules(request, slug, every=segment.schedule, version=segment.version)
    return await _answer(request, session, slug, wait=wait, wait_seconds=wait_seconds)


@router.delete(
    "/{slug}",
    status_code=204,
    response_class=Response,
    summary="Delete a segment",
    responses={**CONFLICT, **NEEDS_TEMPORAL},
)
async def delete_segment(
    slug: str, request: Request, session: SessionDep, _: MarketerKey
) -> Response:

    def delete() -> str:
        conn = _conn(session)
        kind = segment_store.get_segment(conn, slug=slug).kind
        segment_store.delete_segment(conn, slug=slug)
        forget_record(conn, kind="segment", key=slug)
        return kind

    kind = await run_in_threadpool(delete)
    if kind == "rule":
        await _schedules(request, slug, every=None, delete=True)
    return Response(status_code=204)


@router.post(
    "/{slug}/evaluate",
    response_model=EvaluationPublic,
    summary="Evaluate a rule segment now",
    responses={**CONFLICT},
)
def evaluate_segment(
    slug: str, session: SessionDep, _: MarketerKey, body: EvaluateRequest | None = None
) -> EvaluationPublic:
    """Evaluate now (or as of `as_of`, for a history that ended in the past), then the
    rule segments that name it."""
    conn = _conn(session)
    now = (body.as_of if body else None) or utcnow()
    started = time.monotonic()
    diff = segment_store.evaluate_set_aside_on_failure(conn, slug=slug, now=now)
    if isinstance(diff, FailureRecord):
        session.commit()  # the failure stays recorded although the request fails
        raise EvaluationFailed(
            f"segment {slug!r} could not be evaluated and is set aside: {diff.error}",
            field="slug",
        )
    dependents = segment_store.evaluate_dependents(conn, segment_slugs=[slug], now=now)
    return EvaluationPublic(
        slug=slug,
        entries=diff.entries,
        exits=diff.exits,
        duration_ms=int((time.monotonic() - started) * 1000),
        dependents=[_pass_public(s, d) for s, d in dependents.items()],
    )


def _pass_public(slug: str, done: MembershipDiff | FailureRecord) -> SegmentPassPublic:
    if isinstance(done, FailureRecord):
        return SegmentPassPublic(slug=slug, entries=0, exits=0, error=done.error)
    return SegmentPassPublic(slug=slug, entries=done.entries, exits=done.exits)


@router.get(
    "/{slug}/members",
    response_model=MembersPage,
    summary="Members of a segment",
    responses={
        200: {"content": {NDJSON: {"schema": {"$ref": "#/components/schemas/MemberPublic"}}}}
    },
)
def list_members(
    slug: str,
    request: Request,
    session: SessionDep,
    engine: EngineDep,
    _: SupportKey,
    limit: PageLimit = 100,
    cursor: str | None = None,
) -> Any:
    """Pages by customer id; with `Accept: application/x-ndjson` streams every member."""
    conn = _conn(session)
    segment_store.get_segment(conn, slug=slug)
    if wants_ndjson(request):
        return StreamingResponse(_stream_members(engine, slug), media_type=NDJSON)
    after = decode_cursor(cursor) if cursor else None
    rows = segment_store.list_members(conn, slug=slug, limit=limit + 1, after=after)
    page = rows[:limit]
    return MembersPage(
        data=[MemberPublic(customer_id=m.customer_id, since=m.since) for m in page],
        next_cursor=encode_cursor(page[-1].customer_id) if len(rows) > limit else None,
    )


def _stream_members(engine: Any, slug: str) -> Iterator[bytes]:
    # Its own connection: the request's session is closed before the body is streamed.
    with engine.connect() as conn:
        for member in segment_store.iter_members(conn, slug=slug):
            line = {
                "customer_id": member.customer_id,
                "since": member.since.isoformat().replace("+00:00", "Z"),
            }
            yield (json.dumps(line) + "\n").encode()


@router.get(
    "/{slug}/transitions",
    response_model=TransitionsPage,
    summary="Follow a segment's entries and exits",
)
def list_transitions(
    slug: str,
    session: SessionDep,
    _: SupportKey,
    since: Annotated[
        str | None,
        Query(
            description="a transition id (those after it) or an ISO 8601 time (those at or after it)"
        ),
    ] = None,
    limit: PageLimit = 100,
    cursor: Annotated[
        str | None,
        Query(description="the `next_cursor` of the last page, as every list takes it"),
    ] = None,
) -> TransitionsPage:
    """A feed of entries and exits, oldest first: follow it with `next_cursor`, which
    stays set at the end so a reader can ask again later for what came since."""
    conn = _conn(session)
    segment_store.get_segment(conn, slug=slug)
    if cursor is not None and since is not None:
        raise ValidationFailed([ErrorDetail("invalid", "give cursor or since, not both", "cursor")])
    after_id, since_time = _parse_since(cursor if cursor is not None else since)
    rows = segment_store.list_transitions(
        conn, slug=slug, limit=limit, after_id=after_id, since_time=since_time
    )
    return TransitionsPage(
        data=[
            TransitionPublic(
                id=t.id,
                customer_id=t.customer_id,
                kind=t.kind,
                source=t.source,
                occurred_at=t.occurred_at,
            )
            for t in rows
        ],
        next_cursor=str(rows[-1].id) if rows else None,
    )


def _parse_since(since: str | None) -> tuple[int | None, datetime | None]:
    if since is None or since == "":
        return None, None
    if since.isascii() and since.isdigit():
        return min(int(since), MAX_POSITION), None
    try:
        moment = parse_instant(since.replace(" ", "+"))
        if not MIN_INSTANT <= moment < MAX_INSTANT:
            raise ValueError("outside 1900-01-01 to 2200-01-01")
        return None, moment
    except ValueError as exc:
        raise ValidationFailed(
            [
                ErrorDetail(
                    "invalid_value",
                    f"since is a transition id or an ISO time with a zone: {exc}",
                    "since",
                )
            ]
        ) from exc


def _external(conn: Connection, slug: str) -> None:
    segment = segment_store.get_segment(conn, slug=slug)
    if segment.kind != "external":
        raise Conflict(
            f"segment {slug!r} is {segment.kind}; only external segments take entries and exits",
            field="slug",
        )


@router.post(
    "/{slug}/entries",
    response_model=MembershipChangePublic,
    summary="External segment: customers entered",
    responses={**CONFLICT},
)
def post_entries(
    slug: str, body: CustomerIdsRequest, session: SessionDep, _: IngestKey
) -> MembershipChangePublic:
    conn = _conn(session)
    _external(conn, slug)
    ids = sorted(set(body.customer_ids))
    created = _create_customers(conn, ids)
    diff = record_transitions(
        conn,
        segment_slug=slug,
        customer_ids=ids,
        kind="entered",
        source=f"external:{slug}"[:40],
        now=utcnow(),
    )
    return MembershipChangePublic(entries=diff.entries, exits=diff.exits, created_customers=created)


@router.post(
    "/{slug}/exits",
    response_model=MembershipChangePublic,
    summary="External segment: customers left",
    responses={**CONFLICT},
)
def post_exits(
    slug: str, body: CustomerIdsRequest, session: SessionDep, _: IngestKey
) -> MembershipChangePublic:
    conn = _conn(session)
    _external(conn, slug)
    diff = record_transitions(
        conn,
        segment_slug=slug,
        customer_ids=sorted(set(body.customer_ids)),
        kind="exited",
        source=f"external:{slug}"[:40],
        now=utcnow(),
    )
    return MembershipChangePublic(entries=diff.entries, exits=diff.exits)
