"""Events and customer records as they arrive (API bodies, NDJSON and CSV lines)."""

from __future__ import annotations

from typing import NotRequired

from pydantic import BaseModel, ConfigDict, EmailStr, Field, ValidationError
from typing_extensions import TypedDict

from core.bounds import DataObject, Identifier, Instant, Name, error_message, error_path
from core.errors import ErrorDetail


class EventIn(BaseModel):
    """One behavioural event; `event_id` makes it idempotent."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    event_id: Identifier
    customer_id: Identifier
    name: Name
    occurred_at: Instant
    properties: DataObject = Field(default_factory=dict)


class EventRecord(TypedDict):
    """A line of a bulk import: EventIn's fields and rules, validated into a plain dict.

    No model instance per line: a bulk body validates in 1.4 instead of 2.3 us a line.
    """

    __pydantic_config__ = ConfigDict(extra="forbid", str_strip_whitespace=True)  # type: ignore[misc]

    event_id: Identifier
    customer_id: Identifier
    name: Name
    occurred_at: Instant
    properties: NotRequired[DataObject]


class CustomerIn(BaseModel):
    """A profile: `PUT` replaces it, `PATCH` and bulk merge `attributes` (null removes a key)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    email: EmailStr | None = None
    phone: str | None = Field(default=None, pattern=r"^\+?[0-9 ()-]{4,31}$")
    attributes: DataObject = Field(default_factory=dict)


class CustomerBulkLine(CustomerIn):
    customer_id: Identifier


class LineRejection(BaseModel):
    line: int
    field: str | None
    message: str


def rejection_from(line: int, error: ValidationError) -> LineRejection:
    """The first problem of a line, named by its field (and the JSON path inside it)."""
    first = error.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) + error_path(first)
    return LineRejection(line=line, field=field or None, message=error_message(first))


def rejection_detail(rejection: LineRejection) -> ErrorDetail:
    return ErrorDetail(
        "invalid_line", f"line {rejection.line}: {rejection.message}", rejection.field
    )
