"""The journey pages: the list, one journey (its graph with counts, funnel, results,
lifecycle and editor), a new journey, and live validation."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy.engine import Connection
from sqlmodel import Session

from api import journeys as journeys_api
from api.boundary import resource_router
from api.console.auth import ConsoleUser, check_csrf, require_editor, require_user
from api.console.cache import Aggregates, Cached
from api.console.charts import funnel, journey_graph
from api.console.forms import json_field, read_form
from api.console.web import redirect, render, transaction, url
from core.errors import ErrorDetail, JourneysError, ValidationFailed
from core.journeys import BranchStep, JourneyDefinition
from store import console as console_store
from store.analytics import _COMPLETED_BY as COMPLETED_BY
from store.analytics import JourneyAnalytics, journey_analytics
from store.journeys import SHIPPED_JOURNEYS_DIR, JourneyState, get_journey, list_journeys
from store.keys import VerifiedKey

router = resource_router()

Slug = Annotated[str, Path(min_length=1, max_length=200)]
ACTIONS = ("activate", "pause", "resume", "archive")


def _aggregates(request: Request) -> Aggregates:
    return request.app.state.console.aggregates


def _as_key(user: ConsoleUser) -> VerifiedKey:
    return VerifiedKey(user.key_id, user.role, user.name)


@router.get("/journeys")
def journeys(request: Request) -> Response:
    user = require_user(request)
    with request.app.state.engine.connect() as conn:
        rows = list_journeys(conn, limit=1_000)
    activity = _aggregates(request).get(
        ("overview", "activity"), console_store.activity, max_age=15
    )
    return render(
        request, "journeys.html", user=user, nav="journeys", journeys=rows, activity=activity
    )


class Results(BaseModel):
    analytics: JourneyAnalytics
    outcomes: dict[str, dict[str, int]]


def _results(request: Request, slug: str, version: int) -> Cached[Results] | None:
    def compute(conn: Connection) -> Results:
        return Results(
            analytics=journey_analytics(conn, journey_slug=slug, version=version),
            outcomes=console_store.step_outcomes(conn, journey_slug=slug, version=version),
        )

    return _aggregates(request).get(("journeys", slug, version), compute, max_age=30)


def _edges(definition: JourneyDefinition, results: Results) -> dict[tuple[str, str], int]:
    """Runs along each edge: a decision's exits from analytics, and for every other step
    its finished visits (each writes one outcome line, then goes to `next`)."""
    edges: dict[tuple[str, str], int] = {}
    by_step = {s.step: s for s in results.analytics.steps}
    for step_id, step in definition.steps.items():
        stats = by_step.get(step_id)
        if stats is not None and stats.exits is not None:
            for share in stats.exits:
                edges[(step_id, share.exit)] = share.count
            continue
        lines = results.outcomes.get(step_id, {})
        edges[(step_id, "next")] = sum(lines.get(k, 0) for k in COMPLETED_BY.get(step.type, ()))
    return edges


def _results_context(request: Request, slug: str, version: int | None) -> dict[str, Any]:
    context: dict[str, Any] = {
        "results": None,
        "graph": None,
        "funnel": None,
        "version": version,
        "part_url": url(request, f"/parts/journeys/{slug}"),
    }
    if version is None:
        return context
    with request.app.state.engine.connect() as conn:
        definition = console_store.journey_definition(conn, slug=slug, version=version)
    cached = _results(request, slug, version)
    context["results"] = cached
    if cached is None or definition is None:
        return context
    analytics = cached.value.analytics
    entered = {s.step: s.entered for s in analytics.steps}
    context["graph"] = journey_graph(
        definition,
        entered=entered,
        edges=_edges(definition, cached.value),
        total=analytics.triggered,
    )
    context["funnel"] = funnel(
        [(s.step, s.entered) for s in analytics.steps if s.step in definition.steps],
        total=analytics.triggered,
    )
    return context


def _shown_version(journey: JourneyState) -> int | None:
    """The version whose runs the page shows: the active one, else the newest activated."""
    if journey.active_version is not None:
        return journey.active_version
    activated = [v.version for v in journey.versions or [] if v.activated_at is not None]
    return max(activated, default=None)


def _journey_page(
    request: Request,
    user: ConsoleUser,
    slug: str,
    *,
    draft: str | None = None,
    errors: list[ErrorDetail] | None = None,
    status: int = 200,
) -> Response:
    with request.app.state.engine.connect() as conn:
        journey = get_journey(conn, slug=slug)
    versions = journey.versions or []
    latest = versions[0].definition if versions else {}
    version = _shown_version(journey)
    shown = next((v.definition for v in versions if v.version == version), latest)
    try:
        parsed = JourneyDefinition.model_validate(shown)
    except ValueError:
        parsed = None
    branch_steps = [
        step_id
        for step_id, step in (parsed.steps.items() if parsed else [])
        if isinstance(step, BranchStep)
    ]
    return render(
        request,
        "journey.html",
        status=status,
        user=user,
        nav="journeys",
        journey=journey,
        shown_version=version,
        definition=parsed,
        branch_steps=branch_steps,
        draft=draft if draft is not None else json.dumps(latest, indent=2, ensure_ascii=False),
        errors=errors or [],
        part=_results_context(request, slug, version),
    )


@router.get("/journeys/new")
def new_journey(request: Request) -> Response:
    user = require_user(request)
    require_editor(user)
    example = (SHIPPED_JOURNEYS_DIR / "champions.json").read_text()
    return render(request, "journey_new.html", user=user, nav="journeys", draft=example, errors=[])


@router.post("/journeys/new")
async def create_journey(request: Request) -> Response:
    user = require_user(request)
    fields = await read_form(request)
    check_csrf(request, user, fields)
    require_editor(user)
    try:
        body = json_field(fields, "definition")
        if not isinstance(body, dict):
            raise ValidationFailed(
                [ErrorDetail("invalid", "a journey definition is a JSON object", "definition")]
            )
        async with transaction(request) as session:
            await run_in_threadpool(journeys_api.post_journey, body, session, _as_key(user))
    except JourneysError as exc:
        return render(
            request,
            "journey_new.html",
            status=exc.status_code,
            user=user,
            nav="journeys",
            draft=fields.get("definition", ""),
            errors=exc.details(),
        )
    return redirect(request, f"/journeys/{body['slug']}")


@router.post("/journeys/validate")
async def validate_journey(request: Request) -> Response:
    """The definition checked by the API's validate (every error, each naming its step)."""
    user = require_user(request)
    fields = await read_form(request)
    check_csrf(request, user, fields)
    try:
        body = json_field(fields, "definition")
        if not isinstance(body, dict):
            raise ValidationFailed(
                [ErrorDetail("invalid", "a journey definition is a JSON object", "definition")]
            )

        def check() -> journeys_api.ValidationPublic:
            with Session(request.app.state.engine) as session:
                return journeys_api.post_validate(body, session, _as_key(user))

        answer = await run_in_threadpool(check)
    except ValidationFailed as exc:
        return render(request, "parts/validation.html", errors=exc.details(), lines=[])
    errors = [ErrorDetail(e.code, e.message, e.field) for e in answer.errors]
    notes = []
    if not errors:
        steps = body.get("steps", {})
        notes.append(
            f"{len(steps)} steps from {body.get('start')}, entered from segment"
            f" {body.get('trigger', {}).get('segment')}."
        )
    return render(request, "parts/validation.html", errors=errors, lines=[], notes=notes)


@router.get("/journeys/{slug}")
def journey(request: Request, slug: Slug) -> Response:
    user = require_user(request)
    return _journey_page(request, user, slug)


@router.get("/parts/journeys/{slug}")
def journey_part(request: Request, slug: Slug) -> Response:
    require_user(request)
    with request.app.state.engine.connect() as conn:
        version = _shown_version(get_journey(conn, slug=slug))
    return render(
        request, "parts/journey_results.html", part=_results_context(request, slug, version)
    )


@router.post("/journeys/{slug}/definition")
async def save_definition(request: Request, slug: Slug) -> Response:
    user = require_user(request)
    fields = await read_form(request)
    check_csrf(request, user, fields)
    require_editor(user)
    try:
        body = json_field(fields, "definition")
        if not isinstance(body, dict):
            raise ValidationFailed(
                [ErrorDetail("invalid", "a journey definition is a JSON object", "definition")]
            )
        async with transaction(request) as session:
            await run_in_threadpool(
                journeys_api.put_one_journey, slug, body, session, _as_key(user)
            )
    except JourneysError as exc:
        return _journey_page(
            request,
            user,
            slug,
            draft=fields.get("definition", ""),
            errors=exc.details(),
            status=exc.status_code,
        )
    return redirect(request, f"/journeys/{slug}")


@router.post("/journeys/{slug}/{action}")
async def lifecycle(
    request: Request, slug: Slug, action: Annotated[str, Path(max_length=20)]
) -> Response:
    user = require_user(request)
    fields = await read_form(request)
    check_csrf(request, user, fields)
    require_editor(user)
    if action not in ACTIONS:
        raise ValidationFailed(
            [ErrorDetail("invalid", f"action is one of {', '.join(ACTIONS)}", "action")]
        )
    key = _as_key(user)
    try:
        async with transaction(request) as session:
            if action == "archive":
                runs = fields.get("runs", "")
                if runs not in ("finish", "cancel"):
                    raise ValidationFailed(
                        [ErrorDetail("invalid", "runs is finish or cancel", "runs")]
                    )
                body = journeys_api.ArchiveRequest(runs=runs)  # type: ignore[arg-type]
                await journeys_api.post_archive(slug, body, request, session, key)
            else:
                handler = {
                    "activate": journeys_api.post_activate,
                    "pause": journeys_api.post_pause,
                    "resume": journeys_api.post_resume,
                }[action]
                await run_in_threadpool(handler, slug, session, key)
    except JourneysError as exc:
        return _journey_page(request, user, slug, errors=exc.details(), status=exc.status_code)
    _aggregates(request).forget("overview")
    return redirect(request, f"/journeys/{slug}")
