"""The quarantine: records background work set aside, each with its error and retry time.

A stage (real-time processing, a scheduled pass, the dispatcher, a send) that cannot
process one record records it here and goes on with the others; it tries the record
again once `next_attempt_at` has passed (1 s, 2 s, 4 s ... at most an hour after each
failure), and a success clears it. Everything is written in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import ValidationError
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from core.errors import JourneysError
from core.metrics import count_quarantined
from core.tables import UTCDateTime

FailureKind = Literal[
    "customer", "segment", "rfm_model", "journey", "transition", "prediction_model"
]
FailureStage = Literal["realtime", "segment_pass", "rfm_pass", "dispatch", "training"]

MAX_BACKOFF = timedelta(hours=1)
MAX_ERROR_LENGTH = 2_000


@dataclass(frozen=True)
class FailureSubject:
    kind: FailureKind
    key: str
    stage: FailureStage


@dataclass(frozen=True)
class FailureRecord:
    id: int
    kind: str
    key: str
    stage: str
    error: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    next_attempt_at: datetime


def backoff(attempts: int) -> timedelta:
    """How long after its `attempts`-th failure a record is tried again."""
    return min(timedelta(seconds=2 ** min(attempts - 1, 20)), MAX_BACKOFF)


def describe_error(error: BaseException | str) -> str:
    """The error as an admin should read it: the database's own message, not the SQL."""
    if isinstance(error, str):
        message = error
    elif isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if not str(p)[:1].isupper())
        message = f"stored definition no longer valid: {where or 'value'}: {first.get('msg')}"
    elif isinstance(error, JourneysError):
        message = f"stored definition no longer valid: {error.field or 'value'}: {error.message}"
    elif isinstance(error, DBAPIError) and error.orig is not None:
        message = f"{type(error.orig).__name__}: {error.orig}"
    else:
        message = f"{type(error).__name__}: {error}"
    # NUL can be what failed; the record of it must still be storable.
    return message.replace("\x00", "\\x00").encode("utf-8", "replace").decode()[:MAX_ERROR_LENGTH]


_TIMES = ("now", "next_at")


def _timed(sql: str, *names: str) -> object:
    return text(sql).bindparams(*(bindparam(n, type_=UTCDateTime()) for n in names))


def record_failure(
    conn: Connection, *, subject: FailureSubject, error: BaseException | str, now: datetime
) -> FailureRecord:
    """Count one more failure of `subject`; it is due again after `backoff(attempts)`."""
    previous = conn.execute(
        text("SELECT attempts FROM failures WHERE kind = :kind AND key = :key AND stage = :stage"),
        {"kind": subject.kind, "key": subject.key, "stage": subject.stage},
    ).scalar()
    attempts = (previous or 0) + 1
    conn.execute(
        _timed(
            "INSERT INTO failures (kind, key, stage, error, attempts, first_failed_at,"
            " last_failed_at, next_attempt_at)"
            " VALUES (:kind, :key, :stage, :error, :attempts, :now, :now, :next_at)"
            " ON CONFLICT (kind, key, stage) DO UPDATE SET error = excluded.error,"
            " attempts = excluded.attempts, last_failed_at = excluded.last_failed_at,"
            " next_attempt_at = excluded.next_attempt_at",
            *_TIMES,
        ),
        {
            "kind": subject.kind,
            "key": subject.key,
            "stage": subject.stage,
            "error": describe_error(error),
            "attempts": attempts,
            "now": now,
            "next_at": now + backoff(attempts),
        },
    )
    count_quarantined(subject.kind, subject.stage)
    return failures_of(conn, kind=subject.kind, key=subject.key, stage=subject.stage)[0]


def clear_failures(
    conn: Connection, *, kind: FailureKind, stage: FailureStage, keys: Iterable[str]
) -> None:
    """Forget the failures of `keys`: they went through."""
    wanted = sorted(set(keys))
    if wanted:
        conn.execute(
            text(
                "DELETE FROM failures WHERE kind = :kind AND stage = :stage AND key IN :keys"
            ).bindparams(bindparam("keys", expanding=True)),
            {"kind": kind, "stage": stage, "keys": wanted},
        )


def failing_keys(
    conn: Connection, *, kind: FailureKind, stage: FailureStage
) -> dict[str, datetime]:
    """Every set-aside key of `kind` at `stage`, with when it may be tried again."""
    rows = conn.execute(
        text("SELECT key, next_attempt_at FROM failures WHERE kind = :kind AND stage = :stage"),
        {"kind": kind, "stage": stage},
    )
    convert = UTCDateTime().process_result_value
    return {row.key: convert(row.next_attempt_at, conn.dialect) for row in rows}  # type: ignore[misc]


def due_keys(
    conn: Connection, *, kind: FailureKind, stage: FailureStage, now: datetime, limit: int
) -> list[str]:
    """Set-aside keys whose retry time has come, oldest retry first."""
    rows = conn.execute(
        _timed(
            "SELECT key FROM failures WHERE stage = :stage AND kind = :kind"
            " AND next_attempt_at <= :now ORDER BY next_attempt_at LIMIT :limit",
            "now",
        ),
        {"kind": kind, "stage": stage, "now": now, "limit": limit},
    )
    return [row.key for row in rows]


def blocked_keys(
    conn: Connection, *, kind: FailureKind, stage: FailureStage, now: datetime
) -> set[str]:
    """Set-aside keys whose retry time has not come: the stage skips them for now."""
    return {key for key, due in failing_keys(conn, kind=kind, stage=stage).items() if due > now}


def failures_of(
    conn: Connection, *, kind: str, key: str, stage: str | None = None
) -> list[FailureRecord]:
    """The failures recorded for one record (at one stage, or all)."""
    sql = "SELECT * FROM failures WHERE kind = :kind AND key = :key"
    if stage is not None:
        sql += " AND stage = :stage"
    rows = conn.execute(text(sql + " ORDER BY id"), {"kind": kind, "key": key, "stage": stage})
    return [_record(conn, row) for row in rows]


def list_failures(
    conn: Connection, *, kind: str | None, limit: int, after_id: int | None
) -> list[FailureRecord]:
    """Failures by id, optionally of one kind, after `after_id`."""
    sql = "SELECT * FROM failures WHERE id > :after"
    if kind is not None:
        sql += " AND kind = :kind"
    rows = conn.execute(
        text(sql + " ORDER BY id LIMIT :limit"),
        {"after": after_id or 0, "kind": kind, "limit": limit},
    )
    return [_record(conn, row) for row in rows]


def _record(conn: Connection, row: Sequence[object]) -> FailureRecord:
    convert = UTCDateTime().process_result_value
    mapping = dict(row._mapping)  # type: ignore[attr-defined]
    for name in ("first_failed_at", "last_failed_at", "next_attempt_at"):
        mapping[name] = convert(mapping[name], conn.dialect)
    return FailureRecord(**mapping)


def errors_by_key(conn: Connection, *, kind: FailureKind) -> dict[str, str]:
    """The latest error of each set-aside record of `kind`, at any stage."""
    rows = conn.execute(
        text("SELECT key, error FROM failures WHERE kind = :kind ORDER BY last_failed_at, id"),
        {"kind": kind},
    )
    return {row.key: row.error for row in rows}


def forget_record(conn: Connection, *, kind: FailureKind, key: str) -> None:
    """Drop every failure of one record: it was changed or deleted, so it starts afresh."""
    conn.execute(
        text("DELETE FROM failures WHERE kind = :kind AND key = :key"), {"kind": kind, "key": key}
    )
