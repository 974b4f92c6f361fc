"""Dependencies: the session (one transaction per request), the Temporal client, the caller."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.client import Client

from core.errors import Forbidden, JourneysError, Unauthorized
from core.settings import Settings
from store.keys import VerifiedKey, hash_key, verify_key


# The trivial dependencies are `async def` so that FastAPI runs them on the event loop
# instead of handing each to the thread pool (measured: 4 handoffs per request).
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine_dep(request: Request) -> Engine:
    return request.app.state.engine


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request: committed when the handler returns (before the answer
    goes out, see SessionDep), rolled back on error."""
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


class TemporalConnector:
    """Connects once, lazily, so the API starts (and answers /readyz) while Temporal is down."""

    def __init__(self, address: str, namespace: str, interceptors: list[Any] | None = None):
        self.address = address
        self.namespace = namespace
        self.interceptors = interceptors or []
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Client:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    from temporalio.contrib.pydantic import pydantic_data_converter

                    self._client = await Client.connect(
                        self.address,
                        namespace=self.namespace,
                        data_converter=pydantic_data_converter,
                        interceptors=self.interceptors,
                    )
        return self._client


class TemporalUnavailable(JourneysError):
    status_code = 503
    code = "temporal_unavailable"


async def get_temporal(request: Request) -> Client:
    """The Temporal client; 503 naming the address while Temporal cannot be reached."""
    connector: TemporalConnector = request.app.state.temporal
    try:
        return await asyncio.wait_for(connector.get(), timeout=10)
    except (RuntimeError, OSError, TimeoutError) as exc:
        raise TemporalUnavailable(
            f"Temporal at {connector.address} could not be reached; try again", field=None
        ) from exc


class KeyCache:
    """Verified keys by hash for a few seconds, so a request costs no key lookup."""

    def __init__(self, ttl_seconds: float):
        self.ttl = ttl_seconds
        self._entries: dict[str, tuple[float, VerifiedKey]] = {}

    def get(self, digest: str) -> VerifiedKey | None:
        hit = self._entries.get(digest)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        return None

    def put(self, digest: str, key: VerifiedKey) -> None:
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[digest] = (time.monotonic() + self.ttl, key)

    def forget(self, key_id: str) -> None:
        for digest, (_, key) in list(self._entries.items()):
            if key.id == key_id:
                del self._entries[digest]


def _lookup_key(engine: Engine, secret: str) -> VerifiedKey | None:
    with Session(engine) as session:
        return verify_key(session, secret=secret)


async def current_key(request: Request) -> VerifiedKey:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized(
            "missing API key: send Authorization: Bearer <key>", field="authorization"
        )
    secret = secret.strip()
    cache: KeyCache = request.app.state.key_cache
    digest = hash_key(secret)
    key = cache.get(digest)
    if key is None:
        key = await run_in_threadpool(_lookup_key, request.app.state.engine, secret)
        if key is None:
            raise Unauthorized("unknown or revoked API key", field="authorization")
        cache.put(digest, key)
    request.state.key = key
    return key


def require_role(*roles: str) -> Callable[..., VerifiedKey]:
    """A dependency that lets `admin` and the named roles through, 403 for the rest."""
    allowed = {"admin", *roles}

    # Calls current_key itself instead of depending on it: each dependency level costs
    # FastAPI a resolution step on every request (measured on single-event ingest).
    async def check(request: Request) -> VerifiedKey:
        key = await current_key(request)
        if key.role not in allowed:
            raise Forbidden(
                f"role {key.role!r} may not do this; needs one of {sorted(allowed)}",
                field="authorization",
            )
        return key

    return check


# scope="function": the commit runs before the response is sent. At the default scope it
# ran after, so a client could act on a 201 whose row was not committed yet (or never).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
EngineDep = Annotated[Engine, Depends(get_engine_dep)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
AdminKey = Annotated[VerifiedKey, Depends(require_role())]
MarketerKey = Annotated[VerifiedKey, Depends(require_role("marketer"))]
IngestKey = Annotated[VerifiedKey, Depends(require_role("ingest"))]
SupportKey = Annotated[VerifiedKey, Depends(require_role("support", "marketer"))]
BrowserKey = Annotated[VerifiedKey, Depends(require_role("ingest", "web"))]
"""What a storefront page may call with its `web` key (and ingest with its own)."""
