"""The ceiling apps of bench/ingest.py: the least an HTTP ingest endpoint can do.

- `POST /bulk?realtime=`: NDJSON, each line decoded with orjson and nothing else checked,
  then one COPY (PostgreSQL) or one executemany (SQLite) into `bench_events`, in one
  transaction, in a server thread (as the product does).
- `POST /event`: one event validated by a small pydantic model, then one
  `INSERT ... ON CONFLICT (event_id) DO NOTHING` (201, or 200 for a repeat): async on a
  fixed set of psycopg connections (PostgreSQL), in a server thread (SQLite).
- `GET /row?customer_id=`: one customer row (email, phone, attributes) by primary key, as
  JSON, or 404: async on the fixed psycopg connections (PostgreSQL), in a server thread on
  a connection of its own (SQLite). The ceiling of bench/personalize.py's decisions.
- `GET /healthz`.

`bench_events` has the columns and indexes of the product's `events` table (ingest.py
creates it). The database comes from `BENCH_DATABASE_URL` (`postgresql://...` or
`sqlite:///path`). Served by uvicorn: `--app-dir REPO --factory bench.bare_app:create_app`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import AwareDatetime, BaseModel, Field

SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"
COPY_SQL = (
    "COPY bench_events (event_id, customer_id, name, occurred_at, properties, received_at,"
    " realtime_pending) FROM STDIN"
)
PG_INSERT = (
    "INSERT INTO bench_events (event_id, customer_id, name, occurred_at, properties,"
    " received_at, realtime_pending) VALUES (%s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (event_id) DO NOTHING"
)
SQLITE_INSERT = (
    "INSERT INTO bench_events (event_id, customer_id, name, occurred_at, properties,"
    " received_at, realtime_pending) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (event_id) DO NOTHING"
)


class BareEvent(BaseModel):
    event_id: str = Field(min_length=1, max_length=255)
    customer_id: str = Field(min_length=1, max_length=255)
    name: str = Field(min_length=1, max_length=255)
    occurred_at: AwareDatetime
    properties: dict[str, Any] = Field(default_factory=dict)


class Stored(BaseModel):
    event_id: str
    duplicate: bool


class BulkStored(BaseModel):
    accepted: int


def _sqlite_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime(SQLITE_TIME)


class ThreadConnections:
    """One database connection per server thread, opened on first use (no pool to wait on)."""

    def __init__(self, url: str):
        self.url = url
        self.sqlite = url.startswith("sqlite")
        self._local = threading.local()

    def get(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
        return conn

    def _open(self) -> Any:
        if not self.sqlite:
            return psycopg.connect(self.url, autocommit=True)
        conn = sqlite3.connect(
            self.url.split("///", 1)[1], isolation_level=None, check_same_thread=False, timeout=30
        )
        # The product's settings (core/db.py), so the two write under the same rules.
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "busy_timeout=30000",
            "cache_size=-65536",
        ):
            conn.execute(f"PRAGMA {pragma}")
        return conn


class AsyncConnections:
    """A fixed set of async PostgreSQL connections handed out in turn (psycopg_pool is not
    installed; this is all the single-event handler needs)."""

    def __init__(self, url: str, size: int):
        self.url = url
        self.size = size
        self._idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        while not self._idle.empty():
            await self._idle.get_nowait().close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn = await self._idle.get()
        try:
            yield conn
        finally:
            self._idle.put_nowait(conn)


def _store_bulk(connections: ThreadConnections, body: bytes, realtime: bool) -> int:
    now = datetime.now(UTC)
    lines = [orjson.loads(raw) for raw in body.splitlines() if raw.strip()]
    conn = connections.get()
    if connections.sqlite:
        stamp = _sqlite_time(now)
        rows = [
            (
                e["event_id"],
                e["customer_id"],
                e["name"],
                _sqlite_time(datetime.fromisoformat(e["occurred_at"])),
                orjson.dumps(e.get("properties", {})).decode(),
                stamp,
                int(realtime),
            )
            for e in lines
        ]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(SQLITE_INSERT, rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return len(rows)
    with conn.transaction(), conn.cursor() as cursor, cursor.copy(COPY_SQL) as copy:
        for e in lines:
            copy.write_row(
                (
                    e["event_id"],
                    e["customer_id"],
                    e["name"],
                    e["occurred_at"],
                    orjson.dumps(e.get("properties", {})).decode(),
                    now,
                    realtime,
                )
            )
    return len(lines)


def create_app() -> FastAPI:
    url = os.environ["BENCH_DATABASE_URL"]
    connections = ThreadConnections(url)
    pool = None if connections.sqlite else AsyncConnections(url, size=10)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if pool:
            await pool.open()
        yield
        if pool:
            await pool.close()

    app = FastAPI(title="bench ceiling", lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if pool is not None:

        @app.get("/row")
        async def row_postgres(customer_id: str) -> Response:
            async with pool.connection() as conn:
                cursor = await conn.execute(ROW_SQL.replace("?", "%s"), (customer_id,))
                found = await cursor.fetchone()
            return _row_answer(found)

    else:

        @app.get("/row")
        def row_sqlite(customer_id: str) -> Response:
            found = connections.get().execute(ROW_SQL, (customer_id,)).fetchone()
            return _row_answer(found)

    @app.post("/bulk", response_model=BulkStored)
    async def bulk(request: Request, realtime: bool = True) -> BulkStored:
        body = await request.body()
        accepted = await run_in_threadpool(_store_bulk, connections, body, realtime)
        return BulkStored(accepted=accepted)

    if pool is not None:

        @app.post("/event", response_model=Stored, status_code=201)
        async def event_postgres(payload: BareEvent, response: Response) -> Stored:
            async with pool.connection() as conn:
                cursor = await conn.execute(
                    PG_INSERT,
                    (
                        payload.event_id,
                        payload.customer_id,
                        payload.name,
                        payload.occurred_at,
                        orjson.dumps(payload.properties).decode(),
                        datetime.now(UTC),
                        True,
                    ),
                )
            return _answer(payload, cursor.rowcount == 1, response)

    else:

        @app.post("/event", response_model=Stored, status_code=201)
        def event_sqlite(payload: BareEvent, response: Response) -> Stored:
            cursor = connections.get().execute(
                SQLITE_INSERT,
                (
                    payload.event_id,
                    payload.customer_id,
                    payload.name,
                    _sqlite_time(payload.occurred_at),
                    orjson.dumps(payload.properties).decode(),
                    _sqlite_time(datetime.now(UTC)),
                    1,
                ),
            )
            return _answer(payload, cursor.rowcount == 1, response)

    return app


ROW_SQL = "SELECT id, email, phone, attributes FROM customers WHERE id = ?"


def _row_answer(found: Any) -> Response:
    if found is None:
        return Response(b'{"found": false}', status_code=404, media_type="application/json")
    attributes = found[3]
    if isinstance(attributes, str):
        attributes = orjson.loads(attributes)
    body = {"id": found[0], "email": found[1], "phone": found[2], "attributes": attributes}
    return Response(orjson.dumps(body), media_type="application/json")


def _answer(payload: BareEvent, inserted: bool, response: Response) -> Stored:
    if not inserted:
        response.status_code = 200
    return Stored(event_id=payload.event_id, duplicate=not inserted)
