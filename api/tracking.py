"""Tracked links (`/t/{token}`), the open pixel (`/o/{token}.gif`) and one-click
unsubscribe (`/u/{token}`, RFC 8058). No API key: the signed token is the credential, so
a forged or altered token is a 404 and records and signals nothing."""

from __future__ import annotations

import asyncio
import base64
import logging
from datetime import datetime
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.engine import Engine

from api.boundary import resource_router
from api.deps import EngineDep, SettingsDep
from core.db import session_scope
from core.errors import NotFound
from core.settings import Settings
from core.signals import JOURNEY_EVENT_SIGNAL, CustomerEventSignal
from core.tables import utcnow
from core.tokens import (
    InvalidToken,
    MessageOpen,
    TrackedLink,
    read_link_token,
    read_open_token,
    read_unsubscribe_token,
)
from store import messages as message_store

log = logging.getLogger("journeys.tracking")

router = resource_router(tags=["tracking"])

# Clicks must redirect at once even when Temporal is down: the signal gets this long.
SIGNAL_TIMEOUT_SECONDS = 3.0
_PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


async def signal_run(
    request: Request, *, workflow_id: str, run_id: str, name: str, step: str, at: datetime
) -> bool:
    """Signal `name` for `step` to the run; False (logged) when Temporal or the run is gone."""

    async def send() -> None:
        client = await request.app.state.temporal.get()
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        await handle.signal(
            JOURNEY_EVENT_SIGNAL, CustomerEventSignal(name=name, step=step, occurred_at=at)
        )

    try:
        await asyncio.wait_for(send(), timeout=SIGNAL_TIMEOUT_SECONDS)
        return True
    except Exception as exc:  # noqa: BLE001 - a lost signal must never cost the redirect
        log.warning("could not signal %s to %s/%s: %s", name, workflow_id, run_id, exc)
        return False


async def record_and_signal(
    request: Request,
    engine: Engine,
    *,
    token: TrackedLink | MessageOpen,
    kind: str,
    detail: dict[str, Any],
    signal: str,
) -> None:
    """Record a click or open against its message, then signal it to the run."""
    now = utcnow()

    def record() -> None:
        with session_scope(engine) as session:
            message_store.record_message_event(
                session, message_id=token.message_id, kind=kind, detail=detail, occurred_at=now
            )

    await run_in_threadpool(record)
    await signal_run(
        request,
        workflow_id=token.workflow_id,
        run_id=token.run_id,
        name=signal,
        step=token.step,
        at=now,
    )


@router.get(
    "/t/{token}",
    response_class=RedirectResponse,
    status_code=302,
    response_model=None,
    summary="Follow a tracked link",
    responses={
        302: {"description": "Redirect to the link's target"},
        404: {"description": "Unknown token"},
    },
)
async def follow_link(
    token: str, request: Request, engine: EngineDep, settings: SettingsDep
) -> RedirectResponse:
    try:
        link = read_link_token(settings.secret_key, token)
    except InvalidToken as exc:
        raise NotFound("unknown link") from exc
    await record_and_signal(
        request,
        engine,
        token=link,
        kind="click",
        detail={"url": link.url, "step": link.step, "source": "tracked_link"},
        signal="email_clicked",
    )
    return RedirectResponse(link.url, status_code=302)


@router.get(
    "/o/{token}.gif",
    response_class=Response,
    response_model=None,
    summary="Open pixel",
    responses={200: {"content": {"image/gif": {}}}, 404: {"description": "Unknown token"}},
)
async def open_pixel(
    token: str, request: Request, engine: EngineDep, settings: SettingsDep
) -> Response:
    try:
        opened = read_open_token(settings.secret_key, token)
    except InvalidToken as exc:
        raise NotFound("unknown pixel") from exc
    await record_and_signal(
        request,
        engine,
        token=opened,
        kind="open",
        detail={"source": "pixel"},
        signal="email_opened",
    )
    return Response(_PIXEL, media_type="image/gif", headers={"Cache-Control": "no-store"})


_UNSUBSCRIBED_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Unsubscribed</title></head>
<body style="font-family:sans-serif;max-width:480px;margin:48px auto">
<h1>You are unsubscribed</h1><p>You will not receive these {channel} messages any more.</p>
</body></html>"""


_UNSUBSCRIBE_RESPONSES: dict[int | str, dict[str, object]] = {404: {"description": "Unknown token"}}


@router.get(
    "/u/{token}",
    response_class=HTMLResponse,
    response_model=None,
    summary="Unsubscribe from the footer link",
    responses=_UNSUBSCRIBE_RESPONSES,
)
async def unsubscribe_link(token: str, engine: EngineDep, settings: SettingsDep) -> HTMLResponse:
    return await unsubscribe(token, engine, settings)


@router.post(
    "/u/{token}",
    response_class=HTMLResponse,
    response_model=None,
    summary="One-click unsubscribe (RFC 8058 List-Unsubscribe-Post)",
    responses=_UNSUBSCRIBE_RESPONSES,
)
async def unsubscribe_one_click(
    token: str, engine: EngineDep, settings: SettingsDep
) -> HTMLResponse:
    return await unsubscribe(token, engine, settings)


async def unsubscribe(token: str, engine: Engine, settings: Settings) -> HTMLResponse:
    """Mark the token's customer unsubscribed from its channel (idempotent)."""
    try:
        request = read_unsubscribe_token(settings.secret_key, token)
    except InvalidToken as exc:
        raise NotFound("unknown unsubscribe link") from exc
    now = utcnow()

    def record() -> None:
        with session_scope(engine) as session:
            message_store.set_unsubscribed(
                session, customer_id=request.customer_id, channel=request.channel, at=now
            )
            if request.message_id is not None:
                message_store.record_message_event(
                    session,
                    message_id=request.message_id,
                    kind="unsubscribe",
                    detail={"channel": request.channel, "source": "link"},
                    occurred_at=now,
                    dedupe_key=f"unsubscribe:{request.message_id}",
                )

    await run_in_threadpool(record)
    channel = "email" if request.channel == "email" else "text"
    return HTMLResponse(_UNSUBSCRIBED_PAGE.format(channel=channel))
