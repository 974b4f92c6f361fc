"""Database engine and sessions; SQLite by default, PostgreSQL (psycopg 3) by URL."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from core.settings import get_settings


def normalise_url(url: str) -> str:
    """Accept `postgresql://` and `postgres://` and use the psycopg 3 driver for them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


SQLITE_WAL_KEEP_BYTES = 64 * 1024 * 1024


def sqlite_busy_timeout_ms() -> int:
    """How long SQLite waits for another process's lock (`JOURNEYS_SQLITE_BUSY_TIMEOUT_MS`)."""
    return get_settings().sqlite_busy_timeout_ms


def _tune_sqlite(dbapi_connection, _record) -> None:  # noqa: ANN001
    cursor = dbapi_connection.cursor()
    # busy_timeout makes writers queue instead of failing with "database is locked" when
    # the API and worker overlap; WAL lets readers run beside the single writer.
    cursor.execute(f"PRAGMA busy_timeout={sqlite_busy_timeout_ms()}")
    _use_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA cache_size=-65536")
    # The bulk writer lets the WAL grow to hundreds of MB between checkpoints: once
    # checkpointed, the file shrinks back to this.
    cursor.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_KEEP_BYTES}")
    cursor.close()


def _use_wal(cursor) -> None:  # noqa: ANN001
    # WAL is a property of the file: only its first opener switches it, and the switch
    # answers "locked" at once (no busy wait) while other processes open a new file.
    for _ in range(100):
        if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            time.sleep(0.05)
    cursor.execute("PRAGMA journal_mode=WAL")


def take_sqlite_write_lock(dbapi_connection: sqlite3.Connection) -> None:
    """Open the transaction with the write lock (BEGIN IMMEDIATE), asking every millisecond.

    SQLite's own busy handler sleeps ever longer (up to 100 ms a try) while another
    process writes, so under steady ingest from several API processes the lock sat idle
    between their transactions; hot write paths take it this way instead.
    """
    if dbapi_connection.in_transaction:
        return
    deadline = time.monotonic() + sqlite_busy_timeout_ms() / 1000
    with sqlite_busy_timeout(dbapi_connection, 0):
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.001)


@contextmanager
def sqlite_busy_timeout(dbapi_connection: sqlite3.Connection, milliseconds: int) -> Iterator[None]:
    """Another busy timeout for the statements inside the block, then the usual one."""
    dbapi_connection.execute(f"PRAGMA busy_timeout={milliseconds}")
    try:
        yield
    finally:
        dbapi_connection.execute(f"PRAGMA busy_timeout={sqlite_busy_timeout_ms()}")


def make_engine(url: str) -> Engine:
    """An engine for `url`, with SQLite tuned for one writer and many readers."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": sqlite_busy_timeout_ms() / 1000},
        )
        event.listen(engine, "connect", _tune_sqlite)
        return engine
    # pool_recycle instead of pre-ping: a ping is one more round trip on every checkout.
    return create_engine(url, pool_size=20, max_overflow=20, pool_recycle=900)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """One transaction: commit at the end, roll back on error."""
    with Session(engine or get_engine(), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
