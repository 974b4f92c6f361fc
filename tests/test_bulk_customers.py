"""Bulk batches create their unknown customers; a process remembers the ones it stored."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import text

import store.events
from core.events import EventRecord
from store.events import KnownCustomers, write_event_batch

AT = datetime(2026, 1, 1, 10, tzinfo=UTC)


def _events(*pairs: tuple[str, str]) -> list[EventRecord]:
    return [
        EventRecord(event_id=event_id, customer_id=customer_id, name="Purchase", occurred_at=AT)
        for event_id, customer_id in pairs
    ]


def _customers(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT id FROM customers ORDER BY id")).scalars())


def test_known_customers_are_not_created_again_and_new_ones_are(store_engine):
    known = KnownCustomers()
    write_event_batch(store_engine, events=_events(("e-1", "c-1")), realtime=False, known=known)
    assert known.unknown({"c-1", "c-2"}) == {"c-2"}

    stored = write_event_batch(
        store_engine,
        events=_events(("e-2", "c-1"), ("e-3", "c-2"), ("e-1", "c-1")),
        realtime=False,
        known=known,
    )
    assert stored == 2
    assert _customers(store_engine) == ["c-1", "c-2"]
    assert known.unknown({"c-1", "c-2"}) == set()


def test_a_failed_batch_leaves_its_customers_unknown(store_engine, monkeypatch):
    def fail(*_args: object, **_kwargs: object) -> int:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(store.events, "insert_events", fail)
    known = KnownCustomers()
    with pytest.raises(RuntimeError):
        write_event_batch(store_engine, events=_events(("e-1", "c-1")), realtime=False, known=known)
    assert known.unknown({"c-1"}) == {"c-1"}


def test_a_full_memory_starts_again_and_still_creates_every_customer(store_engine):
    known = KnownCustomers(limit=3)
    write_event_batch(
        store_engine, events=_events(("e-1", "c-1"), ("e-2", "c-2")), realtime=False, known=known
    )
    write_event_batch(
        store_engine, events=_events(("e-3", "c-3"), ("e-4", "c-4")), realtime=False, known=known
    )
    assert known.unknown({"c-1", "c-2", "c-3", "c-4"}) == {"c-1", "c-2"}
    assert _customers(store_engine) == ["c-1", "c-2", "c-3", "c-4"]
