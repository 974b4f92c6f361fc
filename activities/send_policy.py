"""When a send may go out: quiet hours in the customer's time zone and frequency caps.
Pure functions of the time, the rule and what was sent before."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from core.journeys import QuietHours


def customer_zone(quiet_hours: QuietHours, attributes: Mapping[str, Any]) -> ZoneInfo:
    """The customer's time zone from the attribute the rule names, else its default."""
    for name in (attributes.get(quiet_hours.timezone_attribute), quiet_hours.default_timezone):
        if isinstance(name, str) and name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def _clock(hhmm: str) -> time:
    hours, minutes = hhmm.split(":")
    return time(int(hours), int(minutes))


def quiet_hours_end(
    now: datetime, quiet_hours: QuietHours, attributes: Mapping[str, Any]
) -> datetime | None:
    """When the quiet hours `now` falls in end (UTC), or None when `now` is not quiet.

    `start` is inclusive and `end` exclusive; a window like 21:00-08:00 spans midnight.
    """
    zone = customer_zone(quiet_hours, attributes)
    local = now.astimezone(zone)
    start, end = _clock(quiet_hours.start), _clock(quiet_hours.end)
    if start == end:
        return None
    clock = local.time().replace(tzinfo=None)
    spans_midnight = end < start
    quiet = (clock >= start or clock < end) if spans_midnight else (start <= clock < end)
    if not quiet:
        return None
    end_day = local.date() if clock < end else local.date() + timedelta(days=1)
    # Build the wall-clock end in the zone (DST-aware), then convert to UTC.
    local_end = datetime.combine(end_day, end, tzinfo=zone)
    return local_end.astimezone(UTC)


def frequency_cap_release(
    now: datetime, *, max_messages: int, per: timedelta, sent_times: Sequence[datetime]
) -> datetime | None:
    """When one more send fits under a cap of `max_messages` per `per`, or None if it
    fits now. `sent_times` are the sends within the window ending at `now`, oldest first."""
    recent = sorted(at for at in sent_times if at > now - per)
    if len(recent) < max_messages:
        return None
    # The send may go once enough of the oldest ones have left the window.
    return recent[len(recent) - max_messages] + per
