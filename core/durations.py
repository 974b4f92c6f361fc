"""ISO 8601 durations (`P3D`, `PT5S`, `P1W`) to and from timedelta."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_DURATION = re.compile(
    r"^P(?!$)(?:(?P<weeks>\d+(?:\.\d+)?)W)?(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?=\d)(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(text: str) -> timedelta:
    """Parse an ISO 8601 duration without years or months (their length varies)."""
    if not isinstance(text, str):
        raise ValueError("must be an ISO 8601 duration string such as P3D or PT5S")
    match = _DURATION.match(text.strip().upper())
    if not match:
        raise ValueError(f"{text!r} is not an ISO 8601 duration such as P3D, PT12H or PT5S")
    parts = {k: float(v) for k, v in match.groupdict().items() if v is not None}
    value = timedelta(**parts)
    if value <= timedelta(0):
        raise ValueError("duration must be positive")
    return value


def format_duration(value: timedelta) -> str:
    """The shortest ISO 8601 text for a timedelta (days and seconds)."""
    total = int(value.total_seconds())
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, seconds = divmod(rest, 60)
    text = "P" + (f"{days}D" if days else "")
    clock = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    clock += f"{seconds}S" if seconds else ""
    if clock:
        text += "T" + clock
    return text if text != "P" else "PT0S"


def _to_timedelta(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    return parse_duration(value)  # type: ignore[arg-type]


Duration = Annotated[
    timedelta, BeforeValidator(_to_timedelta), PlainSerializer(format_duration, return_type=str)
]
"""A pydantic field type: accepts ISO 8601 text, holds a timedelta, dumps ISO 8601 text."""
