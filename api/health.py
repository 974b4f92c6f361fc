"""Liveness, readiness, and the records background work set aside."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import text

from api.boundary import PageLimit, resource_router
from api.deps import SessionDep, require_role
from core.cursors import decode_numeric_cursor, encode_cursor
from core.settings import Settings
from core.stack import ProcessState, StackState
from store import failures as failure_store
from store.keys import VerifiedKey

FailureReader = Annotated[VerifiedKey, Depends(require_role("support"))]
FailureKindQuery = Annotated[
    Literal["customer", "segment", "rfm_model", "journey", "transition", "prediction_model"] | None,
    Query(description="only failures of this kind"),
]

router = resource_router(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    database: str
    temporal: str
    processes: dict[str, str] | None = Field(
        None,
        description="under `journeys dev`: each supervised process and whether it is up"
        " (e.g. `restarting in 2 s (killed by SIGKILL)`)",
    )


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


def _process_line(process: ProcessState, now: datetime) -> str:
    if process.status == "up":
        return "up"
    if process.status == "starting":
        return "starting" + (f" (after it was {process.last_exit})" if process.last_exit else "")
    wait = max(0.0, (process.restart_at - now).total_seconds()) if process.restart_at else 0.0
    return f"restarting in {wait:.0f} s ({process.last_exit})"


def _supervised(settings: Settings) -> dict[str, str] | None:
    """The processes `journeys dev` supervises, from its state file; None outside it."""
    if not settings.dev_state_file:
        return None
    try:
        state = StackState.model_validate_json(Path(settings.dev_state_file).read_bytes())
    except (OSError, ValueError) as exc:
        return {"journeys dev": f"unknown: {type(exc).__name__} reading its state file"}
    now = datetime.now(UTC)
    return {process.name: _process_line(process, now) for process in state.processes}


@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses={503: {"model": Readiness}},
)
async def readyz(request: Request, response: Response) -> Readiness:
    """The database and Temporal both answer, and under `journeys dev` every process it
    supervises is up (503 naming what is not)."""
    database = await asyncio.to_thread(_database_ok, request)
    temporal = await _temporal_ok(request)
    processes = _supervised(request.app.state.settings)
    ready = (
        database == "ok"
        and temporal == "ok"
        and all(line == "up" for line in (processes or {}).values())
    )
    if not ready:
        response.status_code = 503
    return Readiness(
        status="ready" if ready else "not ready",
        database=database,
        temporal=temporal,
        processes=processes,
    )


class FailurePublic(BaseModel):
    id: int
    kind: str = Field(
        description="customer | segment | rfm_model | journey | transition | prediction_model"
    )
    key: str = Field(description="the record's id or slug")
    stage: str = Field(description="realtime | segment_pass | rfm_pass | dispatch")
    error: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    next_attempt_at: datetime = Field(description="when the stage tries it again")


class FailuresPage(BaseModel):
    data: list[FailurePublic]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")


@router.get(
    "/v1/health/failures",
    response_model=FailuresPage,
    summary="Records set aside by background work, with their errors",
)
def list_failures(
    session: SessionDep,
    _: FailureReader,
    kind: FailureKindQuery = None,
    limit: PageLimit = 100,
    cursor: str | None = None,
) -> FailuresPage:
    """Every customer, segment, model, journey or transition that real-time processing, a
    scheduled pass or the dispatcher could not process: each was set aside so the others
    kept flowing, and is tried again with backoff until it goes through."""
    after = decode_numeric_cursor(cursor, prefix="failure") if cursor else None
    rows = failure_store.list_failures(
        session.connection(), kind=kind, limit=limit + 1, after_id=after
    )
    page = rows[:limit]
    return FailuresPage(
        data=[FailurePublic(**vars(row)) for row in page],
        next_cursor=encode_cursor(f"failure:{page[-1].id}") if len(rows) > limit else None,
    )
