"""Page cursors: opaque URL-safe text a list gives out and takes back."""

from __future__ import annotations

import base64
import binascii

from core.bounds import MAX_ID_LENGTH, text_problem
from core.errors import ErrorDetail, ValidationFailed

MAX_POSITION = 2**62
"""A numeric position (a row id) beyond which no cursor this API gave can point."""


def encode_cursor(position: str) -> str:
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, *, field: str = "cursor") -> str:
    """The position a cursor we gave out stands for; 422 naming `field` for anything else."""
    try:
        if not cursor.isascii() or len(cursor) > 4 * MAX_ID_LENGTH:
            raise ValueError(cursor)
        padded = cursor + "=" * (-len(cursor) % 4)
        position = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
        if not position or text_problem(position, max_length=2 * MAX_ID_LENGTH):
            raise ValueError(cursor)
    except (ValueError, binascii.Error) as exc:
        raise _not_ours(field) from exc
    return position


def decode_numeric_cursor(cursor: str, *, prefix: str, field: str = "cursor") -> int:
    """A cursor that stands for `prefix:<row id>`."""
    head, _, value = decode_cursor(cursor, field=field).partition(":")
    if head != prefix or not (value.isascii() and value.isdigit()) or int(value) > MAX_POSITION:
        raise _not_ours(field)
    return int(value)


def _not_ours(field: str) -> ValidationFailed:
    return ValidationFailed(
        [ErrorDetail("invalid", f"{field} is not one this API gave out", field)]
    )
