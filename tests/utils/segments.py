"""Factories for segment tests: customers, events, segments and memberships on a store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from core.tables import Customer, Event, Segment, SegmentMembership

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
_event_ids = count(1)


def add_customer(
    engine: Engine,
    customer_id: str,
    attributes: dict[str, Any] | None = None,
    *,
    email: str | None = None,
    phone: str | None = None,
    created_at: datetime | None = None,
) -> None:
    with Session(engine) as session:
        session.add(
            Customer(
                id=customer_id,
                email=email,
                phone=phone,
                attributes=attributes or {},
                created_at=created_at or NOW - timedelta(days=100),
            )
        )
        session.commit()


def add_event(
    engine: Engine,
    customer_id: str,
    name: str,
    *,
    days_ago: float,
    properties: dict[str, Any] | None = None,
) -> None:
    with Session(engine) as session:
        session.add(
            Event(
                event_id=f"ev-{next(_event_ids)}",
                customer_id=customer_id,
                name=name,
                occurred_at=NOW - timedelta(days=days_ago),
                properties=properties or {},
            )
        )
        session.commit()


def add_label_segment(engine: Engine, slug: str, members: list[str]) -> None:
    """An RFM label segment as the RFM room stores it (kind `rfm`), with members."""
    with Session(engine) as session:
        session.add(Segment(slug=slug, name=slug, kind="rfm", model_slug=slug.split(":")[0]))
        for customer_id in members:
            session.add(SegmentMembership(segment_slug=slug, customer_id=customer_id, since=NOW))
        session.commit()
