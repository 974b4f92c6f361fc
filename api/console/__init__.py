"""The console: web pages served by the API at `/console` for marketers and support.

Server-rendered Jinja2 pages (no build step), a vendored htmx (static/htmx, its licence
beside it) for live validation and deferred counts, charts drawn as SVG on the server,
sign-in with an API key into a signed session cookie, CSRF tokens on every form, and a
strict Content-Security-Policy. docs/console.md describes the pages.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment
from starlette.datastructures import State

from api.console.auth import KeyIdCache
from api.console.cache import Aggregates
from api.console.web import STATIC, SecurityHeaders, install_error_pages, make_environment


@dataclass
class ConsoleState:
    keys: KeyIdCache
    aggregates: Aggregates
    templates: Environment


def build_console(state: State) -> FastAPI:
    """The console as an app to mount at `/console`, sharing the API's state (settings,
    store, Temporal client, key cache), so its changes go through the API's own code."""
    from api.console import customer_pages, journey_pages, model_pages, overview

    console = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    console.state = state
    state.console = ConsoleState(
        keys=KeyIdCache(state.settings.key_cache_seconds),
        aggregates=Aggregates(state.engine),
        templates=make_environment(),
    )
    console.mount("/static", StaticFiles(directory=STATIC), name="static")
    for module in (overview, model_pages, journey_pages, customer_pages):
        console.include_router(module.router)
    install_error_pages(console)
    console.add_middleware(SecurityHeaders)
    return console
