"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import Request, Response
from pydantic import BaseModel
from sqlalchemy import text

from api.boundary import resource_router

router = resource_router(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    database: str
    temporal: str


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


def _database_ok(request: Request) -> str:
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
        return f"unreachable: {type(exc).__name__}"


async def _temporal_ok(request: Request) -> str:
    try:
        client = await asyncio.wait_for(request.app.state.temporal.get(), timeout=3)
        await asyncio.wait_for(client.service_client.check_health(), timeout=3)
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"unreachable: {type(exc).__name__}"


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request, response: Response) -> Readiness:
    """The database and Temporal both answer (503 naming the one that does not)."""
    database = await asyncio.to_thread(_database_ok, request)
    temporal = await _temporal_ok(request)
    ready = database == "ok" and temporal == "ok"
    if not ready:
        response.status_code = 503
    return Readiness(status="ready" if ready else "not ready", database=database, temporal=temporal)
