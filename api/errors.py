"""Every error leaves as `{"error": {...}}` (plus `errors` when several apply), never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.bounds import error_message, error_path
from core.db import database_error_types, database_unavailable
from core.errors import ErrorDetail, JourneysError

log = logging.getLogger("journeys.api")

_BODY_PREFIXES = ("body", "query", "path", "header")
# What a 503 for an unavailable database asks the client to wait before it tries again.
DATABASE_RETRY_AFTER_SECONDS = 1


class ErrorDetailPublic(BaseModel):
    code: str = Field(description="what went wrong, e.g. invalid, not_found, in_use")
    message: str
    field: str | None = Field(description="the field and JSON path, e.g. steps.welcome.next")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx body; some carry more members (a bulk result beside `error`)."""

    error: ErrorDetailPublic
    errors: list[ErrorDetailPublic] = Field(
        default_factory=list, description="every problem, when there are several"
    )


def field_path(loc: Sequence[Any]) -> str:
    """Turn a pydantic location into `a.b[2].c`, dropping the request part and union tags."""
    parts = list(loc)
    if parts and parts[0] in _BODY_PREFIXES:
        parts = parts[1:]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and (part[:1].isupper() or part.startswith("function-")):
            continue  # a discriminator tag such as "AttributeCondition", not a field
        else:
            text += ("." if text else "") + str(part)
    return text


def error_body(details: Sequence[ErrorDetail]) -> dict[str, Any]:
    body: dict[str, Any] = {"error": details[0].as_dict()}
    if len(details) > 1:
        body["errors"] = [d.as_dict() for d in details]
    return body


def details_from_pydantic(errors: Sequence[dict[str, Any]]) -> list[ErrorDetail]:
    out = []
    for err in errors:
        kind = err.get("type", "invalid")
        message = err.get("msg", "invalid value")
        if kind == "json_invalid":
            ctx = err.get("ctx") or {}
            message = f"malformed JSON: {ctx.get('error', message)}"
            out.append(ErrorDetail("malformed_json", message, "body"))
            continue
        field = field_path(err.get("loc", ())) + error_path(err)
        out.append(ErrorDetail(_code(kind), error_message(err), field or None))
    return out


def _code(kind: str) -> str:
    if kind == "missing":
        return "missing_field"
    if kind == "extra_forbidden":
        return "unknown_field"
    return "invalid"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(JourneysError)
    async def _domain(_: Request, exc: JourneysError) -> JSONResponse:
        return JSONResponse(
            {**exc.extra(), **error_body(exc.details())}, status_code=exc.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = details_from_pydantic(exc.errors())
        status = 400 if any(d.code == "malformed_json" for d in details) else 422
        return JSONResponse(error_body(details), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "http_error"
        )
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(
            error_body([ErrorDetail(code, detail)]),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def _database(_: Request, exc: Exception) -> JSONResponse:
        if not database_unavailable(exc):
            raise exc  # a statement the database refused: a bug, for the catch-all below
        # The client sends the request again; what it repeats (event ids, customer ids)
        # is stored once, so a request that did commit before the cut does no harm.
        log.warning("the database is unavailable: %s", exc)
        return JSONResponse(
            error_body(
                [
                    ErrorDetail(
                        "database_unavailable",
                        "the database is unavailable; try again after Retry-After seconds",
                    )
                ]
            ),
            status_code=503,
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
        )

    # Handled here, not by the catch-all below: Starlette re-raises what reaches that one
    # after answering, and a lost connection is an outage to report, not a bug.
    for database_error in database_error_types():
        app.add_exception_handler(database_error, _database)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body([ErrorDetail("internal", "internal error; it has been logged")]),
            status_code=500,
        )
