"""SQLite's write discipline (core/db.py): every transaction takes the write lock before
its first write, so no writer answers "database is locked" while others write."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from activities.realtime import RealtimeActivities
from api.app import create_app
from core.db import sqlite_statement_writes
from core.events import EventIn, EventRecord
from core.tables import utcnow
from store import segments as segment_store
from store.event_writers import BulkWriter, EventWriter
from store.events import KnownCustomers
from store.keys import create_key
from store.scoring import score_model
from tests.utils.api import api_harness, settings_for_tests
from tests.utils.rfm import generated_history, load, model_body
from worker import realtime_customer_steps

NOW = datetime.now(UTC)
BUYERS = {"event": "Purchase", "count": {"gte": 1}, "within": "P30D"}


def _ids(engine: Engine, sql: str, **params: Any) -> set[str]:
    with engine.connect() as conn:
        return {row[0] for row in conn.execute(text(sql), params)}


def _hold_write_lock(engine: Engine) -> sqlite3.Connection:
    """Another connection in the middle of a write (as ingest or a scoring pass is)."""
    holder = sqlite3.connect(engine.url.database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute(
        "INSERT INTO customers (id, attributes, created_at, updated_at, realtime_pending)"
        " VALUES ('holder', '{}', '2026-01-01', '2026-01-01', 0)"
    )
    return holder


def _in_thread(work: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_a_transaction_that_reads_before_it_writes_waits_for_the_lock(sqlite_engine):
    # A segment pass stages its members (reading everything) before it writes them:
    # with a deferred BEGIN that read could not wait for the lock and failed at once.
    load(sqlite_engine, generated_history(customers=40, as_of=NOW)[1])
    with sqlite_engine.begin() as conn:
        segment_store.create_segment(
            conn, slug="buyers", name="Buyers", kind="rule", condition=BUYERS, now=NOW
        )
    holder = _hold_write_lock(sqlite_engine)

    def evaluate() -> None:
        with sqlite_engine.begin() as conn:
            segment_store.evaluate_segment(conn, slug="buyers", now=NOW)

    thread, errors = _in_thread(evaluate)
    time.sleep(0.3)
    assert thread.is_alive(), errors  # waiting for the lock, not failed
    holder.commit()
    holder.close()
    thread.join(10)
    assert errors == []
    buyers = _ids(
        sqlite_engine,
        "SELECT DISTINCT customer_id FROM events WHERE name = 'Purchase' AND occurred_at >= :t",
        t=(NOW - timedelta(days=30)).isoformat(sep=" ")[:26],
    )
    members = _ids(sqlite_engine, "SELECT customer_id FROM segment_memberships")
    assert members == buyers and members


def _insert_customer(conn: Any, customer_id: str) -> None:
    conn.execute(
        text(
            "INSERT INTO customers (id, attributes, created_at, updated_at, realtime_pending)"
            " VALUES (:id, '{}', '2026-01-01', '2026-01-01', 0)"
        ),
        {"id": customer_id},
    )


def test_savepoints_nest_inside_the_transaction(sqlite_engine):
    with sqlite_engine.begin() as conn:
        _insert_customer(conn, "a")
        with pytest.raises(RuntimeError), conn.begin_nested():
            _insert_customer(conn, "b")
            raise RuntimeError("undo b only")
        _insert_customer(conn, "c")
    # A savepoint as the transaction's first statement must not become the transaction
    # (pysqlite's own BEGIN handling made it one: its RELEASE committed "d" for good).
    with pytest.raises(RuntimeError), sqlite_engine.begin() as conn:
        with conn.begin_nested():
            _insert_customer(conn, "d")
        _insert_customer(conn, "e")
        raise RuntimeError("undo d and e")
    assert _ids(sqlite_engine, "SELECT id FROM customers") == {"a", "c"}


def test_a_savepoint_first_waits_for_the_lock(sqlite_engine):
    holder = _hold_write_lock(sqlite_engine)

    def write() -> None:
        with sqlite_engine.begin() as conn, conn.begin_nested():
            _insert_customer(conn, "late")

    thread, errors = _in_thread(write)
    time.sleep(0.2)
    holder.commit()
    holder.close()
    thread.join(10)
    assert errors == []
    assert _ids(sqlite_engine, "SELECT id FROM customers") == {"holder", "late"}


@pytest.fixture
def traced(sqlite_engine) -> Iterator[list[str]]:
    """Every statement SQLite runs on the engine's connections (BEGINs included)."""
    statements: list[str] = []
    sqlite_engine.dispose()

    def trace(dbapi_connection, _record) -> None:  # noqa: ANN001
        dbapi_connection.set_trace_callback(statements.append)

    event.listen(sqlite_engine, "connect", trace)
    yield statements
    event.remove(sqlite_engine, "connect", trace)


def _begins(statements: list[str]) -> list[str]:
    return [s for s in statements if s.upper().startswith("BEGIN")]


async def test_ingest_takes_the_lock_once_a_group(sqlite_engine, traced):
    single = EventWriter(sqlite_engine)
    bulk = BulkWriter(sqlite_engine, KnownCustomers())
    await single.open()
    await bulk.open()
    try:
        traced.clear()
        visit = EventIn(event_id="e-1", customer_id="c-1", name="Visit", occurred_at=NOW)
        assert await single.write(visit)
        assert _begins(traced) == ["BEGIN IMMEDIATE"]
        traced.clear()
        batch: list[EventRecord] = [
            {"event_id": f"b-{n}", "customer_id": "c-2", "name": "Visit", "occurred_at": NOW}
            for n in range(3)
        ]
        assert await bulk.write(batch, realtime=False) == 3
        assert _begins(traced) == ["BEGIN IMMEDIATE"]
    finally:
        await bulk.close()
        await single.close()


def test_reads_take_no_lock_and_a_write_takes_it_once(sqlite_engine, traced):
    with sqlite_engine.begin() as conn:
        conn.execute(text("SELECT count(*) FROM customers")).scalar_one()
    assert _begins(traced) == []
    with sqlite_engine.begin() as conn:
        conn.execute(text("SELECT count(*) FROM customers")).scalar_one()
        _insert_customer(conn, "a")
        _insert_customer(conn, "b")
    assert _begins(traced) == ["BEGIN IMMEDIATE"]


def test_an_unread_result_before_a_write_fails_at_once_instead_of_waiting(sqlite_engine):
    with sqlite_engine.begin() as conn:
        for n in range(3):
            _insert_customer(conn, f"c-{n}")
    with pytest.raises(Exception, match="locked"), sqlite_engine.begin() as conn:
        unread = conn.execute(text("SELECT id FROM customers"))  # an open read
        unread.fetchone()
        holder = _hold_write_lock(sqlite_engine)
        holder.commit()  # the open read's snapshot is now stale for good
        holder.close()
        started = time.monotonic()
        try:
            _insert_customer(conn, "x")
        finally:
            assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("statement", "writes"),
    [
        ("SELECT 1", False),
        ("  select * from t", False),
        ("PRAGMA busy_timeout=0", False),
        ("WITH x AS (SELECT 1) SELECT updated_at FROM x", False),
        ("INSERT INTO t VALUES (1)", True),
        ("\n  update t set a = 1", True),
        ("DELETE FROM staged_membership", True),
        ("CREATE TEMP TABLE s AS SELECT 1", True),
        ("SAVEPOINT sa_savepoint_1", True),
        ("RELEASE SAVEPOINT sa_savepoint_1", False),
        ("WITH gone AS (DELETE FROM t RETURNING a) SELECT count(*) FROM gone", True),
    ],
)
def test_which_statements_write(statement, writes):
    assert sqlite_statement_writes(statement) is writes


async def test_a_request_s_transaction_commits_before_its_answer_goes_out(store_engine):
    # Had the answer gone first, a client acting on it at once (evaluating the segment
    # it just created) could find nothing yet, or race the commit for the lock.
    app = create_app(settings_for_tests(), store_engine)
    with Session(store_engine) as session:
        _, admin = create_key(session, role="admin", name="admin")
        session.commit()
    body = json.dumps({"role": "support", "name": "made-by-the-request"}).encode()
    at_answer: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            at_answer["status"] = message["status"]
            at_answer["names"] = _ids(store_engine, "SELECT name FROM api_keys")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/keys",
        "raw_path": b"/v1/keys",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {admin}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    assert at_answer["status"] == 201
    assert "made-by-the-request" in at_answer["names"]


# --- everything at once through the API --------------------------------------------------

RUN_SECONDS = 4.0


class Workload:
    """Writers on threads until the deadline; every failure is kept, none is raised."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.failures: list[str] = []
        self.counts: Counter[str] = Counter()
        self._threads: list[threading.Thread] = []

    def add(self, name: str, step: Callable[[int], None]) -> None:
        def run() -> None:
            n = 0
            while time.monotonic() < self.deadline:
                try:
                    step(n)
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                    return
                self.counts[name] += 1
                n += 1

        self._threads.append(threading.Thread(target=run, name=name))

    def run(self) -> None:
        for thread in self._threads:
            thread.start()
        for thread in self._threads:
            thread.join(120)


def _ok(response: Any, *statuses: int) -> Any:
    if response.status_code not in statuses:
        raise AssertionError(f"{response.request.url.path}: {response.status_code} {response.text}")
    return response.json()


def test_every_writer_at_once_on_sqlite(sqlite_engine, dev_server_env, caplog):
    customers, history = generated_history(customers=300, as_of=NOW)
    load(sqlite_engine, history, customers)
    target = dev_server_env.client.service_client.config.target_host
    with api_harness(
        sqlite_engine, temporal_address=target, task_queue="sqlite-writes-test"
    ) as api:
        post = api.client.post
        ingest, marketer = api.headers("ingest"), api.headers("marketer")
        _ok(post("/v1/rfm-models", headers=marketer, json=model_body(realtime=True)), 201)
        _ok(post("/v1/rfm-models/default/score", headers=marketer), 200)
        body = {"slug": "buyers", "name": "Buyers", "condition": BUYERS}
        _ok(post("/v1/segments", headers=marketer, json=body), 201)
        realtime = RealtimeActivities(
            sqlite_engine,
            settings_for_tests(),
            customer_steps=realtime_customer_steps(),
            event_sink=None,
        )
        acknowledged: set[str] = set()
        patched: dict[str, int] = {}

        def bulk(n: int) -> None:
            lines = [
                {
                    "event_id": f"bulk-{n}-{i}",
                    "customer_id": customers[(n * 37 + i) % len(customers)],
                    "name": "Purchase",
                    "occurred_at": utcnow().isoformat(),
                    "properties": {"total_price": 10 + i % 90},
                }
                for i in range(400)
            ]
            result = _ok(post("/v1/events/bulk", headers=ingest, json=lines), 200)
            assert result["accepted"] == len(lines)
            acknowledged.update(line["event_id"] for line in lines)

        def single(n: int) -> None:
            body = {
                "event_id": f"one-{n}",
                "customer_id": f"new-{n % 50}",
                "name": "Visit",
                "occurred_at": utcnow().isoformat(),
            }
            _ok(post("/v1/events", headers=ingest, json=body), 201)
            acknowledged.add(body["event_id"])

        def score(_: int) -> None:
            _ok(post("/v1/rfm-models/default/score", headers=marketer), 200)

        def evaluate(_: int) -> None:
            _ok(post("/v1/segments/buyers/evaluate", headers=marketer), 200)

        def create_then_evaluate(n: int) -> None:
            # The first evaluation of a segment just created (it answered "locked").
            body = {"slug": f"fresh-{n}", "name": "Fresh", "condition": BUYERS}
            _ok(post("/v1/segments", headers=marketer, json=body), 201)
            _ok(post(f"/v1/segments/fresh-{n}/evaluate", headers=marketer), 200)

        def process(_: int) -> None:
            realtime.process_batch(500)

        def patch(n: int) -> None:
            customer = customers[n % 40]
            body = {"attributes": {"plan": f"p{n}"}}
            _ok(api.client.patch(f"/v1/customers/{customer}", headers=ingest, json=body), 200)
            patched[customer] = n

        work = Workload(RUN_SECONDS)
        for name, step in (
            ("bulk", bulk),
            ("single", single),
            ("score", score),
            ("evaluate", evaluate),
            ("create then evaluate", create_then_evaluate),
            ("realtime", process),
            ("patch", patch),
        ):
            work.add(name, step)
        work.run()
        logged = [
            f"{r.name}: {r.getMessage()} {r.exc_info[1] if r.exc_info else ''}"
            for r in caplog.records
            if r.levelno >= logging.ERROR
        ]
        assert (work.failures, logged) == ([], [])
        assert all(work.counts[name] > 0 for name in ("bulk", "score", "evaluate", "realtime"))

        # Afterwards the store is whole: every acknowledged event is there, the real-time
        # processor catches up, and each membership agrees with its segment's transitions.
        stored = _ids(sqlite_engine, "SELECT event_id FROM events")
        assert acknowledged <= stored
        while realtime.process_batch(2_000)[1]:
            pass
        assert _ids(sqlite_engine, "SELECT event_id FROM events WHERE realtime_pending") == set()
        for customer, n in patched.items():
            got = api.client.get(f"/v1/customers/{customer}", headers=ingest).json()
            assert got["attributes"]["plan"] == f"p{n}"
        with sqlite_engine.begin() as conn:
            score_model(conn, model_slug="default", as_of=utcnow())
            segment_store.evaluate_segment(conn, slug="buyers", now=utcnow())
        entered = _ids(
            sqlite_engine,
            "SELECT t.segment_slug || '/' || t.customer_id FROM segment_transitions t"
            " WHERE t.id = (SELECT max(id) FROM segment_transitions l"
            "  WHERE l.segment_slug = t.segment_slug AND l.customer_id = t.customer_id)"
            " AND t.kind = 'entered'",
        )
        members = _ids(
            sqlite_engine, "SELECT segment_slug || '/' || customer_id FROM segment_memberships"
        )
        assert members == entered
