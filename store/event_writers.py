"""Single events as the API writes them: group commit by one writer thread per process.

Each request queues its event and waits; the writer stores whatever is waiting in one
statement (PostgreSQL) or one transaction (SQLite) and answers every request once that
commit is done. Under load this turns hundreds of one-row transactions a second into a
few multi-row ones: on PostgreSQL one commit (and WAL flush) per group instead of per
event, on SQLite one trip through its single-writer lock. A request still gets its 201
only after its row is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from core.events import EventIn
from core.tables import utcnow
from store.events import insert_event_group

log = logging.getLogger("journeys.events")

GROUP_COMMIT_MAX = 500


@dataclass
class _Pending:
    event: EventIn
    loop: asyncio.AbstractEventLoop
    answer: asyncio.Future[bool]


class EventWriter:
    """`await write(event)` -> True when stored, False for a repeat of a stored `event_id`."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def open(self) -> None:
        self._thread = threading.Thread(target=self._run, name="event-writer", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def write(self, event: EventIn) -> bool:
        if self._thread is None:
            raise RuntimeError("the event writer is not open (the app's lifespan did not run)")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bool] = loop.create_future()
        self._queue.put(_Pending(event, loop, answer))
        return await answer

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            try:
                self._commit(group)
            except Exception as exc:
                # A dead writer would leave every later request waiting for ever.
                log.exception("the event writer failed a group of %d", len(group))
                _answer(group, [exc] * len(group))

    def _next_group(self) -> list[_Pending] | None:
        first = self._queue.get()
        if first is None:
            return None
        group = [first]
        while len(group) < GROUP_COMMIT_MAX:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop once this group is answered
                break
            group.append(item)
        return group

    def _commit(self, group: list[_Pending]) -> None:
        try:
            with self._engine.begin() as conn:
                outcomes: list[bool | BaseException] = list(
                    insert_event_group(conn, events=[p.event for p in group], now=utcnow())
                )
        except Exception as exc:
            if len(group) > 1:
                # One bad event (or a deadlock victim) must not fail its neighbours.
                for pending in group:
                    self._commit([pending])
                return
            log.exception("storing event %s failed", group[0].event.event_id)
            outcomes = [exc]
        _answer(group, outcomes)


def _answer(group: list[_Pending], outcomes: list[bool | BaseException]) -> None:
    """Settle the waiting requests: one wake-up per event loop, not one per event."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[bool], object]]]
    by_loop = defaultdict(list)
    for pending, outcome in zip(group, outcomes, strict=True):
        by_loop[pending.loop].append((pending.answer, outcome))
    for loop, answers in by_loop.items():
        # RuntimeError: that event loop has closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, answers)


def _settle(answers: list[tuple[asyncio.Future[bool], object]]) -> None:
    for answer, outcome in answers:
        if answer.done():  # the request went away meanwhile
            continue
        if isinstance(outcome, BaseException):
            answer.set_exception(outcome)
        else:
            answer.set_result(bool(outcome))
