"""The console's plumbing: templates, the security headers, HTML errors, sessions.

Pages are Jinja2 templates with autoescaping on (`templates/`), served with a strict
Content-Security-Policy: scripts, styles, images and requests from the console's own
origin only, no inline script or style (the vendored htmx is configured through a
`<meta>` and injects none), no framing, forms posting to the console only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.concurrency import contextmanager_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlmodel import Session
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.console.auth import NotSignedIn
from api.errors import details_from_pydantic
from core.condition_text import condition_text, human_duration
from core.errors import ErrorDetail, JourneysError

log = logging.getLogger("journeys.console")
HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none';"
    " form-action 'self'; frame-ancestors 'none'; frame-src 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]


class SecurityHeaders:
    """Every console answer (pages, fragments, static files, errors) carries the
    security headers; pages are not cached, and `Server-Timing` says how long the
    server took (the bench reads it)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        static = scope.get("path", "").startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in {name for name, _ in SECURITY_HEADERS}
                ]
                headers += SECURITY_HEADERS
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                elapsed = (time.perf_counter() - started) * 1000
                headers.append((b"server-timing", f"app;dur={elapsed:.1f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        started_response = False

        async def tracked(message: Message) -> None:
            nonlocal started_response
            started_response = started_response or message["type"] == "http.response.start"
            await with_headers(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            # A bug: logged, and answered here so that even this page carries the policy.
            log.exception("console error")
            if started_response:
                raise
            await tracked(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            await tracked(
                {"type": "http.response.body", "body": b"internal error; it has been logged"}
            )


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def _percent(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f}%"


def _signed_percent(value: Any) -> str:
    return "–" if value is None else f"{value * 100:+.1f}%"


def _when(value: datetime | None) -> str:
    if value is None:
        return "–"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _ago(value: float) -> str:
    seconds = int(value)
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 5400:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def make_environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        number=_number,
        percent=_percent,
        signed_percent=_signed_percent,
        when=_when,
        ago=_ago,
        duration=human_duration,
        readable=condition_text,
    )
    return env


def url(request: Request, path: str) -> str:
    """A console path as the browser sees it (`/segments` -> `/console/segments`)."""
    return f"{request.scope.get('root_path', '')}{path}"


def render(
    request: Request,
    template: str,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    env: Environment = request.app.state.console.templates
    user = context.pop("user", None)
    context.setdefault("nav", "")
    html = env.get_template(template).render(
        request=request,
        user=user,
        csrf=user.csrf if user else "",
        url=lambda path: url(request, path),
        static=lambda path: url(request, f"/static/{path}"),
        **context,
    )
    return HTMLResponse(html, status_code=status, headers=headers)


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def redirect(request: Request, path: str) -> Response:
    """303 to a console path; an htmx request is told to load the page instead."""
    target = url(request, path)
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def error_page(request: Request, status: int, details: list[ErrorDetail]) -> Response:
    if status == 401:
        path = request.url.path
        if request.method == "GET" and not is_htmx(request):
            return RedirectResponse(
                url(request, "/sign-in") + f"?next={quote(path, safe='/:')}", status_code=303
            )
        return redirect(request, "/sign-in")
    from api.console.auth import signed_in_user

    template = "_errors.html" if is_htmx(request) else "error.html"
    return render(
        request,
        template,
        status=status,
        user=signed_in_user(request),
        status_code=status,
        errors=details,
    )


def install_error_pages(app: FastAPI) -> None:
    @app.exception_handler(JourneysError)
    async def _domain(request: Request, exc: JourneysError) -> Response:
        if isinstance(exc, NotSignedIn):
            return error_page(request, 401, exc.details())
        return error_page(request, exc.status_code, exc.details())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_page(request, 422, details_from_pydantic(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        message = "no such page" if exc.status_code == 404 else str(exc.detail)
        return error_page(request, exc.status_code, [ErrorDetail("http_error", message)])


@contextmanager
def _transaction(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@asynccontextmanager
async def transaction(request: Request) -> AsyncIterator[Session]:
    """One transaction for a change, as the API's request session: committed when the
    block ends (before the answer goes out), rolled back on error; opened and closed in
    the thread pool (a SQLite write waiting for its lock must not stop the event loop)."""
    async with contextmanager_in_threadpool(_transaction(request)) as session:
        yield session
