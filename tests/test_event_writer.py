"""Single events by group commit: each request learns whether its own event was new."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from sqlalchemy import text

from core.events import EventIn
from store.event_writers import EventWriter
from store.events import insert_event_group

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def event(event_id: str, customer_id: str = "c-1", **properties: object) -> EventIn:
    return EventIn(
        event_id=event_id,
        customer_id=customer_id,
        name="Purchase",
        occurred_at=datetime(2026, 11, 20, 10, 0, tzinfo=UTC),
        properties=properties,
    )


def stored_ids(engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT event_id FROM events ORDER BY event_id"))]


def test_a_group_tells_new_events_from_repeats_within_it_and_before_it(store_engine):
    with store_engine.begin() as conn:
        first = insert_event_group(
            conn, events=[event("a"), event("b", "c-2"), event("a")], now=NOW
        )
    with store_engine.begin() as conn:
        second = insert_event_group(conn, events=[event("b", "c-2"), event("c")], now=NOW)
    assert first == [True, True, False]
    assert second == [False, True]
    assert stored_ids(store_engine) == ["a", "b", "c"]
    with store_engine.connect() as conn:
        customers = conn.execute(text("SELECT id FROM customers ORDER BY id")).scalars().all()
        pending = conn.execute(text("SELECT count(*) FROM events WHERE realtime_pending"))
        assert pending.scalar_one() == 3
    assert customers == ["c-1", "c-2"]


async def test_concurrent_writers_of_one_event_id_see_exactly_one_new(store_engine):
    writer = EventWriter(store_engine)
    await writer.open()
    try:
        outcomes = await asyncio.gather(*(writer.write(event("same")) for _ in range(40)))
        others = await asyncio.gather(*(writer.write(event(f"e-{i}")) for i in range(60)))
    finally:
        await writer.close()
    assert outcomes.count(True) == 1 and len(outcomes) == 40
    assert all(others)
    assert len(stored_ids(store_engine)) == 61


async def test_an_event_that_cannot_be_stored_fails_alone(store_engine):
    # A value the JSON encoder refuses stands for any event the store rejects.
    broken = EventIn.model_construct(
        event_id="broken",
        customer_id="c-9",
        name="Purchase",
        occurred_at=datetime(2026, 11, 20, tzinfo=UTC),
        properties={"not_json": object()},
    )
    writer = EventWriter(store_engine)
    await writer.open()
    try:
        outcomes = await asyncio.gather(
            writer.write(event("ok-1")),
            writer.write(broken),
            writer.write(event("ok-2")),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], Exception)
    assert stored_ids(store_engine) == ["ok-1", "ok-2"]
