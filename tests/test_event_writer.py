"""Group commit: each single event learns whether it was new, each bulk batch how many of
its events were."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

from core.events import EventIn, EventRecord
from store import event_writers
from store.event_writers import BulkWriter, EventWriter
from store.events import KnownCustomers, insert_event_group

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


def records(*event_ids: str, customer_id: str = "c-1") -> list[EventRecord]:
    return [
        EventRecord(
            event_id=event_id,
            customer_id=customer_id,
            name="Purchase",
            occurred_at=datetime(2026, 11, 20, 10, 0, tzinfo=UTC),
        )
        for event_id in event_ids
    ]


async def test_concurrent_bulk_batches_each_count_their_own_new_events(store_engine):
    writer = BulkWriter(store_engine, KnownCustomers())
    await writer.open()
    try:
        counts = await asyncio.gather(
            writer.write(records("x", "y"), realtime=True),
            writer.write(records("y", "z", customer_id="c-2"), realtime=False),
            writer.write(records("x"), realtime=True),
            *(
                writer.write(records(f"b-{i}", customer_id=f"c-{i}"), realtime=False)
                for i in range(8)
            ),
        )
    finally:
        await writer.close()
    # x and y go to whichever batch is stored first; the repeats count as duplicates.
    assert sum(counts[:3]) == 3
    assert counts[3:] == [1] * 8
    assert stored_ids(store_engine) == sorted(["x", "y", "z"] + [f"b-{i}" for i in range(8)])
    with store_engine.connect() as conn:
        customers = conn.execute(text("SELECT count(*) FROM customers")).scalar_one()
        pending = (
            conn.execute(
                text("SELECT event_id FROM events WHERE realtime_pending ORDER BY event_id")
            )
            .scalars()
            .all()
        )
    assert customers == 8  # c-0 ... c-7, c-1 and c-2 among them
    # Each batch keeps its own realtime flag inside a shared transaction.
    assert set(pending) <= {"x", "y"} and "x" in pending


async def test_a_bulk_batch_that_cannot_be_stored_fails_alone(store_engine):
    broken = [{**records("broken")[0], "properties": {"not_json": object()}}]
    writer = BulkWriter(store_engine, KnownCustomers())
    await writer.open()
    try:
        outcomes = await asyncio.gather(
            writer.write(records("ok-1"), realtime=False),
            writer.write(broken, realtime=False),  # type: ignore[arg-type]
            writer.write(records("ok-2", customer_id="c-2"), realtime=False),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    assert outcomes[0] == 1 and outcomes[2] == 1
    assert isinstance(outcomes[1], Exception)
    assert stored_ids(store_engine) == ["ok-1", "ok-2"]


async def _write_through_bulk_writer(engine, events: list[EventRecord]) -> None:
    writer = BulkWriter(engine, KnownCustomers())
    await writer.open()
    try:
        await writer.write(events, realtime=False)
    finally:
        await writer.close()


async def test_the_sqlite_bulk_writer_checkpoints_after_enough_events(sqlite_engine, monkeypatch):
    database = Path(sqlite_engine.url.database)
    many = [records(f"e-{i}", customer_id=f"c-{i}")[0] for i in range(3000)]
    with sqlite_engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    before = database.stat().st_size

    # Below the threshold the rows stay in the WAL: the database file does not grow.
    monkeypatch.setattr(event_writers, "BULK_CHECKPOINT_EVENTS", 10_000)
    await _write_through_bulk_writer(sqlite_engine, many[:1500])
    assert database.stat().st_size == before

    monkeypatch.setattr(event_writers, "BULK_CHECKPOINT_EVENTS", 1000)
    await _write_through_bulk_writer(sqlite_engine, many[1500:])
    assert database.stat().st_size > before
    assert len(stored_ids(sqlite_engine)) == 3000


async def test_a_long_reader_does_not_hold_bulk_writes_behind_a_checkpoint(
    sqlite_engine, monkeypatch
):
    monkeypatch.setattr(event_writers, "BULK_CHECKPOINT_EVENTS", 1)
    reader = sqlite3.connect(sqlite_engine.url.database)
    writer = BulkWriter(sqlite_engine, KnownCustomers())
    await writer.open()
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()  # an old snapshot, held
        assert await writer.write(records("a"), realtime=False) == 1
        # The checkpoint after "a" waits for that reader: a second, not the 60 s busy
        # timeout, before the writer moves on to "b".
        assert await asyncio.wait_for(writer.write(records("b"), realtime=False), 20) == 1
    finally:
        reader.rollback()
        reader.close()
        await writer.close()
    assert stored_ids(sqlite_engine) == ["a", "b"]
