"""Signing in and out, and the overview page."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.boundary import resource_router
from api.console.auth import (
    CONSOLE_ROLES,
    check_csrf,
    check_sign_in_token,
    end_session,
    require_user,
    set_sign_in_cookie,
    sign_in_token,
    signed_in_user,
    start_session,
    verify_sign_in_key,
)
from api.console.cache import Aggregates, Cached
from api.console.charts import column_chart
from api.console.forms import SignInForm, read_form, typed
from api.console.web import redirect, render, url
from core.errors import ErrorDetail
from core.tables import utcnow
from store import console as console_store

router = resource_router()


def _aggregates(request: Request) -> Aggregates:
    return request.app.state.console.aggregates


def _safe_next(value: str) -> str:
    """Only a console path: never send a signed-in user to another site."""
    if value.startswith("/console/") and not value.startswith("/console//") and "\\" not in value:
        return value.removeprefix("/console")
    return "/"


def _sign_in_form(
    request: Request, *, next: str, errors: list[ErrorDetail], status: int = 200
) -> Response:
    token = sign_in_token(request)
    response = render(request, "sign_in.html", status=status, next=next, errors=errors, token=token)
    set_sign_in_cookie(request, response, token)
    return response


@router.get("/sign-in")
def sign_in_page(request: Request, next: str = "") -> Response:
    if signed_in_user(request) is not None:
        return redirect(request, _safe_next(next))
    return _sign_in_form(request, next=next, errors=[])


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    fields = await read_form(request)
    check_sign_in_token(request, fields)
    form: SignInForm = typed(SignInForm, fields)
    key = await run_in_threadpool(verify_sign_in_key, request, form.key)
    if key is None:
        problem = ErrorDetail("unauthorized", "unknown or revoked API key", "key")
        return _sign_in_form(request, next=form.next, errors=[problem], status=401)
    if key.role not in CONSOLE_ROLES:
        problem = ErrorDetail(
            "forbidden",
            f"a {key.role} key may not use the console; sign in with a support,"
            " marketer or admin key",
            "key",
        )
        return _sign_in_form(request, next=form.next, errors=[problem], status=403)
    response = redirect(request, _safe_next(form.next))
    start_session(request, response, key)
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    user = require_user(request)
    check_csrf(request, user, await read_form(request))
    response = redirect(request, "/sign-in")
    end_session(request, response)
    return response


# --- overview --------------------------------------------------------------------------------


def _throughput(request: Request) -> Cached[console_store.Throughput] | None:
    return _aggregates(request).get(
        ("overview", "throughput"),
        lambda conn: console_store.events_per_minute(conn, now=utcnow()),
        max_age=10,
    )


def _activity(request: Request) -> Cached[console_store.Activity] | None:
    return _aggregates(request).get(("overview", "activity"), console_store.activity, max_age=15)


def _throughput_context(request: Request) -> dict[str, Any]:
    cached = _throughput(request)
    chart = None
    recent = None
    if cached is not None:
        minutes = cached.value.minutes
        chart = column_chart(
            [(m.minute.strftime("%H:%M"), m.events) for m in minutes],
            unit="events",
            label_every=10,
        )
        recent = sum(m.events for m in minutes[-5:]) / 5
    return {
        "throughput": cached,
        "chart": chart,
        "recent_rate": recent,
        "part_url": url(request, "/parts/throughput"),
    }


def _activity_context(request: Request) -> dict[str, Any]:
    return {"activity": _activity(request), "part_url": url(request, "/parts/activity")}


@router.get("/")
def overview(request: Request) -> Response:
    user = require_user(request)
    with request.app.state.engine.connect() as conn:
        lag = console_store.realtime_lag(conn, now=utcnow())
        failures = console_store.quarantine(conn)
    return render(
        request,
        "overview.html",
        user=user,
        nav="overview",
        lag=lag,
        failures=failures,
        quarantined=sum(c.count for c in failures.counts),
        throughput_part=_throughput_context(request),
        activity_part=_activity_context(request),
    )


@router.get("/parts/throughput")
def throughput_part(request: Request) -> Response:
    require_user(request)
    return render(request, "parts/throughput.html", part=_throughput_context(request))


@router.get("/parts/activity")
def activity_part(request: Request) -> Response:
    require_user(request)
    return render(request, "parts/activity.html", part=_activity_context(request), oob=True)
