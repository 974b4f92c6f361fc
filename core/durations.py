"""ISO 8601 durations (`P3D`, `PT5S`, `P1W`) to and from timedelta."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

from core.bounds import MAX_DURATION

_DURATION = re.compile(
    r"^P(?!$)(?:(?P<weeks>\d+(?:\.\d+)?)W)?(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?=\d)(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


_SECONDS = {"weeks": 604_800.0, "days": 86_400.0, "hours": 3_600.0, "minutes": 60.0, "seconds": 1.0}


def parse_duration(text: str) -> timedelta:
    """Parse an ISO 8601 duration without years or months (their length varies), positive
    and at most `MAX_DURATION`."""
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("must be an ISO 8601 duration string such as P3D or PT5S")
    match = _DURATION.match(text.strip().upper())
    if not match:
        raise ValueError(f"{text!r} is not an ISO 8601 duration such as P3D, PT12H or PT5S")
    parts = {k: float(v) for k, v in match.groupdict().items() if v is not None}
    seconds = sum(_SECONDS[unit] * amount for unit, amount in parts.items())
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"{text!r} is longer than the maximum, {format_duration(MAX_DURATION)}")
    value = timedelta(seconds=seconds)
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
