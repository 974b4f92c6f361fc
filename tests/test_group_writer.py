"""store/writer.py: the one writer of a process's background writes (group commit on
SQLite, a transaction per job on PostgreSQL), on both databases."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from store.writer import GroupWriter, group_writer


def _table(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE writer_rows (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"))


def _rows(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT id, v FROM writer_rows ORDER BY id"))]


def _insert(row_id: int, value: str):  # noqa: ANN202
    def job(conn: Connection) -> int:
        conn.execute(
            text("INSERT INTO writer_rows (id, v) VALUES (:i, :v)"), {"i": row_id, "v": value}
        )
        return row_id

    return job


def test_a_failing_job_fails_alone_and_the_others_commit(store_engine: Engine) -> None:
    _table(store_engine)
    writer = GroupWriter(store_engine)
    # Queued together so that SQLite takes them as one group; the duplicate key fails.
    futures = [writer.submit(_insert(i, f"v{i}")) for i in range(5)]
    futures.append(writer.submit(_insert(2, "again")))
    futures.extend(writer.submit(_insert(i, f"v{i}")) for i in range(5, 8))
    results = []
    for future in futures:
        try:
            results.append(future.result(timeout=30))
        except Exception as exc:  # noqa: BLE001 - the one expected failure
            results.append(type(exc).__name__)
    assert results[:5] == [0, 1, 2, 3, 4] and results[6:] == [5, 6, 7]
    assert results[5] == "IntegrityError"
    assert _rows(store_engine) == [(i, f"v{i}") for i in range(8)]


def test_a_failing_job_rolls_back_all_it_wrote(store_engine: Engine) -> None:
    _table(store_engine)

    def half_then_fail(conn: Connection) -> None:
        conn.execute(text("INSERT INTO writer_rows (id, v) VALUES (1, 'half')"))
        raise ValueError("second thoughts")

    with pytest.raises(ValueError, match="second thoughts"):
        group_writer(store_engine).run(half_then_fail)
    assert group_writer(store_engine).run(_insert(2, "whole")) == 2
    assert _rows(store_engine) == [(2, "whole")]


def test_many_threads_each_get_their_own_answer_after_the_commit(store_engine: Engine) -> None:
    _table(store_engine)
    writer = group_writer(store_engine)
    seen: list[bool] = []
    lock = threading.Lock()

    def one(i: int) -> int:
        written = writer.run(_insert(i, f"t{i}"))
        # Committed before the answer: a fresh connection sees the row.
        with store_engine.connect() as conn:
            found = conn.execute(
                text("SELECT count(*) FROM writer_rows WHERE id = :i"), {"i": i}
            ).scalar_one()
        with lock:
            seen.append(found == 1)
        return written

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(one, range(200)))
    assert answers == list(range(200))
    assert seen == [True] * 200
    assert len(_rows(store_engine)) == 200
