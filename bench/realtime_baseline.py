"""The bare pipeline `bench/realtime.py` compares the product with: signal-with-start of a
workflow that runs one activity writing one SQLite row, on a worker with the product's
tuning (`worker.build_worker`). Run as its own process (`python -m bench.realtime_baseline
ADDRESS TASK_QUEUE DB_PATH READY_FILE`) so its CPU is counted apart from the bench's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from temporalio import activity, workflow
from temporalio.common import RetryPolicy

# Passed through: a sandboxed workflow module re-imports what it does not pass through for
# every run (SQLAlchemy would cost seconds and gigabytes).
with workflow.unsafe.imports_passed_through():
    from sqlalchemy import text

    from workflows.journey import JourneyWorkflow

BARE_WORKFLOW = "BareEntryWorkflow"
BARE_ACTIVITY = "bare_write_row"
BARE_SIGNAL = "bare_entry"
BARE_TABLE = (
    "CREATE TABLE IF NOT EXISTS bare_rows (id INTEGER PRIMARY KEY, customer_id TEXT UNIQUE"
    " NOT NULL, requested_at REAL NOT NULL, written_at REAL NOT NULL)"
)


@dataclass
class BareEntry:
    customer_id: str
    # The bench's wall clock when it asked for the start (seconds since the epoch).
    requested_at: float


# The same runner as JourneyWorkflow's (sandboxed or not): the ceiling carries no cost the
# product has shed, and none it still pays.
_SANDBOXED = workflow._Definition.must_from_class(JourneyWorkflow).sandboxed


@workflow.defn(name=BARE_WORKFLOW, sandboxed=_SANDBOXED)
class BareEntryWorkflow:
    @workflow.signal(name=BARE_SIGNAL)
    def entry(self, entry: BareEntry) -> None:
        return

    @workflow.run
    async def run(self, entry: BareEntry) -> None:
        await workflow.execute_activity(
            BARE_ACTIVITY,
            entry,
            start_to_close_timeout=timedelta(minutes=2),
            retry_policy=RetryPolicy(maximum_attempts=100),
        )


def bare_activity(engine):  # noqa: ANN001, ANN201
    @activity.defn(name=BARE_ACTIVITY)
    def bare_write_row(entry: BareEntry) -> None:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO bare_rows (customer_id, requested_at, written_at)"
                    " VALUES (:c, :r, :w) ON CONFLICT (customer_id) DO NOTHING"
                ),
                {"c": entry.customer_id, "r": entry.requested_at, "w": time.time()},
            )

    return bare_write_row


async def serve(address: str, task_queue: str, db_path: str, ready_file: str) -> None:
    from core.db import make_engine
    from core.settings import Settings
    from worker import build_worker, connect_with_retry

    settings = Settings(temporal_address=address, task_queue=task_queue)
    engine = make_engine(f"sqlite:///{db_path}")
    with engine.begin() as conn:
        conn.execute(text(BARE_TABLE))
    client = await connect_with_retry(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    worker = build_worker(
        client,
        settings,
        engine,
        workflows=[BareEntryWorkflow],
        activities=[bare_activity(engine)],
    )
    async with worker:
        Path(ready_file).write_text(str(os.getpid()))
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(*sys.argv[1:5]))
    sys.stdout.flush()
    # temporalio's threads can crash interpreter finalisation (docs/architecture.md).
    os._exit(0)
