"""Long-running activities ride out a database outage instead of failing.

The dispatcher and the real-time processor run for minutes in one activity. A cut
connection (a failover, a restart, `pg_terminate_backend`) used to fail the whole
activity, and Temporal's retry policy then waited longer after each failure in a row, up
to 30 s, before the next attempt: dispatch stalled for as long. Inside the activity the
step is simply tried again after a short pause (its transaction rolled back, so it is
done once), while the activity keeps heartbeating.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from core.db import database_unavailable

log = logging.getLogger("journeys.outages")

T = TypeVar("T")

FIRST_PAUSE_SECONDS = 0.2
MAX_PAUSE_SECONDS = 5.0


async def riding_out_outages(step: Callable[[], Awaitable[T]], what: str) -> T:
    """`await step()`, again after 0.2 s, 0.4 s ... (at most 5 s) for as long as it fails
    because the database is unavailable; any other error is raised."""
    pause = FIRST_PAUSE_SECONDS
    while True:
        try:
            return await step()
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning(
                "%s: the database is unavailable (%s); again in %.1f s", what, reason, pause
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, MAX_PAUSE_SECONDS)
