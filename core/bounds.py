"""What the product accepts: the bounds every input is held to where it enters.

Each bound exists because something downstream breaks past it: PostgreSQL refuses NUL in
text and jsonb, SQLite keeps integers as 64-bit, orjson (the JSON writer) refuses lone
surrogates and nests at most 255 levels, SQLite's parser overflows on deeply nested SQL,
and Python's dates stop at year 9999. The README lists them for users.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

MAX_ID_LENGTH = 255
"""Customer ids, event ids, slugs, event names, template names."""
MAX_NAME_LENGTH = 255
MAX_KEY_LENGTH = 255
"""A property or attribute name, at any depth."""
MAX_TEXT_LENGTH = 65_536
"""One string anywhere in a JSON body (template sources included), in characters."""
MAX_VALUE_LENGTH = 32_768
"""One string inside event properties or customer attributes, in characters."""
MAX_JSON_DEPTH = 32
"""Nesting of a whole JSON document: a body, or one line of a bulk body."""
MAX_DATA_DEPTH = 16
"""Nesting inside event properties and customer attributes."""
MAX_CONDITION_DEPTH = 10
"""Nested all / any / not groups in one condition."""
MAX_CONDITION_NODES = 200
MIN_INTEGER = -(2**63)
MAX_INTEGER = 2**63 - 1
MAX_DURATION = timedelta(days=3660)
"""About ten years: any delay, window, timeout, timeframe or schedule interval."""
MIN_INSTANT = datetime(1900, 1, 1, tzinfo=UTC)
MAX_INSTANT = datetime(2200, 1, 1, tzinfo=UTC)
MAX_VERSION = 2**31 - 1
"""A version number (a 32-bit column on PostgreSQL)."""
MAX_QUERY_LENGTH = 2_048
# One page size for every list route, so a client pages everything the same way.
MAX_PAGE_SIZE = 1_000
"""One query or path parameter, in characters."""


class JsonProblem(ValueError):
    """The first thing wrong in a JSON value, and where (`.a.b[2]`, relative)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path or 'value'}: {message}")
        self.path = path
        self.message = message


def text_problem(text: str, *, max_length: int = MAX_TEXT_LENGTH) -> str | None:
    """Why `text` may not be stored (NUL, lone surrogate, length), or None."""
    if len(text) > max_length:
        return f"longer than {max_length} characters"
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode (a lone surrogate such as \\udfff)"
    return None


def number_problem(value: int | float) -> str | None:
    if isinstance(value, int):
        if MIN_INTEGER <= value <= MAX_INTEGER:
            return None
        return "integer outside the 64-bit range (-2^63 to 2^63-1)"
    if math.isfinite(value):
        return None
    return "not a finite number (NaN and Infinity are refused)"


def check_json(
    value: Any,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_text: int = MAX_TEXT_LENGTH,
    path: str = "",
) -> None:
    """Raise `JsonProblem` at the first string, key, number or nesting out of bounds."""
    _check(value, path, max_depth, max_text)


def _check(value: Any, path: str, depth_left: int, max_text: int) -> None:
    kind = type(value)
    if kind is str:
        problem = text_problem(value, max_length=max_text)
        if problem:
            raise JsonProblem(path, problem)
    elif kind is dict:
        if depth_left <= 0:
            raise JsonProblem(path, "nested too deeply")
        for key, item in value.items():
            problem = (
                text_problem(key, max_length=MAX_KEY_LENGTH) if type(key) is str else "not text"
            )
            if problem:
                raise JsonProblem(path, f"key {key[:40]!r} {problem}")
            _check(item, f"{path}.{key}", depth_left - 1, max_text)
    elif kind is list:
        if depth_left <= 0:
            raise JsonProblem(path, "nested too deeply")
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]", depth_left - 1, max_text)
    elif kind is int or kind is float:
        problem = number_problem(value)
        if problem:
            raise JsonProblem(path, problem)
    elif value is not None and kind is not bool:
        raise JsonProblem(path, f"not a JSON value ({kind.__name__})")


def _bounded_data(value: dict[str, Any]) -> dict[str, Any]:
    try:
        check_json(value, max_depth=MAX_DATA_DEPTH, max_text=MAX_VALUE_LENGTH)
    except JsonProblem as problem:
        raise PydanticCustomError(
            "json_bounds", "{message}", {"message": problem.message, "path": problem.path}
        ) from None
    return value


DataObject = Annotated[dict[str, Any], AfterValidator(_bounded_data)]
"""Event properties and customer attributes: a JSON object within the data bounds."""

_NO_NUL = r"^[^\x00]*$"

Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=_NO_NUL)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=_NO_NUL)]

_NUMERIC_TEXT = re.compile(r"^\s*[+-]?\d+(\.\d*)?\s*$")


def _instant_text(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or _NUMERIC_TEXT.match(value):
        raise PydanticCustomError(
            "instant_type", "must be an ISO 8601 time with a zone, such as 2026-11-20T10:00:00Z"
        )
    return value


def _instant_range(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise PydanticCustomError("instant_zone", "must carry a zone (Z or +01:00)")
    if not MIN_INSTANT <= value < MAX_INSTANT:
        raise PydanticCustomError(
            "instant_range", "must be between 1900-01-01 and 2200-01-01 (UTC)"
        )
    return value


Instant = Annotated[datetime, BeforeValidator(_instant_text), AfterValidator(_instant_range)]
"""A real calendar instant with a zone, given as ISO 8601 text (no epoch numbers)."""


def error_path(error: Any) -> str:
    """The JSON path a bounds error found inside its field (`.a.b`), or ``."""
    context = error.get("ctx") or {}
    return str(context.get("path", "")) if error.get("type") == "json_bounds" else ""


def error_message(error: Any) -> str:
    """A pydantic error's message, with the NUL pattern said in words."""
    context = error.get("ctx") or {}
    if error.get("type") == "string_pattern_mismatch" and context.get("pattern") == _NO_NUL:
        return "contains a NUL character (\\u0000)"
    return str(error.get("msg", "invalid"))
