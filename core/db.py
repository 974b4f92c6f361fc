"""Database engine and sessions; SQLite by default, PostgreSQL (psycopg 3) by URL.

SQLite writes follow one rule, kept here in the engine so that no write path can forget
it: a transaction takes the write lock with `BEGIN IMMEDIATE`, asked for every
millisecond up to the busy timeout (`take_sqlite_write_lock`, as ingest does), right
before its first statement that writes: INSERT, UPDATE, DELETE, REPLACE, CREATE, DROP,
ALTER, SAVEPOINT, ANALYZE, or a WITH holding one of them (temporary tables count). The
statements before it only read; they run outside any transaction, one snapshot each (as
pysqlite always ran them), beside the writer (WAL). So no transaction ever holds a read
snapshot when it starts to write: SQLite cannot let such a transaction wait for the
lock and answers "database is locked" at once, busy timeout or not, whenever another
connection writes or has written since that read began.

What that asks of code: pysqlite emits no BEGIN of its own (`isolation_level = None`,
set on connect); a result is read to its end (or closed) before the transaction's first
write, because an open SELECT is an open read (the write would fail at once instead of
waiting); code that writes through the raw sqlite3 connection takes the lock itself
(store/events.py). PostgreSQL is left as it is.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
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
    # pysqlite's own BEGIN is deferred and comes only before INSERT/UPDATE/DELETE/REPLACE:
    # _lock_before_first_write begins every transaction instead (a SAVEPOINT nests in it).
    dbapi_connection.isolation_level = None
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


# --- lock figures (bench/realtime.py) ------------------------------------------------------

# Who is writing, for the lock figures: set by the real-time processor, the dispatcher and
# the send activity; threads of their own (the ingest writers, the run bookkeeping writer)
# are known by their names.
sqlite_writer_role: ContextVar[str | None] = ContextVar("sqlite_writer_role", default=None)
_THREAD_ROLES = {
    "event writer": "ingest",
    "bulk writer": "ingest",
    "run-progress-writer": "runs",
    "group writer": "worker (grouped)",
}


class _LockFigures:
    """Write-lock waits and holds per writer role, written as JSON to
    `JOURNEYS_SQLITE_LOCK_STATS/{pid}.json` every second when that names a directory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._figures: dict[str, dict[str, float]] = {}
        self._held: dict[int, tuple[str, float]] = {}
        self._writer: threading.Thread | None = None

    @staticmethod
    def folder() -> str:
        return get_settings().sqlite_lock_stats

    @staticmethod
    def role() -> str:
        role = sqlite_writer_role.get()
        if role is None:
            role = _THREAD_ROLES.get(threading.current_thread().name, "other")
        return role

    def took(self, connection: object, waited: float) -> None:
        role = self.role()
        with self._lock:
            figures = self._figures.setdefault(
                role, {"count": 0, "waited": 0.0, "max_wait": 0.0, "held": 0.0}
            )
            figures["count"] += 1
            figures["waited"] += waited
            figures["max_wait"] = max(figures["max_wait"], waited)
            self._held[id(connection)] = (role, time.monotonic())
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._dump_every_second, name="lock-figures", daemon=True
                )
                self._writer.start()

    def released(self, connection: object) -> None:
        with self._lock:
            held = self._held.pop(id(connection), None)
            if held is not None:
                self._figures[held[0]]["held"] += time.monotonic() - held[1]

    def _dump_every_second(self) -> None:
        path = os.path.join(self.folder(), f"{os.getpid()}.json")
        while True:
            time.sleep(1)
            with self._lock:
                text = json.dumps(self._figures)
            with open(path + ".tmp", "w") as out:
                out.write(text)
            os.replace(path + ".tmp", path)


_lock_figures = _LockFigures()


# SQLITE_BUSY_SNAPSHOT: this connection still reads an older snapshot (a SELECT whose
# rows were not all fetched); asking again cannot help until that read ends.
_SQLITE_BUSY_SNAPSHOT = 517


def take_sqlite_write_lock(dbapi_connection: sqlite3.Connection) -> None:
    """Open the transaction with the write lock (BEGIN IMMEDIATE), asking every millisecond.

    SQLite's own busy handler sleeps ever longer (up to 100 ms a try) while another
    process writes, so under steady ingest from several API processes the lock sat idle
    between their transactions; every writer takes it this way instead. A no-op when the
    connection is in a transaction already.
    """
    if dbapi_connection.in_transaction:
        return
    began = time.monotonic()
    deadline = began + sqlite_busy_timeout_ms() / 1000
    with sqlite_busy_timeout(dbapi_connection, 0):
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                if _lock_figures.folder():
                    _lock_figures.took(dbapi_connection, time.monotonic() - began)
                return
            except sqlite3.OperationalError as exc:
                if (
                    "locked" not in str(exc)
                    or getattr(exc, "sqlite_errorcode", None) == _SQLITE_BUSY_SNAPSHOT
                    or time.monotonic() > deadline
                ):
                    raise
                time.sleep(0.001)


_WRITE_HEADS = (
    "INSERT",
    "UPDATE",
    "DELETE",
    "REPLACE",
    "CREATE",
    "DROP",
    "ALTER",
    "SAVEPOINT",
    "ANALYZE",
)
_DML = re.compile(r"\b(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)


def sqlite_statement_writes(statement: str) -> bool:
    """Whether `statement` writes (and so must run under the write lock).

    SELECT, PRAGMA, EXPLAIN and transaction control do not; a WITH does when it holds a
    data-changing verb anywhere (a read that merely names one then takes the lock too,
    which costs time, never correctness).
    """
    head = statement.lstrip()[:9].upper()
    if head.startswith(_WRITE_HEADS):
        return True
    return head.startswith("WITH") and _DML.search(statement) is not None


def _lock_before_first_write(
    conn: Connection,
    cursor: sqlite3.Cursor,
    statement: str,
    _parameters: object,
    _context: object,
    _executemany: bool,
) -> None:
    raw = cursor.connection
    if raw.in_transaction or not sqlite_statement_writes(statement):
        return
    # AUTOCOMMIT asks for no transaction at all: nothing would ever commit it.
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return
    take_sqlite_write_lock(raw)


def _released(conn: Connection) -> None:
    _lock_figures.released(conn.connection.dbapi_connection)


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
        event.listen(engine, "before_cursor_execute", _lock_before_first_write)
        if _lock_figures.folder():
            for name in ("commit", "rollback"):
                event.listen(engine, name, _released)
        return engine
    # pool_recycle instead of pre-ping: a ping is one more round trip on every checkout.
    return create_engine(url, pool_size=20, max_overflow=20, pool_recycle=900)


def database_error_types() -> tuple[type[Exception], ...]:
    """The exceptions the store's drivers raise, wrapped by SQLAlchemy or not."""
    import psycopg
    from sqlalchemy.exc import SQLAlchemyError

    return (SQLAlchemyError, psycopg.Error, sqlite3.Error)


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached, dropped the connection or
    kept it locked (asking again later can succeed), rather than refused a statement."""
    import psycopg
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    # Pool exhausted; and errors of the drivers raised past SQLAlchemy (a raw COPY).
    return isinstance(
        exc,
        sa_exc.TimeoutError
        | psycopg.OperationalError
        | psycopg.InterfaceError
        | sqlite3.OperationalError,
    )


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
