"""File imports for the CLI: the same parsing and store functions as the bulk API."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from core.events import CustomerBulkLine, EventRecord, LineRejection
from core.records import csv_records, json_records, parse_batch
from core.tables import utcnow

EVENT_COLUMNS = {"event_id", "customer_id", "name", "occurred_at"}
CUSTOMER_COLUMNS = {"customer_id", "email", "phone", "attributes"}


@dataclass
class ImportSummary:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[LineRejection] = field(default_factory=list)


def _ndjson_chunks(path: Path, size: int) -> Iterator[tuple[list[tuple[int, Any]], int]]:
    """Batches of (line number, decoded record) and the bytes read so far."""
    with path.open("rb") as handle:
        batch: list[tuple[int, Any]] = []
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                batch.extend((number, value) for _, value in json_records(raw))
            if len(batch) >= size:
                yield batch, handle.tell()
                batch = []
        if batch:
            yield batch, handle.tell()


def _csv_chunks(
    path: Path, size: int, known: set[str]
) -> Iterator[tuple[list[tuple[int, Any]], int]]:
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        batch: list[tuple[int, Any]] = []
        for number, record in csv_records(handle, known):
            batch.append((number, record))
            if len(batch) >= size:
                yield batch, handle.buffer.tell()
                batch = []
        if batch:
            yield batch, path.stat().st_size


def import_records(
    engine: Engine,
    *,
    path: Path,
    kind: str,
    batch_size: int,
    realtime: bool = True,
    on_progress: Callable[[int], None] = lambda _done: None,
) -> ImportSummary:
    """Import `events` or `customers` from NDJSON or CSV, one transaction per batch."""
    from store.customers import upsert_customers
    from store.events import KnownCustomers, write_event_batch

    model = EventRecord if kind == "events" else CustomerBulkLine
    columns = EVENT_COLUMNS if kind == "events" else CUSTOMER_COLUMNS
    chunks = (
        _csv_chunks(path, batch_size, columns)
        if path.suffix.lower() == ".csv"
        else _ndjson_chunks(path, batch_size)
    )
    summary = ImportSummary()
    known = KnownCustomers()
    for records, done in chunks:
        batch = parse_batch(records, model)
        summary.rejected.extend(batch.rejected)
        if batch.records and kind == "events":
            stored = write_event_batch(engine, events=batch.records, realtime=realtime, known=known)
            summary.duplicates += len(batch.records) - stored
            summary.accepted += stored
        elif batch.records:
            with engine.begin() as conn:
                summary.accepted += upsert_customers(conn, lines=batch.records, now=utcnow())
        on_progress(done)
    return summary
