"""CORS for the routes a storefront page calls with its `web` key: a campaign's decide
and views, and single events. Nothing else is ever offered to another origin.

An origin may call them when it is in `JOURNEYS_CORS_ORIGINS` (or that holds `*`), or,
for a campaign's two routes, in the `cors_origins` of the campaign version decisions use.
A preflight (`OPTIONS` with `Access-Control-Request-Method`) from an allowed origin is
answered 204 here, before routing; from another origin 403. The answers of the routes
themselves carry `Access-Control-Allow-Origin` for an allowed origin, errors included.
Requests without `Origin` pass untouched.
"""

from __future__ import annotations

import re

import orjson
from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import NotFound
from store.personalization import CampaignCache

_CAMPAIGN_ROUTE = re.compile(r"^/v1/personalizations/([^/]+)/(?:decide|views)$")
_EVENTS_ROUTE = "/v1/events"
_PREFLIGHT_HEADERS = [
    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
    (b"access-control-allow-headers", b"authorization, content-type"),
    (b"access-control-max-age", b"600"),
]


class BrowserCors:
    def __init__(self, app: ASGIApp, *, origins: frozenset[str], campaigns: CampaignCache):
        self.app = app
        self.origins = origins
        self.campaigns = campaigns

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        campaign = _CAMPAIGN_ROUTE.match(path)
        if campaign is None and path != _EVENTS_ROUTE:
            await self.app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed = await self._allowed(origin, campaign.group(1) if campaign else None)
        if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method"):
            await _preflight(send, origin if allowed else None)
            return
        if not allowed:
            await self.app(scope, receive, send)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    *message.get("headers", []),
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"vary", b"Origin"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_cors)

    async def _allowed(self, origin: str, slug: str | None) -> bool:
        if "*" in self.origins or origin in self.origins:
            return True
        if slug is None:
            return False
        live = self.campaigns.peek(slug)
        if live is None:
            try:
                live = await run_in_threadpool(self.campaigns.get, slug)
            except NotFound:
                return False
        return "*" in live.origins or origin in live.origins


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


async def _preflight(send: Send, origin: str | None) -> None:
    if origin is None:
        body = orjson.dumps(
            {
                "error": {
                    "code": "cors_refused",
                    "message": "this origin may not call the API (JOURNEYS_CORS_ORIGINS, or the"
                    " campaign's cors_origins)",
                    "field": "origin",
                }
            }
        )
        headers = [(b"content-type", b"application/json")]
        status = 403
    else:
        body = b""
        headers = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"vary", b"Origin"),
            *_PREFLIGHT_HEADERS,
        ]
        status = 204
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
