"""Events as the API writes them: group commit by one writer thread per process.

Single events: each request queues its event and waits; the writer stores whatever is
waiting in one statement (PostgreSQL) or one transaction (SQLite) and answers every
request once that commit is done. Under load this turns hundreds of one-row transactions
a second into a few multi-row ones: on PostgreSQL one commit (and WAL flush) per group
instead of per event, on SQLite one trip through its single-writer lock.

Bulk batches on SQLite: the batches waiting for the write lock go in one transaction, a
statement each. A batch of 20,000 events sorted by customer touches most leaf pages of
the customer index, and SQLite writes every page a transaction touched to its WAL (and
later into the database): two batches in one transaction write those pages once
(measured: 7 instead of 14 us of system time an event). PostgreSQL logs rows, not pages,
and writes concurrent batches in parallel, so its batches go straight to the store.

Either way a request gets its answer only after its rows are committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Connection, Engine

from core.db import sqlite_busy_timeout, take_sqlite_write_lock
from core.events import EventIn, EventRecord
from core.tables import utcnow
from store.events import (
    EventBatch,
    KnownCustomers,
    insert_event_batches,
    insert_event_group,
    write_event_batch,
)

log = logging.getLogger("journeys.events")

GROUP_COMMIT_MAX = 500
# A SQLite bulk group stops growing at this many events (two batches of 20,000): the
# process parses its next batches while this group is written. A group of every waiting
# batch left the writer idle while their successors were parsed (measured with four
# batches in flight on one process: 42,000 events/s against 48,000 at this limit).
BULK_GROUP_MAX_EVENTS = 40_000

# The SQLite bulk writer's page cache (the customer index of a few million events) and
# how many events it stores between two checkpoints.
BULK_CACHE_KIB = 256 * 1024
BULK_CHECKPOINT_EVENTS = 200_000
CHECKPOINT_WAIT_MS = 1_000

Item = TypeVar("Item")


@dataclass
class _Pending(Generic[Item]):
    item: Item
    loop: asyncio.AbstractEventLoop
    answer: asyncio.Future[Any]


class _GroupWriter(Generic[Item]):
    """A writer thread that commits whatever has queued up as one group."""

    name = "writer"

    def __init__(self, engine: Engine):
        self._engine = engine
        self._queue: queue.SimpleQueue[_Pending[Item] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def open(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def _submit(self, item: Item) -> Any:
        if self._thread is None:
            raise RuntimeError(f"the {self.name} is not open (the app's lifespan did not run)")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Pending(item, loop, answer))
        return await answer

    def _size(self, item: Item) -> int:
        return 1

    def _group_limit(self) -> int:
        return GROUP_COMMIT_MAX

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            group = [first]
            try:
                self._process(group)
            except Exception as exc:
                # A dead writer would leave every later request waiting for ever.
                log.exception("the %s failed a group of %d", self.name, len(group))
                _answer(group, [exc] * len(group))

    def _process(self, group: list[_Pending[Item]]) -> None:
        self._drain(group)
        self._commit_or_split(group)

    def _drain(self, group: list[_Pending[Item]]) -> None:
        """Add what else is waiting to `group`, up to the group limit."""
        size = sum(self._size(p.item) for p in group)
        while size < self._group_limit():
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop once this group is answered
                break
            group.append(item)
            size += self._size(item.item)

    def _commit_or_split(self, group: list[_Pending[Item]]) -> None:
        try:
            outcomes: list[Any] = self._commit([p.item for p in group])
        except Exception as exc:
            if len(group) > 1:
                # One bad item (or a deadlock victim) must not fail its neighbours.
                for pending in group:
                    self._commit_or_split([pending])
                return
            log.exception("the %s failed to store one item", self.name)
            outcomes = [exc]
        _answer(group, outcomes)

    def _commit(self, items: list[Item]) -> list[Any]:
        raise NotImplementedError


class EventWriter(_GroupWriter[EventIn]):
    """`await write(event)` -> True when stored, False for a repeat of a stored `event_id`."""

    name = "event writer"

    async def write(self, event: EventIn) -> bool:
        return bool(await self._submit(event))

    def _commit(self, items: list[EventIn]) -> list[Any]:
        with self._engine.begin() as conn:
            return list(insert_event_group(conn, events=items, now=utcnow()))


class BulkWriter(_GroupWriter[EventBatch]):
    """`await write(events, realtime=...)` -> how many events of the batch were new."""

    name = "bulk writer"

    def __init__(self, engine: Engine, known: KnownCustomers):
        super().__init__(engine)
        self._known = known
        self._connection: Connection | None = None
        self._since_checkpoint = 0

    async def close(self) -> None:
        await super().close()
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        if self._connection is None:
            self._connection = self._engine.connect()
            # One connection for the writer's life, with a larger page cache: the indexes'
            # pages stay cached from one group to the next, where a pooled connection came
            # cold. It checkpoints by itself (below), not at every 4 MB of WAL.
            self._connection.exec_driver_sql(f"PRAGMA cache_size=-{BULK_CACHE_KIB}")
            self._connection.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
            self._connection.commit()
        with self._connection.begin():
            yield self._connection

    def _checkpoint_now_and_then(self, events: int) -> None:
        """Checkpoint after every BULK_CHECKPOINT_EVENTS events stored.

        Each group rewrites most leaf pages of the customer index, and a checkpoint
        copies a page into the database once however many groups changed it (measured
        with four 20,000-event batches in flight: 50,000 -> 60,000 events/s). RESTART
        waits for the other writers and readers, so the next transaction starts the WAL
        afresh: checkpoints that ran beside other processes' writes never got to, and
        the WAL grew past 2 GB.
        """
        self._since_checkpoint += events
        if self._since_checkpoint < BULK_CHECKPOINT_EVENTS or self._connection is None:
            return
        self._since_checkpoint = 0
        raw = self._connection.connection.dbapi_connection
        # RESTART holds new writers back while it waits for readers: a long report must
        # not stall ingest for the whole busy timeout. Past a second it gives up; the
        # next checkpoint tries again.
        with sqlite_busy_timeout(raw, CHECKPOINT_WAIT_MS):  # type: ignore[arg-type]
            raw.execute("PRAGMA wal_checkpoint(RESTART)")  # type: ignore[union-attr]

    async def write(self, events: Sequence[EventRecord], *, realtime: bool) -> int:
        if not events:
            return 0
        if self._engine.dialect.name == "postgresql":
            return await run_in_threadpool(
                write_event_batch, self._engine, events=events, realtime=realtime, known=self._known
            )
        return int(await self._submit(EventBatch(events, realtime)))

    def _size(self, item: EventBatch) -> int:
        return len(item.events)

    def _group_limit(self) -> int:
        return BULK_GROUP_MAX_EVENTS

    def _process(self, group: list[_Pending[EventBatch]]) -> None:
        try:
            outcomes = self._commit_with_latecomers(group)
        except Exception:
            # One bad batch must not fail its neighbours: each again on its own.
            log.warning("a bulk group of %d failed; each batch is tried alone", len(group))
            for pending in group:
                self._commit_or_split([pending])
        else:
            _answer(group, outcomes)
        # After the answers: a checkpoint is the store's upkeep, not the requests' work.
        try:
            self._checkpoint_now_and_then(sum(len(p.item.events) for p in group))
        except sqlite3.Error:
            log.warning("a checkpoint after bulk writes failed; the next one tries again")

    def _commit_with_latecomers(self, group: list[_Pending[EventBatch]]) -> list[Any]:
        with self._transaction() as conn:
            # The group closes only once the write lock is ours: the batches that arrived
            # while another process held it join this transaction.
            take_sqlite_write_lock(conn.connection.dbapi_connection)  # type: ignore[arg-type]
            self._drain(group)
            stored, customers = insert_event_batches(
                conn, batches=[p.item for p in group], known=self._known, now=utcnow()
            )
        self._known.remember(customers)
        return stored

    def _commit(self, items: list[EventBatch]) -> list[Any]:
        with self._transaction() as conn:
            stored, customers = insert_event_batches(
                conn, batches=items, known=self._known, now=utcnow()
            )
        self._known.remember(customers)
        return stored


def _answer(group: list[_Pending[Any]], outcomes: list[Any]) -> None:
    """Settle the waiting requests: one wake-up per event loop, not one per item."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], object]]]
    by_loop = defaultdict(list)
    for pending, outcome in zip(group, outcomes, strict=True):
        by_loop[pending.loop].append((pending.answer, outcome))
    for loop, answers in by_loop.items():
        # RuntimeError: that event loop has closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, answers)


def _settle(answers: list[tuple[asyncio.Future[Any], object]]) -> None:
    for answer, outcome in answers:
        if answer.done():  # the request went away meanwhile
            continue
        if isinstance(outcome, BaseException):
            answer.set_exception(outcome)
        else:
            answer.set_result(outcome)
