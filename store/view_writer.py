"""Views of personalisation campaigns, written in batches off the request path.

A decision costs its request a `deque.append`; a writer thread wakes every
`flush_seconds` (or as soon as `max_batch` views wait), merges what waited into one row
per (campaign, version, customer, experience) and upserts them in one transaction
(`store.personalization.record_views`). A batch whose write fails is kept and tried again
with the next one; failing twice, it is dropped and the log says how many views were
lost. Closing the writer (the API's shutdown) writes what is left. A process that ends
without closing it (an unhandled error, `sys.exit`) logs at exit how many views it had
not stored; one killed outright (SIGKILL, out of memory) loses the views of at most its
last interval, which no log can tell.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from sqlalchemy.engine import Engine

from store.personalization import ViewRecord, record_views

log = logging.getLogger("journeys.personalization")

FLUSH_SECONDS = 0.5
MAX_BATCH = 5_000


def _store_views(engine: Engine, views: Sequence[ViewRecord]) -> int:
    with engine.begin() as conn:
        return record_views(conn, views=views)


class ViewWriter:
    """`record(view)` from any thread; a background thread stores them in batches."""

    def __init__(
        self,
        engine: Engine,
        *,
        flush_seconds: float = FLUSH_SECONDS,
        max_batch: int = MAX_BATCH,
        store: Callable[[Engine, Sequence[ViewRecord]], int] = _store_views,
    ):
        self._engine = engine
        self._flush_seconds = flush_seconds
        self._max_batch = max_batch
        self._store = store
        self._pending: deque[ViewRecord] = deque()
        self._retry: list[ViewRecord] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._flushed = threading.Condition()
        self._writing = False
        self.stored = 0
        """Views committed since the writer opened."""
        self.lost = 0
        """Views dropped after their batch failed twice."""

    def open(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="view writer", daemon=True)
        self._thread.start()
        atexit.register(self._log_unstored)

    def close(self) -> None:
        """Write what waits, then stop the thread."""
        if self._thread is None:
            return
        atexit.unregister(self._log_unstored)
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._thread = None
        if self.stored or self.lost:
            log.info("view writer closed: %d views stored, %d lost", self.stored, self.lost)

    def _log_unstored(self) -> None:
        """At interpreter exit, when the writer was never closed: what it still held."""
        waiting = sum(v.views for v in self._pending) + sum(v.views for v in self._retry)
        if waiting:
            log.error(
                "lost %d views of personalisation campaigns: the process ended before its"
                " view writer stored them",
                waiting,
            )

    def record(self, view: ViewRecord) -> None:
        self._pending.append(view)
        if len(self._pending) >= self._max_batch:
            self._wake.set()

    def record_many(self, views: Sequence[ViewRecord]) -> None:
        self._pending.extend(views)
        if len(self._pending) >= self._max_batch:
            self._wake.set()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything recorded before this call is stored (or lost)."""
        if not self._waiting():
            return
        with self._flushed:
            self._wake.set()
            deadline = time.monotonic() + timeout
            while self._waiting() and time.monotonic() < deadline:
                self._flushed.wait(0.05)
                self._wake.set()

    def _waiting(self) -> bool:
        """Views recorded and not yet stored (or lost), a batch being written included."""
        return bool(self._pending or self._retry or self._writing)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._flush_seconds)
            self._wake.clear()
            stopping = self._stopping
            while True:
                # Set before the views leave the queue: `flush` sees them at every moment.
                self._writing = True
                retried, fresh = self._take()
                if not retried and not fresh:
                    self._writing = False
                    break
                self._write(retried, fresh, final=stopping)
                self._writing = False
                if len(self._pending) < self._max_batch and not stopping:
                    break
            with self._flushed:
                self._flushed.notify_all()
            if stopping and not self._pending:
                return

    def _take(self) -> tuple[list[ViewRecord], list[ViewRecord]]:
        """(views whose write failed once, views waiting), at most `max_batch` of those."""
        retried, self._retry = self._retry, []
        fresh: list[ViewRecord] = []
        pending = self._pending
        while pending and len(fresh) < self._max_batch:
            fresh.append(pending.popleft())
        return retried, fresh

    def _write(self, retried: list[ViewRecord], fresh: list[ViewRecord], *, final: bool) -> None:
        try:
            self.stored += self._store(self._engine, retried + fresh)
        except Exception:
            dropped = retried + fresh if final else retried
            if dropped:
                views = sum(v.views for v in dropped)
                self.lost += views
                log.exception(
                    "lost %d views of personalisation campaigns: their write failed", views
                )
            if not final:
                log.warning(
                    "storing %d views failed; they are tried again with the next batch",
                    sum(v.views for v in fresh),
                )
                self._retry = fresh
