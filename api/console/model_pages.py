"""The RFM model page and the segment pages (list, one segment, create and edit)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api import segments as segments_api
from api.boundary import resource_router
from api.console.auth import ConsoleUser, check_csrf, require_editor, require_user
from api.console.cache import Aggregates, Cached
from api.console.charts import (
    column_chart,
    diverging_chart,
    heat_map,
    label_colour,
    sparkline,
    stacked_bar,
)
from api.console.forms import SegmentForm, json_field, read_form, typed
from api.console.web import redirect, render, transaction, url
from core.condition_text import condition_lines, condition_text
from core.conditions import CONDITION_ADAPTER
from core.errors import ErrorDetail, JourneysError, NotFound, ValidationFailed
from core.rfm import segment_slug
from core.tables import utcnow
from store import console as console_store
from store import rfm_models as model_store
from store import scoring as scoring_store
from store import segments as segment_store
from store.failures import errors_by_key
from store.keys import VerifiedKey

router = resource_router()

Slug = Annotated[str, Path(min_length=1, max_length=255)]
ACTIVITY_DAYS = 14
SEGMENT_DAYS = 30


def _aggregates(request: Request) -> Aggregates:
    return request.app.state.console.aggregates


def _as_key(user: ConsoleUser) -> VerifiedKey:
    return VerifiedKey(user.key_id, user.role, user.name)


# --- RFM ---------------------------------------------------------------------------------------


@router.get("/rfm")
def rfm_models(request: Request) -> Response:
    user = require_user(request)
    with request.app.state.engine.connect() as conn:
        models = model_store.list_models(conn, limit=1_000)
    if len(models) == 1:
        return redirect(request, f"/rfm/{models[0].slug}")
    return render(request, "rfm_list.html", user=user, nav="rfm", models=models)


def _label_rows(
    labels: list[str], counts: dict[str, console_store.LabelCount], model: str
) -> list[dict[str, Any]]:
    scored = sum(c.count for c in counts.values())
    rows = []
    for index, label in enumerate([*labels, *sorted(set(counts) - set(labels))]):
        count = counts.get(label, console_store.LabelCount(count=0, monetary=0.0))
        rows.append(
            {
                "label": label,
                "segment": segment_slug(model, label),
                "count": count.count,
                "share": count.count / scored if scored else 0.0,
                "monetary": count.monetary,
                "average": count.monetary / count.count if count.count else None,
                "colour": label_colour(index),
            }
        )
    return rows


def _live_summary(request: Request, slug: str) -> Cached[dict[str, Any]] | None:
    return _aggregates(request).get(
        ("rfm", slug, "live"),
        lambda conn: scoring_store.summarize(conn, model_slug=slug),
        max_age=60,
    )


@router.get("/rfm/{slug}")
def rfm_model(
    request: Request,
    slug: Slug,
    pass_id: Annotated[int | None, Query(alias="pass", ge=1)] = None,
) -> Response:
    user = require_user(request)
    with request.app.state.engine.connect() as conn:
        model = model_store.get_model(conn, slug=slug)
        passes = console_store.model_passes(conn, model_slug=slug)
    labels = model.definition.labels()
    chosen = None
    if pass_id is not None:
        chosen = next((p for p in passes if p.id == pass_id), None)
        if chosen is None:
            raise NotFound(f"model {slug!r} has no recent finished pass {pass_id}", field="pass")
    chosen = chosen or next((p for p in passes if p.summary is not None), None)
    chosen = chosen or (passes[0] if passes else None)
    live = None
    if chosen is not None and chosen.summary is not None:
        counts = chosen.summary.labels
        grid = chosen.summary.grid
    else:
        live = _live_summary(request, slug)
        counts = {
            label: console_store.LabelCount(**value)
            for label, value in (live.value["labels"] if live else {}).items()
        }
        grid = live.value["grid"] if live else [[0] * 5 for _ in range(5)]
    rows = _label_rows(labels, counts, slug)
    matrix = console_store.migration_matrix(chosen, labels) if chosen else None
    return render(
        request,
        "rfm.html",
        user=user,
        nav="rfm",
        model=model,
        passes=passes,
        chosen=chosen,
        live=live,
        rows=rows,
        shares=stacked_bar([(r["label"], r["count"]) for r in rows if r["count"]]),
        monetary=column_chart(
            [(r["label"], r["monetary"]) for r in rows], unit="in monetary value", height=200
        ),
        grid=grid,
        heat=heat_map(
            [f"R{r}" for r in (5, 4, 3, 2, 1)],
            [f"F{f}" for f in (1, 2, 3, 4, 5)],
            [grid[r - 1] for r in (5, 4, 3, 2, 1)],
            row_title="recency",
            column_title="frequency",
        ),
        matrix=matrix,
        matrix_chart=(
            heat_map(
                matrix.rows,
                matrix.columns,
                [[matrix.cells[r][c] for c in matrix.columns] for r in matrix.rows],
                row_title="before",
                column_title="after",
                by_row=True,
                cell=min(max(64.0, 7.5 * max(len(c) for c in matrix.columns)), 130.0),
                left=min(max(64.0, 7.5 * max(len(r) for r in matrix.rows)), 160.0),
            )
            if matrix
            else None
        ),
    )


# --- segments ----------------------------------------------------------------------------------


def _counts(request: Request, slugs: list[str]) -> Cached[dict[str, int]] | None:
    return _aggregates(request).get(
        ("segments", "counts"),
        lambda conn: segment_store.member_counts(conn, slugs=slugs),
        max_age=30,
    )


def _activity(request: Request) -> Cached[dict[str, list[console_store.DayCount]]] | None:
    return _aggregates(request).get(
        ("segments", "days", ACTIVITY_DAYS),
        lambda conn: console_store.transitions_per_day(conn, now=utcnow(), days=ACTIVITY_DAYS),
        max_age=120,
    )


def _readable(condition: Any) -> str:
    if condition is None:
        return ""
    try:
        return condition_text(CONDITION_ADAPTER.validate_python(condition))
    except ValueError:
        return "(a condition that no longer parses)"


def _segments_context(request: Request) -> dict[str, Any]:
    with request.app.state.engine.connect() as conn:
        segments = segment_store.list_segments(conn)
        errors = errors_by_key(conn, kind="segment")
    counts = _counts(request, [s.slug for s in segments])
    activity = _activity(request)
    rows = []
    for segment in segments:
        days = activity.value.get(segment.slug, []) if activity else []
        rows.append(
            {
                "segment": segment,
                "text": _readable(segment.condition),
                "members": counts.value.get(segment.slug, 0) if counts else None,
                "error": errors.get(segment.slug),
                "entered": sum(d.entered for d in days),
                "exited": sum(d.exited for d in days),
                "spark": sparkline([(d.day.isoformat(), d.entered, d.exited) for d in days])
                if days
                else None,
            }
        )
    return {
        "rows": rows,
        "counts": counts,
        "activity": activity,
        "days": ACTIVITY_DAYS,
        "part_url": url(request, "/parts/segments"),
    }


@router.get("/segments")
def segments(request: Request) -> Response:
    user = require_user(request)
    return render(
        request, "segments.html", user=user, nav="segments", part=_segments_context(request)
    )


@router.get("/parts/segments")
def segments_part(request: Request) -> Response:
    require_user(request)
    return render(request, "parts/segments.html", part=_segments_context(request))


def _segment_form(
    request: Request,
    user: ConsoleUser,
    *,
    values: dict[str, str],
    errors: list[ErrorDetail],
    status: int = 200,
    segment: segment_store.SegmentRecord | None = None,
) -> Response:
    return render(
        request,
        "segment_form.html",
        status=status,
        user=user,
        nav="segments",
        values=values,
        errors=errors,
        segment=segment,
    )


_EXAMPLE_CONDITION = (
    '{\n  "all": [\n    {"segment": "default:champions"},\n'
    '    {"attribute": "total_spent", "op": "gt", "value": 500}\n  ]\n}'
)


@router.get("/segments/new")
def new_segment(request: Request) -> Response:
    user = require_user(request)
    require_editor(user)
    values = {"slug": "", "name": "", "condition": _EXAMPLE_CONDITION, "schedule": ""}
    return _segment_form(request, user, values=values, errors=[])


def _segment_body(fields: dict[str, str]) -> tuple[SegmentForm, Any]:
    form: SegmentForm = typed(SegmentForm, fields)
    return form, json_field(fields, "condition")


@router.post("/segments/new")
async def create_segment(request: Request) -> Response:
    user = require_user(request)
    fields = await read_form(request)
    check_csrf(request, user, fields)
    require_editor(user)
    try:
        form, condition = _segment_body(fields)
        body = segments_api.SegmentCreate(
            slug=form.slug, name=form.name, condition=condition, schedule=form.schedule or None
        )
        async with transaction(request) as session:
            await segments_api.create_segment(
                body, request, session, _as_key(user), wait=False, wait_seconds=30.0
            )
    except JourneysError as exc:
        return _segment_form(
            request, user, values=fields, errors=exc.details(), status=exc.status_code
        )
    _aggregates(request).forget("segments")
    return redirect(request, f"/segments/{fields['slug']}")


@router.post("/segments/validate")
async def validate_segment(request: Request) -> Response:
    """The condition checked as the API checks it on save (references and cycles too)."""
    user = require_user(request)
    fields = await read_form(request)
    check_csrf(request, user, fields)
    try:
        condition = json_field(fields, "condition")

        def check() -> Any:
            with request.app.state.engine.connect() as conn:
                return segment_store.validate_definition(
                    conn, slug=fields.get("slug", ""), condition=condition
                )

        parsed = await run_in_threadpool(check)
    except ValidationFailed as exc:
        return render(request, "parts/validation.html", errors=exc.details(), lines=[])
    return render(request, "parts/validation.html", errors=[], lines=condition_lines(parsed))


def _segment_days(request: Request, slug: str) -> Cached[Any] | None:
    return _aggregates(request).get(
        ("segments", "days", slug),
        lambda conn: console_store.transitions_per_day(
            conn, now=utcnow(), days=SEGMENT_DAYS, slug=slug
        )[slug],
        max_age=60,
    )


def _member_count(request: Request, slug: str) -> Cached[int] | None:
    return _aggregates(request).get(
        ("segments", "count", slug),
        lambda conn: console_store.member_count(conn, slug=slug),
        max_age=30,
    )


def _segment_detail(request: Request, slug: str) -> dict[str, Any]:
    days = _segment_days(request, slug)
    return {
        "slug": slug,
        "days": days,
        "members": _member_count(request, slug),
        "chart": (
            diverging_chart(
                [(d.day.strftime("%m-%d"), d.entered, d.exited) for d in days.value],
                label_every=5,
            )
            if days
            else None
        ),
        "part_url": url(request, f"/parts/segments/{slug}"),
    }


@router.get("/segments/{slug}")
def segment(request: Request, slug: Slug) -> Response:
    user = require_user(request)
    with request.app.state.engine.connect() as conn:
        record = segment_store.get_segment(conn, slug=slug)
        sample = segment_store.list_members(conn, slug=slug, limit=20)
        error = errors_by_key(conn, kind="segment").get(slug)
    lines = []
    if record.condition is not None:
        try:
            lines = condition_lines(CONDITION_ADAPTER.validate_python(record.condition))
        except ValueError:
            lines = [(0, "(a condition that no longer parses)")]
    values = {
        "slug": record.slug,
        "name": record.name,
        "condition": _pretty(record.condition),
        "schedule": record.schedule or "",
    }
    return render(
        request,
        "segment.html",
        user=user,
        nav="segments",
        segment=record,
        lines=lines,
        sample=sample,
        error=error,
        values=values,
        errors=[],
        part=_segment_detail(request, slug),
    )


@router.get("/parts/segments/{slug}")
def segment_part(request: Request, slug: Slug) -> Response:
    require_user(request)
    return render(request, "parts/segment_activity.html", part=_segment_detail(request, slug))


def _pretty(condition: Any) -> str:
    return json.dumps(condition, indent=2, ensure_ascii=False) if condition is not None else ""


@router.post("/segments/{slug}")
async def update_segment(request: Request, slug: Slug) -> Response:
    user = require_user(request)
    fields = await read_form(request)
    check_csrf(request, user, fields)
    require_editor(user)
    fields["slug"] = slug
    try:
        form, condition = _segment_body(fields)
        body = segments_api.SegmentUpdate(
            name=form.name, condition=condition, schedule=form.schedule or None
        )
        async with transaction(request) as session:
            await segments_api.update_segment(
                slug, body, request, session, _as_key(user), wait=False, wait_seconds=30.0
            )
    except JourneysError as exc:
        with request.app.state.engine.connect() as conn:
            record = segment_store.get_segment(conn, slug=slug)
        return _segment_form(
            request,
            user,
            values=fields,
            errors=exc.details(),
            status=exc.status_code,
            segment=record,
        )
    _aggregates(request).forget("segments")
    return redirect(request, f"/segments/{slug}")
