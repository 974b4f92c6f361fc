"""Trace hand-offs: the trace each customer's latest traced event was stored in.

Work crosses the store between the API and a journey (event -> real-time processor ->
transition -> dispatcher), and a trace context cannot ride along in the rows. So with
tracing on, the API records the `traceparent` of a stored event per customer, and the
dispatcher starts that customer's journeys inside it when the entry follows soon after.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from core.tables import UTCDateTime


def record_handoff(conn: Connection, *, customer_id: str, traceparent: str, now: datetime) -> None:
    conn.execute(
        text(
            "INSERT INTO trace_handoffs (customer_id, traceparent, recorded_at)"
            " VALUES (:customer_id, :traceparent, :now)"
            " ON CONFLICT (customer_id) DO UPDATE SET traceparent = excluded.traceparent,"
            " recorded_at = excluded.recorded_at"
        ).bindparams(bindparam("now", type_=UTCDateTime())),
        {"customer_id": customer_id, "traceparent": traceparent, "now": now},
    )


def recent_handoffs(
    conn: Connection, *, customer_ids: Sequence[str], since: datetime
) -> dict[str, str]:
    """customer -> traceparent, for hand-offs recorded at or after `since`."""
    wanted = sorted(set(customer_ids))
    if not wanted:
        return {}
    rows = conn.execute(
        text(
            "SELECT customer_id, traceparent FROM trace_handoffs"
            " WHERE customer_id IN :ids AND recorded_at >= :since"
        ).bindparams(bindparam("ids", expanding=True), bindparam("since", type_=UTCDateTime())),
        {"ids": wanted, "since": since},
    )
    return {row.customer_id: row.traceparent for row in rows}
