"""Customer profiles: create or replace, merge attributes, read with their segments."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlmodel import Session

from core.events import CustomerBulkLine, CustomerIn
from core.tables import Customer, SegmentMembership

customers = Customer.__table__
memberships = SegmentMembership.__table__


def merge_attributes(current: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Top-level merge; a null value removes the attribute (as Customer.io does)."""
    merged = dict(current)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _upsert(conn: Connection, rows: list[dict[str, Any]]) -> None:
    insert = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(customers)
    statement = insert.values(rows)
    statement = statement.on_conflict_do_update(
        index_elements=["id"],
        set_={
            "email": statement.excluded.email,
            "phone": statement.excluded.phone,
            "attributes": statement.excluded.attributes,
            "updated_at": statement.excluded.updated_at,
            "realtime_pending": True,
        },
    )
    conn.execute(statement)


def get_customer(
    conn: Connection, *, customer_id: str, lock: bool = False
) -> dict[str, Any] | None:
    query = select(customers).where(customers.c.id == customer_id)
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    return dict(row) if row else None


def sample_attributes(conn: Connection | Session, *, customers_read: int = 500) -> dict[str, Any]:
    """Every top-level attribute name held by the first `customers_read` customers (by
    id, so the same store gives the same answer), each with the first non-empty value
    seen: the sample customer a template is proven against holds real values."""
    rows = conn.execute(
        select(customers.c.attributes).order_by(customers.c.id).limit(customers_read)
    )
    sample: dict[str, Any] = {}
    for (attributes,) in rows:
        for key, value in (attributes or {}).items():
            if key not in sample and value not in (None, ""):
                sample[key] = value
    return sample


def put_customer(
    conn: Connection, *, customer_id: str, profile: CustomerIn, now: datetime
) -> tuple[dict[str, Any], bool]:
    """Create or replace a profile; returns it and whether it was created."""
    existing = get_customer(conn, customer_id=customer_id, lock=True)
    row = {
        "id": customer_id,
        "email": profile.email,
        "phone": profile.phone,
        "attributes": {k: v for k, v in profile.attributes.items() if v is not None},
        "created_at": existing["created_at"] if existing else now,
        "updated_at": now,
        "realtime_pending": True,
    }
    _upsert(conn, [row])
    return get_customer(conn, customer_id=customer_id) or row, existing is None


def patch_customer(
    conn: Connection, *, customer_id: str, changes: dict[str, Any], now: datetime
) -> tuple[dict[str, Any], bool]:
    """Merge `changes` (email, phone, attributes) into a profile, creating it if needed."""
    existing = get_customer(conn, customer_id=customer_id, lock=True)
    base = existing or {"email": None, "phone": None, "attributes": {}, "created_at": now}
    row = {
        "id": customer_id,
        "email": changes["email"] if "email" in changes else base["email"],
        "phone": changes["phone"] if "phone" in changes else base["phone"],
        "attributes": merge_attributes(base["attributes"] or {}, changes.get("attributes") or {}),
        "created_at": base["created_at"],
        "updated_at": now,
        "realtime_pending": True,
    }
    _upsert(conn, [row])
    return get_customer(conn, customer_id=customer_id) or row, existing is None


def upsert_customers(
    conn: Connection,
    *,
    lines: Sequence[CustomerBulkLine],
    now: datetime,
) -> int:
    """Bulk upsert: attributes merged, email/phone replaced only where a line gives them.

    Lines apply in order, so two lines for one customer act like two PATCHes.
    """
    ids = list(dict.fromkeys(line.customer_id for line in lines))
    existing = {
        row["id"]: dict(row)
        for chunk in _chunks(ids, 5_000)
        for row in conn.execute(select(customers).where(customers.c.id.in_(chunk))).mappings()
    }
    merged: dict[str, dict[str, Any]] = {}
    for line in lines:
        given = line.model_fields_set
        old = merged.get(line.customer_id) or existing.get(line.customer_id) or {}
        merged[line.customer_id] = {
            "id": line.customer_id,
            "email": line.email if "email" in given else old.get("email"),
            "phone": line.phone if "phone" in given else old.get("phone"),
            "attributes": merge_attributes(old.get("attributes") or {}, line.attributes),
            "created_at": old.get("created_at", now),
            "updated_at": now,
            "realtime_pending": True,
        }
    rows = list(merged.values())
    for chunk in _chunks(rows, 2_000):
        _upsert(conn, chunk)
    return len(rows)


def customer_segments(conn: Connection, *, customer_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(memberships.c.segment_slug, memberships.c.since)
        .where(memberships.c.customer_id == customer_id)
        .order_by(memberships.c.segment_slug)
    ).mappings()
    return [{"segment": r["segment_slug"], "since": r["since"]} for r in rows]


def claim_pending_customers(conn: Connection, *, limit: int) -> list[str]:
    """Customers whose attributes changed since the real-time processor last looked."""
    ids = list(
        conn.execute(
            select(customers.c.id)
            .where(text("realtime_pending"))
            .order_by(customers.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars()
    )
    if ids:
        conn.execute(
            customers.update().where(customers.c.id.in_(ids)).values(realtime_pending=False)
        )
    return ids


def flag_for_realtime(conn: Connection, *, customer_ids: Sequence[str]) -> None:
    """Have the real-time processor look at these customers again (its next batch)."""
    if customer_ids:
        conn.execute(
            customers.update()
            .where(customers.c.id.in_(sorted(set(customer_ids))))
            .values(realtime_pending=True)
        )


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
