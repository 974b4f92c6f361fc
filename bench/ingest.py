"""Ingest figures of issue 3, each printed beside a ceiling measured in the same run.

Run by hand from the repository root (never by pytest):

    .venv/bin/python bench/ingest.py                      # full size: 1,000,000 events
    .venv/bin/python bench/ingest.py --events 50000 --wrk-seconds 10   # a quick look

1. Bulk: N synthetic events as NDJSON batches over a few concurrent connections to
   `POST /v1/events/bulk` of the product API (`journeys api --workers W`), into SQLite and
   into a fresh PostgreSQL database. Ceilings: a plain COPY (PostgreSQL) / executemany
   (SQLite) of the same rows into a table with the columns and indexes of `events`, and
   the bare FastAPI + COPY endpoint of bench/bare_app.py served by uvicorn with W workers.
2. Single events: `wrk` with 50 connections POSTing unique events (bench/post_event.lua)
   to `POST /v1/events` and to the bare validate-and-INSERT handler of bench/bare_app.py;
   requests/s and p99, and a check that every acknowledged event was stored.
3. A final table: figure, product, ceiling, ratio, target, met?

Every server is a subprocess started here and stopped at the end; the PostgreSQL database
and the SQLite files are created here and removed at the end.
"""
# ruff: noqa: E402  (the path fix below must run before the imports)

from __future__ import annotations

import os
import sys

# Import bench/ modules as `bench.x` from the repository root, never as top-level names
# that could shadow the standard library: take bench/ off the path, the root goes on.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
from psycopg import sql

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

VENV_BIN = Path(sys.executable).parent
ADMIN_KEY = "bench-admin-" + uuid.uuid4().hex
EVENT_NAMES = ("Purchase", "Page Viewed", "Added To Cart", "Email Opened")
EVENT_WEIGHTS = (30, 40, 20, 10)
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"
BENCH_TABLE_COLUMNS = (
    "event_id, customer_id, name, occurred_at, properties, received_at, realtime_pending"
)
BULK_TARGETS = {"postgresql": 100_000.0, "sqlite": 50_000.0}
SINGLE_TARGET_RPS = 2_500.0
SINGLE_TARGET_P99_MS = 50.0


# --- synthetic events -------------------------------------------------------------------


@dataclass
class Dataset:
    """The same events as rows (for the plain COPY / executemany) and as NDJSON batches."""

    rows: list[tuple[str, str, str, str, str]]
    batches: list[bytes]


def make_dataset(events: int, customers: int, batch_size: int, seed: int = 7) -> Dataset:
    rng = random.Random(seed)
    start = datetime(2025, 11, 24, tzinfo=UTC)
    names = rng.choices(EVENT_NAMES, weights=EVENT_WEIGHTS, k=events)
    rows: list[tuple[str, str, str, str, str]] = []
    lines: list[bytes] = []
    for i, name in enumerate(names):
        occurred = (start + timedelta(seconds=rng.randrange(365 * 86_400))).isoformat()
        occurred = occurred.replace("+00:00", "Z")
        if name == "Purchase":
            properties: dict[str, Any] = {"total_price": rng.randrange(100, 50_000) / 100}
        elif name == "Page Viewed":
            properties = {"path": f"/products/{rng.randrange(5_000)}"}
        else:
            properties = {}
        event_id = f"e-{i:08d}"
        customer_id = f"c-{rng.randrange(customers)}"
        rows.append((event_id, customer_id, name, occurred, orjson.dumps(properties).decode()))
        lines.append(
            orjson.dumps(
                {
                    "event_id": event_id,
                    "customer_id": customer_id,
                    "name": name,
                    "occurred_at": occurred,
                    "properties": properties,
                }
            )
        )
    batches = [
        b"\n".join(lines[i : i + batch_size]) + b"\n" for i in range(0, len(lines), batch_size)
    ]
    return Dataset(rows=rows, batches=batches)


def _copy_text(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


# --- stores -----------------------------------------------------------------------------


class Store:
    """A fresh product store (migrated) with a `bench_events` table shaped like `events`."""

    kind: str
    product_url: str  # JOURNEYS_DATABASE_URL
    bare_url: str  # BENCH_DATABASE_URL of bench/bare_app.py

    def prepare(self) -> None:
        from core.db import make_engine
        from core.migrate import migrate

        engine = make_engine(self.product_url)
        try:
            migrate(engine)
        finally:
            engine.dispose()
        self.create_bench_tables()

    def create_bench_tables(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Empty events, customers and bench_events (keys stay)."""
        raise NotImplementedError

    def count(self, table: str) -> int:
        raise NotImplementedError

    def backend_pids(self) -> list[int]:
        """Database server processes serving the bench database (none for SQLite)."""
        return []

    def plain_insert(
        self, rows: list[tuple[str, str, str, str, str]], batch_size: int, realtime: bool
    ) -> float:
        """Seconds to store `rows` into bench_events without HTTP (the lower ceiling)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PostgresStore(Store):
    kind = "postgresql"

    def __init__(self, admin_url: str, database: str):
        self.admin_url = admin_url
        self.database = database
        self.url = psycopg.conninfo.make_conninfo(admin_url, dbname=database)
        params = psycopg.conninfo.conninfo_to_dict(self.url)
        user = params.get("user", "postgres")
        password = f":{params['password']}" if params.get("password") else ""
        host = params.get("host", "127.0.0.1")
        port = params.get("port", "5432")
        base = f"{user}{password}@{host}:{port}/{database}"
        self.product_url = f"postgresql+psycopg://{base}"
        self.bare_url = f"postgresql://{base}"

    def create(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.database)
                )
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        self.prepare()

    def create_bench_tables(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cache = conn.execute(
                "SELECT cache_size FROM pg_sequences WHERE sequencename = 'events_id_seq'"
            ).fetchone()[0]
            for table, including in (
                ("bench_events", "INCLUDING ALL"),
                ("bench_events_unindexed", "INCLUDING DEFAULTS"),
            ):
                conn.execute(f"CREATE TABLE {table} (LIKE events {including})")
                # LIKE copies the default nextval('events_id_seq'); give each its own,
                # cached as the product's is.
                conn.execute(
                    f"CREATE SEQUENCE {table}_id_seq CACHE {int(cache)} OWNED BY {table}.id"
                )
                conn.execute(
                    f"ALTER TABLE {table} ALTER COLUMN id SET DEFAULT nextval('{table}_id_seq')"
                )

    def reset(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                "TRUNCATE events, customers, bench_events, bench_events_unindexed RESTART IDENTITY"
            )
            conn.execute("VACUUM ANALYZE events")
            # The last phase's dirty pages go to disk now, not during the next measurement.
            conn.execute("CHECKPOINT")
        os.sync()

    def count(self, table: str) -> int:
        with psycopg.connect(self.url) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def backend_pids(self) -> list[int]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.database,),
            ).fetchall()
        return [row[0] for row in rows]

    def plain_insert(
        self,
        rows: list[tuple[str, str, str, str, str]],
        batch_size: int,
        realtime: bool,
        table: str = "bench_events",
    ) -> float:
        stamp = datetime.now(UTC).isoformat()
        # Formatted before the clock starts: the ceiling is the server's COPY, not Python.
        blocks = [
            "".join(
                "\t".join(_copy_text(v) for v in row) + f"\t{stamp}\t{'t' if realtime else 'f'}\n"
                for row in rows[i : i + batch_size]
            ).encode()
            for i in range(0, len(rows), batch_size)
        ]
        with psycopg.connect(self.url) as conn:
            started = time.perf_counter()
            for block in blocks:
                with (
                    conn.cursor() as cursor,
                    cursor.copy(f"COPY {table} ({BENCH_TABLE_COLUMNS}) FROM STDIN") as copy,
                ):
                    copy.write(block)
                conn.commit()
            return time.perf_counter() - started

    def close(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.database)
                )
            )


class SqliteStore(Store):
    kind = "sqlite"

    def __init__(self, directory: Path):
        self.path = directory / "journeys-bench.db"
        self.product_url = f"sqlite:///{self.path}"
        self.bare_url = self.product_url
        self.prepare()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("PRAGMA cache_size=-65536")
        return conn

    def create_bench_tables(self) -> None:
        conn = self._connect()
        try:
            statements = [
                row[0]
                for row in conn.execute(
                    "SELECT sql FROM sqlite_master WHERE tbl_name = 'events' AND sql IS NOT NULL"
                    " ORDER BY type DESC"  # the table before its indexes
                )
            ]
            for statement in statements:
                statement = re.sub(r"\bevents\b", "bench_events", statement)
                conn.execute(statement.replace("ix_events_", "ix_bench_events_"))
        finally:
            conn.close()

    def reset(self) -> None:
        conn = self._connect()
        try:
            for table in ("events", "customers", "bench_events"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        os.sync()  # the last phase's writes reach the disk before the next measurement

    def count(self, table: str) -> int:
        conn = self._connect()
        try:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        finally:
            conn.close()

    def plain_insert(
        self, rows: list[tuple[str, str, str, str, str]], batch_size: int, realtime: bool
    ) -> float:
        stamp = datetime.now(UTC).strftime(SQLITE_TIME)
        prepared = [
            (
                event_id,
                customer_id,
                name,
                datetime.fromisoformat(occurred).astimezone(UTC).strftime(SQLITE_TIME),
                properties,
                stamp,
                int(realtime),
            )
            for event_id, customer_id, name, occurred, properties in rows
        ]
        conn = self._connect()
        try:
            started = time.perf_counter()
            for i in range(0, len(prepared), batch_size):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    f"INSERT INTO bench_events ({BENCH_TABLE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (event_id) DO NOTHING",
                    prepared[i : i + batch_size],
                )
                conn.execute("COMMIT")
            return time.perf_counter() - started
        finally:
            conn.close()

    def close(self) -> None:
        pass  # the temporary directory goes with the run


# --- servers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """An API under test: a process group started here, stopped by `stop`."""

    label: str
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def start_server(
    label: str, command: list[str], env: dict[str, str], port: int, workdir: Path
) -> Server:
    log = workdir / f"{label.replace(' ', '_').replace('/', '_')}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends uvicorn's workers too
        )
    server = Server(label, process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{label} exited on start; its log:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{label} did not answer /healthz within 60 s; log: {log}")


def start_product(store: Store, workers: int, workdir: Path) -> Server:
    port = free_port()
    return start_server(
        f"product {store.kind} w{workers}",
        [str(VENV_BIN / "journeys"), "api", "--port", str(port), "--workers", str(workers)],
        {
            "JOURNEYS_DATABASE_URL": store.product_url,
            "JOURNEYS_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
            # Ingest never talks to Temporal; an address where nothing listens.
            "JOURNEYS_TEMPORAL_ADDRESS": "127.0.0.1:1",
            "JOURNEYS_DATA_DIR": str(workdir / "data"),
        },
        port,
        workdir,
    )


def start_bare(store: Store, workers: int, workdir: Path) -> Server:
    port = free_port()
    return start_server(
        f"bare {store.kind} w{workers}",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_app:create_app",
            "--factory",
            "--app-dir",
            str(REPO),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        {"BENCH_DATABASE_URL": store.bare_url},
        port,
        workdir,
    )


# --- CPU accounting -----------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    pids.append(int(entry.name))
    return pids


@dataclass
class CpuUse:
    """CPU seconds spent during one measurement by the API under test, the database
    server's backends for the bench database, and the load generator."""

    api: float
    database: float
    client: float
    # How the API's CPU split between its processes: the load generator's few keep-alive
    # connections land on whichever process accepts them first, sometimes all on one.
    api_shares: tuple[float, ...] = ()

    def per_event_us(self, events: int) -> str:
        split = "/".join(f"{share:.0%}" for share in self.api_shares)
        return (
            f"cpu per event: api {self.api / events * 1e6:.1f} us, database"
            f" {self.database / events * 1e6:.1f} us, client {self.client / events * 1e6:.1f} us"
            + (f"; api cpu by process {split}" if self.api_shares else "")
        )

    def alone_rate(self, events: int, cores: int) -> float:
        """What the run would reach with every core to itself and nothing but CPU in the way."""
        return events * cores / (self.api + self.database + self.client)


class CpuMeter:
    """On a shared machine wall-clock rates move with the neighbours' load; CPU time per
    event does not, so it is measured beside them (Linux /proc).

    Database backends come and go (a pool's overflow connections close when returned), so
    they are sampled every half second while the block runs; a backend that exits loses
    at most its last half second."""

    def __init__(self, server: Server, store: Store):
        self.server = server
        self.store = store

    def _api(self) -> dict[int, float]:
        return {pid: _cpu_seconds(pid) for pid in _group_pids(self.server.process.pid)}

    def _database(self) -> dict[int, float]:
        return {pid: _cpu_seconds(pid) for pid in self.store.backend_pids()}

    @contextlib.contextmanager
    def measure(self) -> Iterator[list[CpuUse]]:
        """Yields a list that holds the CpuUse once the block ends."""
        out: list[CpuUse] = []
        api_before = self._api()
        db_before = self._database()
        db_last = dict(db_before)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                with contextlib.suppress(psycopg.Error):
                    for pid, seconds in self._database().items():
                        db_last[pid] = max(seconds, db_last.get(pid, 0.0))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        own_before = time.process_time()
        children_before = _children_cpu()
        try:
            yield out
        finally:
            stop.set()
            sampler.join()
        own = time.process_time() - own_before
        children = _children_cpu() - children_before
        api_after = self._api()
        for pid, seconds in self._database().items():
            db_last[pid] = max(seconds, db_last.get(pid, 0.0))
        by_process = [v - api_before.get(pid, 0.0) for pid, v in api_after.items()]
        api = sum(by_process)
        shares = sorted(
            (used / api for used in by_process if api and used / api >= 0.01), reverse=True
        )
        database = sum(v - db_before.get(pid, 0.0) for pid, v in db_last.items())
        out.append(
            CpuUse(
                api=api,
                database=database,
                client=own + children,
                api_shares=tuple(shares),
            )
        )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- bulk -------------------------------------------------------------------------------


@dataclass
class BulkRun:
    seconds: float
    accepted: int
    duplicates: int
    retries: list[str]  # why each retried request failed


async def _post_batches(
    url: str, batches: list[bytes], headers: dict[str, str], concurrency: int
) -> BulkRun:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    run = BulkRun(0.0, 0, 0, [])

    async def sender(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            for attempt in range(1, 11):
                # A 5xx or a dropped connection is the server's failure, not the batch's:
                # send it again, as a client would (event_id makes the repeat safe), and
                # count it.
                try:
                    response = await client.post(url, content=body, headers=headers)
                except httpx.TransportError as exc:
                    if attempt == 10:
                        raise
                    run.retries.append(f"connection dropped ({type(exc).__name__})")
                    await asyncio.sleep(random.uniform(0, 0.1 * attempt))
                    continue
                if response.status_code < 500:
                    break
                run.retries.append(f"{response.status_code} {response.text[:200]}")
                await asyncio.sleep(random.uniform(0, 0.1 * attempt))
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {response.text[:500]}")
            result = response.json()
            run.accepted += result["accepted"]
            run.duplicates += result.get("duplicates", 0)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(sender(client) for _ in range(concurrency)))
        run.seconds = time.perf_counter() - started
    return run


def bulk_over_http(
    url: str, batches: list[bytes], headers: dict[str, str], concurrency: int
) -> BulkRun:
    """POST every batch with `concurrency` requests in flight; 5xx answers are retried."""
    return asyncio.run(_post_batches(url, batches, headers, concurrency))


# --- single events with wrk -------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    acknowledged: int  # 201 + 200
    other: int
    errors: int
    stored: int
    cpu: CpuUse

    @property
    def lost(self) -> int:
        return max(0, self.acknowledged - self.stored)


def run_wrk(
    url: str,
    *,
    auth: str,
    seconds: int,
    connections: int,
    threads: int,
    customers: int,
    run: str,
) -> dict[str, Any]:
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(BENCH_DIR / "post_event.lua"),
        url,
    ]
    env = {
        **os.environ,
        "BENCH_AUTH": auth,
        "BENCH_RUN": run,
        "BENCH_CUSTOMERS": str(customers),
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")


def settled_count(store: Store, table: str) -> int:
    """The row count once the requests still in flight when wrk stopped have finished."""
    last = store.count(table)
    for _ in range(60):
        time.sleep(0.5)
        now = store.count(table)
        if now == last:
            return now
        last = now
    return last


def single_events(
    server: Server, store: Store, path: str, table: str, auth: str, args: argparse.Namespace
) -> WrkResult:
    url = server.base_url + path
    common = {
        "auth": auth,
        "connections": args.wrk_connections,
        "threads": args.wrk_threads,
        "customers": args.customers,
    }
    # Warm the connections and caches, then count from what is there.
    run_wrk(url, seconds=2, run=f"warm-{uuid.uuid4().hex[:8]}", **common)
    before = settled_count(store, table)
    with CpuMeter(server, store).measure() as cpu:
        raw = run_wrk(url, seconds=args.wrk_seconds, run=f"r-{uuid.uuid4().hex[:8]}", **common)
    stored = settled_count(store, table) - before
    return WrkResult(
        rps=raw["requests"] / (raw["duration_us"] / 1e6),
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        requests=raw["requests"],
        acknowledged=raw["created"] + raw["duplicate"],
        other=raw["other"],
        errors=raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
        stored=stored,
        cpu=cpu[0],
    )


# --- report -----------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    product: float
    ceiling: float | None
    ceiling_name: str
    target: float | None
    lower_is_better: bool = False
    unit: str = "/s"
    cpu: str = ""  # api + database CPU per event, product / ceiling

    @property
    def met(self) -> str:
        if self.target is None:
            return "-"
        ok = self.product <= self.target if self.lower_is_better else self.product >= self.target
        return "yes" if ok else "NO"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def print(self) -> None:
        def num(value: float | None, unit: str) -> str:
            if value is None:
                return "-"
            return f"{value:,.1f} ms" if unit == "ms" else f"{value:,.0f}/s"

        header = ("figure", "product", "ceiling", "ratio", "target", "met?", "cpu us/event")
        lines = []
        for r in self.rows:
            ratio = f"{r.product / r.ceiling:.2f}" if r.ceiling else "-"
            target = "-"
            if r.target is not None:
                target = ("<= " if r.lower_is_better else ">= ") + num(r.target, r.unit)
            ceiling = f"{num(r.ceiling, r.unit)} ({r.ceiling_name})" if r.ceiling else "-"
            lines.append((r.figure, num(r.product, r.unit), ceiling, ratio, target, r.met, r.cpu))
        widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
        print()
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for line in lines:
            print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)))
        print(
            "\ncpu us/event: CPU of the API processes + the database backends per event,"
            " product / ceiling app (wall-clock rates move with the machine's other load;"
            " these do not)."
        )
        if self.checks:
            print()
            for check in self.checks:
                print(check)


def say(message: str) -> None:
    # The load average shows when something else shared the cores during a figure.
    load = os.getloadavg()[0]
    print(f"[{datetime.now().strftime('%H:%M:%S')} load {load:.1f}] {message}", flush=True)


# --- the run ----------------------------------------------------------------------------


def _cpu_pair(product: CpuUse, ceiling: CpuUse, events_product: int, events_ceiling: int) -> str:
    def one(cpu: CpuUse, events: int) -> str:
        return f"{(cpu.api + cpu.database) / events * 1e6:.0f}"

    return f"{one(product, events_product)} / {one(ceiling, events_ceiling)}"


def _plural(workers: int) -> str:
    return f"{workers} worker{'s' if workers > 1 else ''}"


def bench_store(
    store: Store, dataset: Dataset, args: argparse.Namespace, workdir: Path, report: Report
) -> None:
    kind = store.kind
    n = len(dataset.rows)
    cores = os.cpu_count() or 1
    store.reset()
    seconds = store.plain_insert(dataset.rows, args.batch, args.realtime)
    plain_rate = n / seconds
    plain_name = "plain COPY" if kind == "postgresql" else "plain executemany"
    say(f"{kind}: {plain_name} of {n:,} rows into bench_events: {plain_rate:,.0f} rows/s")
    assert store.count("bench_events") == n
    if isinstance(store, PostgresStore):
        unindexed = n / store.plain_insert(
            dataset.rows, args.batch, args.realtime, "bench_events_unindexed"
        )
        say(f"{kind}: plain COPY into a table without indexes: {unindexed:,.0f} rows/s")

    auth = f"Bearer {ADMIN_KEY}"
    realtime = "true" if args.realtime else "false"
    single = kind == "postgresql" or args.wrk_sqlite
    for workers in args.workers:
        label = f"{kind} w{workers}"
        # Product: bulk, then single events.
        store.reset()
        server = start_product(store, workers, workdir)
        try:
            with CpuMeter(server, store).measure() as cpu:
                try:
                    run = bulk_over_http(
                        f"{server.base_url}/v1/events/bulk?realtime={realtime}",
                        dataset.batches,
                        {"Authorization": auth, "Content-Type": "application/x-ndjson"},
                        args.concurrency,
                    )
                except (RuntimeError, httpx.HTTPError):
                    print(f"--- {server.label} log:\n{server.log.read_text()[-6000:]}")
                    raise
            product_cpu = cpu[0]
            stored = store.count("events")
            product_rate = n / run.seconds
            say(
                f"{label}: product bulk {n:,} events in {run.seconds:.1f} s:"
                f" {product_rate:,.0f} events/s (accepted {run.accepted:,}, duplicates"
                f" {run.duplicates:,}, stored {stored:,}, 5xx retried {len(run.retries)});"
                f" {product_cpu.per_event_us(n)}; alone on {cores} cores about"
                f" {product_cpu.alone_rate(n, cores):,.0f}/s"
            )
            report.checks.append(
                f"{'ok' if stored == n else 'MISMATCH'}: {label} product bulk stored"
                f" {stored:,} of {n:,} sent (accepted {run.accepted:,})"
            )
            if run.retries:
                report.checks.append(
                    f"NOT OK: {label} product bulk: {len(run.retries)} request(s) failed"
                    f" (5xx or dropped connection) and were sent again; first: {run.retries[0]}"
                )
                log = server.log.read_text()
                # Exception lines of the tracebacks: `package.module.ErrorClass: message`.
                errors = sorted(set(re.findall(r"^[a-z_]\w*(?:\.\w+)+: .*$", log, re.M)))
                print(f"--- {server.label} log, distinct errors:\n" + "\n".join(errors[:10]))
            wrk_product = None
            if args.wrk and single:
                store.reset()
                wrk_product = single_events(server, store, "/v1/events", "events", auth, args)
        finally:
            server.stop()

        # Ceiling app: the same bulk, then the same single events.
        store.reset()
        server = start_bare(store, workers, workdir)
        try:
            with CpuMeter(server, store).measure() as cpu:
                run = bulk_over_http(
                    f"{server.base_url}/bulk?realtime={realtime}",
                    dataset.batches,
                    {"Content-Type": "application/x-ndjson"},
                    args.concurrency,
                )
            bare_cpu = cpu[0]
            bare_rate = n / run.seconds
            say(
                f"{label}: bare bulk endpoint: {bare_rate:,.0f} events/s;"
                f" {bare_cpu.per_event_us(n)}; alone on {cores} cores about"
                f" {bare_cpu.alone_rate(n, cores):,.0f}/s"
            )
            wrk_bare = None
            if wrk_product is not None:
                store.reset()
                wrk_bare = single_events(server, store, "/event", "bench_events", "", args)
        finally:
            server.stop()

        bare_name = "bare COPY endpoint" if kind == "postgresql" else "bare executemany endpoint"
        figure = f"bulk {kind}, {_plural(workers)}"
        cpu_text = _cpu_pair(product_cpu, bare_cpu, n, n)
        report.add(
            Row(figure, product_rate, bare_rate, bare_name, BULK_TARGETS[kind], cpu=cpu_text)
        )
        report.add(Row(figure, product_rate, plain_rate, plain_name, BULK_TARGETS[kind]))
        if wrk_product is None or wrk_bare is None:
            continue
        for who, result in (("product", wrk_product), ("bare", wrk_bare)):
            say(
                f"{label}: {who} single events: {result.rps:,.0f} req/s,"
                f" p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms; acknowledged"
                f" {result.acknowledged:,}, stored {result.stored:,}, other statuses"
                f" {result.other}, socket errors/timeouts {result.errors};"
                f" {result.cpu.per_event_us(result.requests)}"
            )
            in_flight = result.stored - result.acknowledged
            ok = result.lost == 0 and in_flight <= args.wrk_connections and not result.other
            report.checks.append(
                f"{'ok' if ok else 'NOT OK'}: {label} {who} single events: stored"
                f" {result.stored:,}, acknowledged (201/200) {result.acknowledged:,}, other"
                f" statuses {result.other}; stored - acknowledged = {in_flight} (requests in"
                f" flight when wrk stopped, at most {args.wrk_connections})"
            )
        name = f"single {kind}, {_plural(workers)}"
        cpu_text = _cpu_pair(wrk_product.cpu, wrk_bare.cpu, wrk_product.requests, wrk_bare.requests)
        report.add(
            Row(
                name + " req/s",
                wrk_product.rps,
                wrk_bare.rps,
                "bare INSERT handler",
                SINGLE_TARGET_RPS,
                cpu=cpu_text,
            )
        )
        report.add(
            Row(
                name + " p99",
                wrk_product.p99_ms,
                wrk_bare.p99_ms,
                "bare INSERT handler",
                SINGLE_TARGET_P99_MS,
                lower_is_better=True,
                unit="ms",
            )
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Ingest figures of issue 3 (bulk through POST /v1/events/bulk, single events with"
            " wrk), each beside a ceiling measured in the same run. Run from anywhere with"
            " the project's .venv/bin/python; starts and stops its own servers."
        )
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="bulk events (1,000,000)")
    parser.add_argument("--customers", type=int, default=100_000, help="distinct customers")
    parser.add_argument("--batch", type=int, default=20_000, help="NDJSON lines per request")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="bulk requests in flight at once (4)"
    )
    parser.add_argument(
        "--workers",
        type=lambda text: [int(w) for w in text.split(",")],
        default=[1, 2],
        help="uvicorn worker counts to try, comma separated (1,2)",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="bulk with realtime=true (rows marked for the real-time processor);"
        " default is realtime=false, a history import",
    )
    parser.add_argument("--wrk-seconds", type=int, default=30, help="wrk duration per run (30)")
    parser.add_argument("--wrk-connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--no-wrk", dest="wrk", action="store_false", help="skip single events")
    parser.add_argument(
        "--no-wrk-sqlite",
        dest="wrk_sqlite",
        action="store_false",
        help="single events on PostgreSQL only",
    )
    parser.add_argument("--no-sqlite", dest="sqlite", action="store_false", help="skip SQLite")
    parser.add_argument(
        "--no-postgres", dest="postgres", action="store_false", help="skip PostgreSQL"
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a database on the server where the bench database is created"
        " (BENCH_POSTGRES_URL; default postgresql://postgres@127.0.0.1:5432/postgres)",
    )
    parser.add_argument(
        "--database", default="journeys_bench", help="PostgreSQL database to create and drop"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.wrk and shutil.which("wrk") is None:
        print(
            "wrk is not installed: `apt-get update && apt-get install -y wrk`"
            " (or run with --no-wrk for the bulk figures only)",
            file=sys.stderr,
        )
        return 2
    say(
        f"{args.events:,} events, {args.customers:,} customers, batches of {args.batch:,},"
        f" {args.concurrency} in flight, workers {args.workers}, {os.cpu_count()} cores"
    )
    dataset = make_dataset(args.events, args.customers, args.batch)
    size = sum(len(b) for b in dataset.batches)
    say(f"dataset ready: {len(dataset.batches)} NDJSON batches, {size / 1e6:,.0f} MB")
    report = Report()
    with tempfile.TemporaryDirectory(prefix="journeys-bench-") as tmp:
        if args.postgres:
            postgres = PostgresStore(args.postgres_url, args.database)
            try:
                postgres.create()
                bench_store(postgres, dataset, args, Path(tmp), report)
            finally:
                postgres.close()
        if args.sqlite:
            bench_store(SqliteStore(Path(tmp)), dataset, args, Path(tmp), report)
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
