"""Journeys (marketer): definitions, validation and the lifecycle draft -> active (version
n, immutable) -> paused -> archived. Pausing stops new entries; runs in flight carry on."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Body, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from temporalio.service import RPCError, RPCStatusCode

from api.boundary import (
    CONFLICT,
    JOURNEY_DEFINITION_MARK,
    NEEDS_TEMPORAL,
    PageLimit,
    resource_router,
)
from api.deps import MarketerKey, SessionDep, TemporalUnavailable
from store.journeys import (
    SHIPPED_JOURNEYS_DIR,
    JourneyState,
    RunningWorkflow,
    activate_journey,
    archive_journey,
    create_journey,
    get_journey,
    list_journeys,
    pause_journey,
    put_journey,
    resume_journey,
    validate_definition,
)

router = resource_router(prefix="/v1/journeys", tags=["journeys"])

_EXAMPLE = SHIPPED_JOURNEYS_DIR / "champions.json"


def _example() -> dict[str, Any]:
    try:
        return json.loads(_EXAMPLE.read_text())
    except (OSError, ValueError):
        return {}


DefinitionBody = Annotated[
    dict[str, Any],
    Body(
        description=(
            "A journey definition (docs/journeys.md): slug, name, trigger, goal, reentry, "
            "exit_on_segment_exit, start and steps (email, sms, delay, wait_for_event, "
            "branch, update_attribute, exit). Read as JSON so that validation can report "
            "every error at once; its schema is `JourneyDefinition`."
        ),
        openapi_examples={"champions": {"summary": "Champions nurture", "value": _example()}},
        json_schema_extra={JOURNEY_DEFINITION_MARK: True},
    ),
]


class ErrorPublic(BaseModel):
    code: str
    message: str
    field: str | None = None


class JourneyVersionPublic(BaseModel):
    version: int
    definition: dict[str, Any]
    created_at: datetime
    activated_at: datetime | None = None
    status: Literal["draft", "active", "superseded"] = Field(
        description="active: what new entries get; superseded: once active, replaced since; "
        "draft: never activated"
    )


class JourneyPublic(BaseModel):
    slug: str
    name: str
    state: Literal["draft", "active", "paused", "archived"]
    latest_version: int
    active_version: int | None
    trigger_segment: str
    created_at: datetime
    updated_at: datetime
    versions: list[JourneyVersionPublic] | None = None


class JourneysPublic(BaseModel):
    data: list[JourneyPublic]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


class ValidationPublic(BaseModel):
    valid: bool
    errors: list[ErrorPublic]


class ArchiveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runs: Literal["finish", "cancel"] = Field(
        description="finish: runs in flight carry on to their end; cancel: they are cancelled"
    )


class ArchivePublic(BaseModel):
    journey: JourneyPublic
    runs: Literal["finish", "cancel"]
    in_flight: int = Field(description="Runs that were running when the journey was archived.")
    cancelled: list[str] = Field(description="Workflow ids asked to cancel (runs=cancel).")


def _public(journey: JourneyState) -> JourneyPublic:
    versions = None
    if journey.versions is not None:
        versions = []
        for v in journey.versions:
            if v.version == journey.active_version:
                status = "active"
            elif v.activated_at is not None:
                status = "superseded"
            else:
                status = "draft"
            versions.append(JourneyVersionPublic(**v.model_dump(), status=status))
    return JourneyPublic(**journey.model_dump(exclude={"versions"}), versions=versions)


@router.post("", response_model=JourneyPublic, status_code=201, responses={**CONFLICT})
def post_journey(body: DefinitionBody, session: SessionDep, _: MarketerKey) -> JourneyPublic:
    """Create a journey as draft version 1; 422 lists every error, each naming its field."""
    create_journey(session, raw=body)
    return _public(get_journey(session, slug=str(body.get("slug"))))


@router.post("/validate", response_model=ValidationPublic)
def post_validate(body: DefinitionBody, session: SessionDep, _: MarketerKey) -> ValidationPublic:
    """Check a definition without storing it: every error, each naming its step."""
    _, errors = validate_definition(session, raw=body)
    return ValidationPublic(valid=not errors, errors=[ErrorPublic(**e.as_dict()) for e in errors])


@router.get("", response_model=JourneysPublic)
def get_journeys(
    session: SessionDep,
    _: MarketerKey,
    limit: PageLimit = 100,
    cursor: str | None = None,
    state: Literal["draft", "active", "paused", "archived"] | None = None,
) -> JourneysPublic:
    rows = list_journeys(session, limit=limit + 1, cursor=cursor, state=state)
    page = rows[:limit]
    next_cursor = page[-1].slug if len(rows) > limit else None
    return JourneysPublic(data=[_public(j) for j in page], next_cursor=next_cursor)


@router.get("/{slug}", response_model=JourneyPublic)
def get_one_journey(slug: str, session: SessionDep, _: MarketerKey) -> JourneyPublic:
    """The journey's state and every version, newest first."""
    return _public(get_journey(session, slug=slug))


@router.put("/{slug}", response_model=JourneyPublic, responses={**CONFLICT})
def put_one_journey(
    slug: str, body: DefinitionBody, session: SessionDep, _: MarketerKey
) -> JourneyPublic:
    """Add a new draft version; the active version keeps serving new entries until activate."""
    put_journey(session, slug=slug, raw=body)
    return _public(get_journey(session, slug=slug))


@router.post("/{slug}/activate", response_model=JourneyPublic, responses={**CONFLICT})
def post_activate(slug: str, session: SessionDep, _: MarketerKey) -> JourneyPublic:
    """The latest version becomes the active, immutable one; 422 if it is not valid now."""
    activate_journey(session, slug=slug)
    return _public(get_journey(session, slug=slug))


@router.post("/{slug}/pause", response_model=JourneyPublic, responses={**CONFLICT})
def post_pause(slug: str, session: SessionDep, _: MarketerKey) -> JourneyPublic:
    """Stop new entries; runs in flight carry on."""
    pause_journey(session, slug=slug)
    return _public(get_journey(session, slug=slug))


@router.post("/{slug}/resume", response_model=JourneyPublic, responses={**CONFLICT})
def post_resume(slug: str, session: SessionDep, _: MarketerKey) -> JourneyPublic:
    """Let new entries in again, on the active version."""
    resume_journey(session, slug=slug)
    return _public(get_journey(session, slug=slug))


async def _cancel(request: Request, running: list[RunningWorkflow]) -> list[str]:
    try:
        client = await request.app.state.temporal.get()
    except Exception as exc:  # noqa: BLE001 - any connection failure is the same to the caller
        raise TemporalUnavailable(
            f"cannot reach Temporal to cancel runs ({type(exc).__name__}); nothing was archived"
        ) from exc
    cancelled: list[str] = []
    for workflow_id in dict.fromkeys(r.workflow_id for r in running):
        try:
            # By workflow id alone: the current run, even after a continue-as-new.
            await client.get_workflow_handle(workflow_id).cancel()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise TemporalUnavailable(
                    f"Temporal refused to cancel {workflow_id}: {exc.message}"
                ) from exc
            continue  # it ended on its own meanwhile
        cancelled.append(workflow_id)
    return cancelled


@router.post(
    "/{slug}/archive", response_model=ArchivePublic, responses={**CONFLICT, **NEEDS_TEMPORAL}
)
async def post_archive(
    slug: str, body: ArchiveRequest, request: Request, session: SessionDep, _: MarketerKey
) -> ArchivePublic:
    """Archive for good: no new entries. `runs` says whether runs in flight finish or are
    cancelled; a cancel that cannot reach Temporal fails with 503 and archives nothing."""
    # In the thread pool: a SQLite write waiting for the lock must not stop the event loop.
    result = await run_in_threadpool(archive_journey, session, slug=slug, runs=body.runs)
    cancelled: list[str] = []
    if body.runs == "cancel" and result.running:
        cancelled = await _cancel(request, result.running)
    journey = await run_in_threadpool(get_journey, session, slug=slug)
    return ArchivePublic(
        journey=_public(journey),
        runs=body.runs,
        in_flight=len(result.running),
        cancelled=cancelled,
    )
