"""Journey run bookkeeping and customer look-ups for journey steps.

`record_run_progress` and `evaluate_branch` run as local activities: they touch only our
own database, are idempotent, and take milliseconds, so they ride in the workflow task
instead of costing a round trip through the Temporal server (docs/architecture.md: "a
step costs at most one activity").
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from sqlalchemy.engine import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.runs import (
    EVALUATE_BRANCH_ACTIVITY,
    RECORD_RUN_PROGRESS_ACTIVITY,
    UPDATE_ATTRIBUTE_ACTIVITY,
    EvaluateBranchInput,
    EvaluateBranchResult,
    RecordRunProgressInput,
    UpdateAttributeInput,
)
from core.tables import utcnow
from store import customers as customer_store
from store import runs as run_store
from store import segments as segment_store
from store.writer import group_writer


class ProgressWriter:
    """Group commit for run bookkeeping: one writer thread commits whatever the runs
    handed in meanwhile in one transaction, and each caller returns once its part is
    committed. Thousands of runs writing at once then queue here instead of fighting
    over the database's write lock."""

    def __init__(self, engine: Engine, *, max_batch: int = 500) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[RecordRunProgressInput, Future[None]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def write(self, progress: RecordRunProgressInput) -> None:
        """Record `progress`; returns when it is committed, raises if it could not be."""
        done: Future[None] = Future()
        self._queue.put((progress, done))
        self._start()
        done.result()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="run-progress-writer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit(batch)

    def _commit(self, batch: list[tuple[RecordRunProgressInput, Future[None]]]) -> None:
        items = [(p.run, p.lines, p.position) for p, _ in batch]
        try:
            # With the process's other writes (store/writer.py): one lock, one commit.
            group_writer(self.engine).run(
                lambda conn: run_store.record_progress_many(conn, items=items)
            )
        except Exception:  # noqa: BLE001
            if len(batch) > 1:
                # One bad item must not fail the others: each on its own.
                for item in batch:
                    self._commit([item])
                return
            batch[0][1].set_exception(sys.exc_info()[1] or RuntimeError("write failed"))
            return
        for _, done in batch:
            done.set_result(None)


class RunActivities:
    """The run activities, bound to one store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.writer = ProgressWriter(engine)

    @activity.defn(name=RECORD_RUN_PROGRESS_ACTIVITY)
    def record_run_progress(self, progress: RecordRunProgressInput) -> None:
        """Append the run's new timeline lines and move its row, in one transaction."""
        self.writer.write(progress)

    @activity.defn(name=EVALUATE_BRANCH_ACTIVITY)
    def evaluate_branch(self, request: EvaluateBranchInput) -> EvaluateBranchResult:
        """The index of the first condition the customer meets now, or None (default)."""
        with self.engine.connect() as conn:
            for index, condition in enumerate(request.conditions):
                if segment_store.customer_matches(
                    conn, customer_id=request.customer_id, condition=condition, now=request.now
                ):
                    return EvaluateBranchResult(matched=index)
        return EvaluateBranchResult(matched=None)

    @activity.defn(name=UPDATE_ATTRIBUTE_ACTIVITY)
    def update_customer_attribute(self, request: UpdateAttributeInput) -> None:
        """Set one attribute on the customer's profile (a null value removes it)."""
        with self.engine.begin() as conn:
            if customer_store.get_customer(conn, customer_id=request.customer_id) is None:
                raise ApplicationError(
                    f"customer {request.customer_id} does not exist",
                    type="CustomerNotFound",
                    non_retryable=True,
                )
            customer_store.patch_customer(
                conn,
                customer_id=request.customer_id,
                changes={"attributes": {request.attribute: request.value}},
                now=utcnow(),
            )

    def all(self) -> list[Callable[..., Any]]:
        return [self.record_run_progress, self.evaluate_branch, self.update_customer_attribute]
