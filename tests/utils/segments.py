"""Factories for segment tests: customers, events, segments and memberships on a store,
and the real-time processor run by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from activities.realtime import RealtimeActivities
from core.tables import Customer, Event, Segment, SegmentMembership, utcnow
from store import segments as segment_store
from tests.utils.api import settings_for_tests
from worker import realtime_customer_steps

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


def realtime_processor(engine: Engine) -> RealtimeActivities:
    return RealtimeActivities(
        engine, settings_for_tests(), customer_steps=realtime_customer_steps(), event_sink=None
    )


def drain_realtime(engine: Engine, rounds: int = 10) -> None:
    """Run real-time batches until nothing is left to claim (bounded)."""
    processor = realtime_processor(engine)
    for _ in range(rounds):
        events, customers = processor.process_batch(500)
        if not events and not customers:
            return
    raise AssertionError(f"real-time work still pending after {rounds} batches")


def segment_members(engine: Engine, slug: str) -> list[str]:
    with engine.connect() as conn:
        return [m.customer_id for m in segment_store.iter_members(conn, slug=slug)]


def create_rule_segment(engine: Engine, slug: str, condition: dict[str, Any]) -> None:
    with engine.begin() as conn:
        segment_store.create_segment(
            conn, slug=slug, name=slug, kind="rule", condition=condition, now=utcnow()
        )
