"""One write discipline for a process's background writes on SQLite: group commit.

SQLite has one write lock per database. Sends, run bookkeeping and the dispatcher's
settling each took it on their own, from as many threads as the worker runs activities,
and each waited by asking again every millisecond: under load the sends alone waited
tens of milliseconds a transaction, and the threads' asking cost CPU. Here one writer
thread per engine takes the lock once for whatever jobs have queued meanwhile and runs
each in a savepoint of that one transaction: a job that fails rolls back its own
savepoint only, and every caller gets its answer once the transaction is committed.

PostgreSQL runs concurrent transactions side by side, so there a job runs at once in a
transaction of its own, in the caller's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("journeys.writer")

T = TypeVar("T")
Job = Callable[[Connection], T]

# A transaction takes no more jobs after this many, or after this long (a send job
# renders its template): the lock is let go now and then for the other processes.
GROUP_MAX = 200
GROUP_SECONDS = 0.05


@dataclass
class _Pending(Generic[T]):
    job: Job[T]
    done: Future[T]


class GroupWriter:
    """`run(job)`: `job(connection)` inside a transaction, committed before it returns."""

    def __init__(self, engine: Engine, *, name: str = "group writer") -> None:
        self.engine = engine
        self.name = name
        self._grouped = engine.dialect.name == "sqlite"
        self._queue: queue.SimpleQueue[_Pending[Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Jobs a full transaction left for the next one (the writer thread's own).
        self._carried: deque[_Pending[Any]] = deque()

    def run(self, job: Job[T]) -> T:
        """Run `job` in a committed transaction (its result, or its exception)."""
        return self.submit(job).result()

    def submit(self, job: Job[T]) -> Future[T]:
        done: Future[T] = Future()
        if not self._grouped:
            try:
                done.set_result(self._alone(job))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)
            return done
        self._queue.put(_Pending(job, done))
        self._start()
        return done

    def _alone(self, job: Job[T]) -> T:
        with self.engine.begin() as conn:
            return job(conn)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            group = list(self._carried) or [self._queue.get()]
            self._carried.clear()
            while len(group) < GROUP_MAX:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._commit(group)
            except Exception as exc:  # noqa: BLE001 - a dead writer would hang every caller
                log.exception("the %s failed a group of %d", self.name, len(group))
                # Nothing of the group was committed: every job of it fails, carried or not.
                self._carried.clear()
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_exception(exc)

    def _commit(self, group: list[_Pending[Any]]) -> None:
        done: list[tuple[_Pending[Any], bool, Any]] = []
        with self.engine.begin() as conn:
            began = time.monotonic()
            for index, pending in enumerate(group):
                if done and time.monotonic() - began > GROUP_SECONDS:
                    self._carried.extend(group[index:])
                    break
                try:
                    with conn.begin_nested():
                        done.append((pending, True, pending.job(conn)))
                except Exception as exc:  # noqa: BLE001 - this job's own failure
                    done.append((pending, False, exc))
        # Answered only now: a caller must never act on a write that is not committed.
        for pending, ok, value in done:
            if ok:
                pending.done.set_result(value)
            else:
                pending.done.set_exception(value)


_writers: dict[int, GroupWriter] = {}
_writers_lock = threading.Lock()


def group_writer(engine: Engine) -> GroupWriter:
    """The one writer of this engine in this process."""
    with _writers_lock:
        writer = _writers.get(id(engine))
        if writer is None or writer.engine is not engine:
            writer = _writers[id(engine)] = GroupWriter(engine)
        return writer
