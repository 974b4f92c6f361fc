"""Heartbeats for a blocking activity: a thread tells Temporal the attempt is alive while
the activity's own thread waits on the database or a provider. When the worker process
dies the heartbeats stop, and Temporal retries the attempt once the activity's heartbeat
timeout has passed instead of waiting out its whole start-to-close timeout."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from temporalio import activity

log = logging.getLogger("journeys.heartbeats")

# Beats per heartbeat timeout: a beat delayed by a busy worker still lands in time.
BEATS_PER_TIMEOUT = 4


@contextmanager
def heartbeating() -> Iterator[None]:
    """Heartbeat every quarter of the activity's heartbeat timeout until the block ends
    (nothing outside an activity, or when the caller asked for no heartbeat timeout)."""
    timeout = activity.info().heartbeat_timeout if activity.in_activity() else None
    if timeout is None:
        yield
        return
    every = timeout.total_seconds() / BEATS_PER_TIMEOUT
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            try:
                activity.heartbeat()
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                log.warning("a heartbeat could not be sent", exc_info=True)

    # The activity's context (which attempt to heartbeat) lives in a context variable.
    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(beat,), name="heartbeat", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Temporal's cancellation of this (thread pool) activity until the block ends,
    then raise it: a send must record what the provider answered, whatever happens to its
    attempt meanwhile."""
    if not activity.in_activity():
        yield
        return
    with activity.shield_thread_cancel_exception():
        yield
