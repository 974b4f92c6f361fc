"""Aggregates the console computes off the request path and keeps for a little while.

Counting a million memberships or a hundred thousand runs takes longer than a page may
(200 ms), and the numbers are the same a few seconds later. So a page asks this cache:
a fresh value is served at once; a stale one is served at once while one background
thread computes the next; a missing one is waited for a short while (`wait_seconds`),
and if it is not ready the page shows "counting..." and htmx asks again a second later.
Every value says when it was computed, and the page says so. A value is kept `max_age`
seconds, or ten times as long as it took to compute if that is longer. At most two computations
run at a time per process, each on its own connection, and one key is computed once
however many pages ask for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Connection, Engine

T = TypeVar("T")
MAX_ENTRIES = 2_000


@dataclass(frozen=True)
class Cached(Generic[T]):
    value: T
    computed_at: datetime
    seconds: float
    """how long the computation took"""

    @property
    def age_seconds(self) -> float:
        return max((datetime.now(UTC) - self.computed_at).total_seconds(), 0.0)


@dataclass
class _Entry:
    cached: Cached[Any] | None = None
    error: BaseException | None = None
    failed_at: float = 0.0
    running: Future[Any] | None = None


class Aggregates:
    def __init__(self, engine: Engine, *, wait_seconds: float = 0.15, workers: int = 2):
        self.engine = engine
        self.wait_seconds = wait_seconds
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="console-agg")
        self._entries: dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()

    def get(
        self, key: Hashable, compute: Callable[[Connection], T], *, max_age: float
    ) -> Cached[T] | None:
        """The value of `key`: fresh, or stale while it is recomputed, or waited for up
        to `wait_seconds`; None while it is still being computed. A computation that
        failed raises its error (for `max_age` seconds, then it is tried again)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                if len(self._entries) >= MAX_ENTRIES:
                    self._entries.clear()
                entry = self._entries[key] = _Entry()
            cached = entry.cached
            # A computation that takes T seconds runs again at most every 10 T: a 15 s
            # campaign analysis watched all day costs a tenth of a core, not half of one.
            fresh = cached is not None and cached.age_seconds < max(max_age, 10 * cached.seconds)
            if entry.error is not None and time.monotonic() - entry.failed_at < max_age:
                raise entry.error
            if not fresh and entry.running is None:
                entry.running = self._pool.submit(self._compute, key, entry, compute)
            running = entry.running
        if cached is not None or running is None:
            return cached
        try:
            running.result(timeout=self.wait_seconds)
        except FutureTimeout:
            return None
        with self._lock:
            if entry.error is not None:
                raise entry.error
            return entry.cached

    def _compute(self, key: Hashable, entry: _Entry, compute: Callable[[Connection], T]) -> None:
        started = time.perf_counter()
        try:
            with self.engine.connect() as conn:
                value = compute(conn)
        except BaseException as exc:  # noqa: BLE001 - shown on the page, tried again later
            with self._lock:
                entry.error, entry.failed_at, entry.running = exc, time.monotonic(), None
            return
        with self._lock:
            entry.cached = Cached(
                value=value,
                computed_at=datetime.now(UTC),
                seconds=time.perf_counter() - started,
            )
            entry.error, entry.running = None, None

    def forget(self, prefix: str) -> None:
        """Drop every value whose key starts with `prefix` (after a change the page made)."""
        with self._lock:
            for key in [k for k in self._entries if isinstance(k, tuple) and k[:1] == (prefix,)]:
                self._entries.pop(key, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
