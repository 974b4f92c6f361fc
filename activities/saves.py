"""Waiting for the save that started a run: the API starts an evaluation or a first pass
inside the transaction that saves the segment or model, so the run can begin before that
transaction has committed."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy.engine import Connection, Engine
from temporalio.exceptions import ApplicationError

SAVE_WAIT_SECONDS = 10.0


def wait_for_save(
    engine: Engine,
    *,
    read_version: Callable[[Connection], int | None],
    version: int,
    what: str,
    seconds: float = SAVE_WAIT_SECONDS,
) -> None:
    """Return once the stored version (`read_version`, None when absent) is `version` or
    newer. Past `seconds`, a retryable error: Temporal tries again with backoff, and a
    save that rolled back leaves the run to fail when its retries end."""
    deadline = time.monotonic() + seconds
    while True:
        with engine.connect() as conn:
            seen = read_version(conn)
        if seen is not None and seen >= version:
            return
        if time.monotonic() > deadline:
            raise ApplicationError(f"{what} version {version} is not committed yet")
        time.sleep(0.02)
