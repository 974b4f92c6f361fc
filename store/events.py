"""Events: idempotent by `event_id`; unknown customers are created on their first event."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from core.events import EventIn
from core.tables import Customer, Event

_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


def sqlite_time(value: datetime) -> str:
    """The text SQLite holds for an instant (what SQLAlchemy's DateTime writes there)."""
    return value.astimezone(UTC).strftime(_SQLITE_TIME)


def _insert(conn: Connection, table: Any) -> Any:
    return (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(table)


def ensure_customers(conn: Connection, *, customer_ids: Sequence[str], now: datetime) -> int:
    """Create the customers that do not exist yet; returns how many were created."""
    ids = sorted(set(customer_ids))
    if not ids:
        return 0
    statement = (
        _insert(conn, Customer.__table__)
        .values(
            [{"id": cid, "attributes": {}, "created_at": now, "updated_at": now} for cid in ids]
        )
        .on_conflict_do_nothing(index_elements=["id"])
    )
    return conn.execute(statement).rowcount or 0


_INSERT_EVENT_POSTGRES = text(
    "WITH new_customer AS ("
    " INSERT INTO customers (id, attributes, created_at, updated_at)"
    " VALUES (:customer_id, '{}'::jsonb, :now, :now) ON CONFLICT (id) DO NOTHING)"
    " INSERT INTO events (event_id, customer_id, name, occurred_at, properties, received_at,"
    " realtime_pending)"
    " VALUES (:event_id, :customer_id, :name, :occurred_at, CAST(:properties AS jsonb), :now,"
    " :realtime) ON CONFLICT (event_id) DO NOTHING RETURNING id"
)


def insert_event(conn: Connection, *, event: EventIn, now: datetime, realtime: bool = True) -> bool:
    """Store one event; False when its `event_id` was stored before (also under a race)."""
    if conn.dialect.name == "postgresql":
        # One round trip: the customer and the event in a single statement.
        inserted = conn.execute(
            _INSERT_EVENT_POSTGRES,
            {
                "customer_id": event.customer_id,
                "now": now,
                "event_id": event.event_id,
                "name": event.name,
                "occurred_at": event.occurred_at,
                "properties": orjson.dumps(event.properties).decode(),
                "realtime": realtime,
            },
        )
        return inserted.first() is not None
    ensure_customers(conn, customer_ids=[event.customer_id], now=now)
    statement = (
        _insert(conn, Event.__table__)
        .values(
            event_id=event.event_id,
            customer_id=event.customer_id,
            name=event.name,
            occurred_at=event.occurred_at,
            properties=event.properties,
            received_at=now,
            realtime_pending=realtime,
        )
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(Event.__table__.c.id)
    )
    return conn.execute(statement).first() is not None


def insert_events(
    conn: Connection, *, events: Sequence[EventIn], now: datetime, realtime: bool = True
) -> int:
    """Store a batch in one transaction; returns how many were new (the rest were repeats)."""
    if not events:
        return 0
    if conn.dialect.name == "postgresql":
        return _copy_events_postgres(conn, events=events, now=now, realtime=realtime)
    return _insert_events_sqlite(conn, events=events, now=now, realtime=realtime)


def _insert_events_sqlite(
    conn: Connection, *, events: Sequence[EventIn], now: datetime, realtime: bool
) -> int:
    stamp = sqlite_time(now)
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(
            "INSERT INTO customers (id, attributes, created_at, updated_at, realtime_pending)"
            " VALUES (?, '{}', ?, ?, 0) ON CONFLICT (id) DO NOTHING",
            [(cid, stamp, stamp) for cid in {e.customer_id for e in events}],
        )
        before = conn.connection.dbapi_connection.total_changes  # type: ignore[union-attr]
        cursor.executemany(
            "INSERT INTO events (event_id, customer_id, name, occurred_at, properties,"
            " received_at, realtime_pending) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (event_id) DO NOTHING",
            [
                (
                    e.event_id,
                    e.customer_id,
                    e.name,
                    sqlite_time(e.occurred_at),
                    orjson.dumps(e.properties).decode(),
                    stamp,
                    1 if realtime else 0,
                )
                for e in events
            ],
        )
        return conn.connection.dbapi_connection.total_changes - before  # type: ignore[union-attr]
    finally:
        cursor.close()


def _copy_events_postgres(
    conn: Connection, *, events: Sequence[EventIn], now: datetime, realtime: bool
) -> int:
    conn.execute(
        text(
            "CREATE TEMP TABLE IF NOT EXISTS staged_events (event_id text, customer_id text,"
            " name text, occurred_at timestamptz, properties text) ON COMMIT DELETE ROWS"
        )
    )
    raw = conn.connection.dbapi_connection
    with raw.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute("TRUNCATE staged_events")
        with cursor.copy(
            "COPY staged_events (event_id, customer_id, name, occurred_at, properties) FROM STDIN"
        ) as copy:
            for e in events:
                copy.write_row(
                    (
                        e.event_id,
                        e.customer_id,
                        e.name,
                        e.occurred_at,
                        orjson.dumps(e.properties).decode(),
                    )
                )
        cursor.execute(
            "INSERT INTO customers (id, attributes, created_at, updated_at)"
            " SELECT DISTINCT customer_id, '{}'::jsonb, %(now)s, %(now)s FROM staged_events"
            # One lock order for every batch: concurrent batches sharing customers
            # otherwise deadlock on the customers index.
            " ORDER BY customer_id ON CONFLICT (id) DO NOTHING",
            {"now": now},
        )
        cursor.execute(
            "INSERT INTO events (event_id, customer_id, name, occurred_at, properties,"
            " received_at, realtime_pending)"
            " SELECT event_id, customer_id, name, occurred_at, properties::jsonb,"
            " %(now)s, %(realtime)s FROM staged_events"
            " ORDER BY event_id ON CONFLICT (event_id) DO NOTHING",
            {"now": now, "realtime": realtime},
        )
        return cursor.rowcount


def get_event(conn: Connection, *, event_id: str) -> dict[str, Any] | None:
    row = conn.execute(select(Event.__table__).where(Event.__table__.c.event_id == event_id))
    found = row.mappings().first()
    return dict(found) if found else None


def count_events(conn: Connection, *, customer_id: str | None = None) -> int:
    table = Event.__table__
    query = select(text("count(*)")).select_from(table)
    if customer_id is not None:
        query = query.where(table.c.customer_id == customer_id)
    return int(conn.execute(query).scalar_one())


def claim_pending_events(conn: Connection, *, limit: int) -> list[dict[str, Any]]:
    """The oldest events the real-time processor has not seen, marked seen in this transaction.

    On PostgreSQL the rows are locked with SKIP LOCKED, so several workers share the work.
    """
    rows = [
        dict(r)
        for r in conn.execute(
            select(
                Event.__table__.c.id,
                Event.__table__.c.event_id,
                Event.__table__.c.customer_id,
                Event.__table__.c.name,
                Event.__table__.c.occurred_at,
                Event.__table__.c.properties,
            )
            .where(text("realtime_pending"))
            .order_by(Event.__table__.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).mappings()
    ]
    if rows:
        ids = [r["id"] for r in rows]
        conn.execute(
            Event.__table__.update()
            .where(Event.__table__.c.id.in_(ids))
            .values(realtime_pending=False)
        )
    return rows
