"""Journey runs and their readable timelines.

A run row is keyed by (workflow_id, run_id) where run_id is the first Temporal run of
the chain (it survives continue-as-new). Both the dispatcher and the run itself create
the row insert-if-absent, whichever comes first; the run then moves its position.
Timeline lines are insert-if-absent on (workflow_id, run_id, seq), so an activity retry
never writes a second line.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from core.runs import ENDED_STATUSES, RunIdentity, RunLine, RunPosition
from core.tables import JourneyRun, JourneyVersion, RunEvent

runs = JourneyRun.__table__
run_events = RunEvent.__table__
versions = JourneyVersion.__table__
_KEYED = {
    "runs": (runs, ["workflow_id", "run_id"]),
    "run_events": (run_events, ["workflow_id", "run_id", "seq"]),
}


class RunSummary(BaseModel):
    """A run as the dispatcher, the real-time loop and support read it."""

    workflow_id: str
    run_id: str
    journey_slug: str
    version: int
    customer_id: str
    status: str
    step: str | None = None
    step_since: datetime | None = None
    waiting_for: str | None = None
    waiting_until: datetime | None = None
    entry_transition_id: int | None = None
    entered_at: datetime
    ended_at: datetime | None = None
    converted_at: datetime | None = None


class TimelineLine(BaseModel):
    seq: int
    step: str | None
    kind: str
    reason: str
    detail: dict[str, Any]
    occurred_at: datetime


class RunWithTimeline(RunSummary):
    timeline: list[TimelineLine]


# Run bookkeeping statements are built once per dialect: building one and computing its
# cache key cost more than running it, on the hot path of every run.
@lru_cache(maxsize=4)
def _insert_if_absent(dialect: str, table_name: str) -> Any:
    table, keys = _KEYED[table_name]
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    return insert(table).on_conflict_do_nothing(index_elements=keys)


@lru_cache(maxsize=1)
def _move_sql() -> Any:
    # An ended run stays ended: only a final position may touch a run that has ended.
    return (
        update(runs)
        .where(
            runs.c.workflow_id == bindparam("b_workflow_id"),
            runs.c.run_id == bindparam("b_run_id"),
            or_(runs.c.status == "running", bindparam("p_status") != "running"),
        )
        .values({name: bindparam(f"p_{name}") for name in RunPosition.model_fields})
    )


def _summary(row: Any) -> RunSummary:
    return RunSummary.model_validate(dict(row._mapping))


_SUMMARY_COLUMNS = [runs.c[name] for name in RunSummary.model_fields]


def ensure_runs(conn: Connection, *, identities: Sequence[RunIdentity]) -> None:
    """Create the rows of these runs as `running`, leaving rows that exist untouched."""
    if not identities:
        return
    rows = [{**identity.model_dump(), "status": "running"} for identity in identities]
    # Many parameter sets for one statement, not a VALUES list of their number: the
    # statement compiles once per process instead of once per call.
    conn.execute(_insert_if_absent(conn.dialect.name, "runs"), rows)


def update_position(
    conn: Connection, *, workflow_id: str, run_id: str, position: RunPosition
) -> None:
    """Move a run to `position`; an ended run stays ended (a late write cannot revive it)."""
    conn.execute(
        update(runs)
        .where(
            and_(
                runs.c.workflow_id == workflow_id,
                runs.c.run_id == run_id,
                runs.c.status.not_in(ENDED_STATUSES)
                if position.status == "running"
                else runs.c.id.is_not(None),
            )
        )
        .values(**position.model_dump())
    )


def append_run_events(conn: Connection, *, run: RunIdentity, lines: Sequence[RunLine]) -> None:
    """Append timeline lines; a line whose seq is already written is left as it is."""
    _insert_lines(conn, [(run, line) for line in lines])


def _insert_lines(conn: Connection, lines: Sequence[tuple[RunIdentity, RunLine]]) -> None:
    if not lines:
        return
    rows = [
        {
            "workflow_id": run.workflow_id,
            "run_id": run.run_id,
            "journey_slug": run.journey_slug,
            "version": run.version,
            "customer_id": run.customer_id,
            **line.model_dump(),
        }
        for run, line in lines
    ]
    conn.execute(_insert_if_absent(conn.dialect.name, "run_events"), rows)


def record_progress(
    conn: Connection, *, run: RunIdentity, lines: Sequence[RunLine], position: RunPosition
) -> None:
    """The run exists, its new timeline lines are written, and it stands at `position`."""
    record_progress_many(conn, items=[(run, lines, position)])


def record_progress_many(
    conn: Connection,
    *,
    items: Sequence[tuple[RunIdentity, Sequence[RunLine], RunPosition]],
) -> None:
    """`record_progress` for many runs at once: three statements whatever their number."""
    if not items:
        return
    ensure_runs(conn, identities=[run for run, _, _ in items])
    _insert_lines(conn, [(run, line) for run, lines, _ in items for line in lines])
    moves = [
        {
            "b_workflow_id": run.workflow_id,
            "b_run_id": run.run_id,
            **{f"p_{name}": value for name, value in position.model_dump().items()},
        }
        for run, _, position in items
    ]
    conn.execute(_move_sql(), moves)


def last_run(conn: Connection, *, journey_slug: str, customer_id: str) -> RunSummary | None:
    """The customer's latest run of this journey (for the re-entry policy), if any."""
    return last_runs(conn, journey_slug=journey_slug, customer_ids=[customer_id]).get(customer_id)


def last_runs(
    conn: Connection, *, journey_slug: str, customer_ids: Sequence[str]
) -> dict[str, RunSummary]:
    """Each customer's latest run of this journey, by customer id (absent: never ran)."""
    if not customer_ids:
        return {}
    latest: dict[str, RunSummary] = {}
    ids = sorted(set(customer_ids))
    for start in range(0, len(ids), 500):
        rows = conn.execute(
            select(*_SUMMARY_COLUMNS)
            .where(
                runs.c.journey_slug == journey_slug,
                runs.c.customer_id.in_(ids[start : start + 500]),
            )
            .order_by(runs.c.customer_id, runs.c.entered_at, runs.c.id)
        )
        for row in rows:
            latest[row.customer_id] = _summary(row)
    return latest


def running_runs_of_customers(
    conn: Connection, *, customer_ids: Sequence[str]
) -> list[tuple[RunSummary, dict[str, Any] | None]]:
    """Running runs of these customers, each with its journey version's definition JSON."""
    found: list[tuple[RunSummary, dict[str, Any] | None]] = []
    ids = sorted(set(customer_ids))
    for start in range(0, len(ids), 500):
        rows = conn.execute(
            select(*_SUMMARY_COLUMNS, versions.c.definition)
            .select_from(
                runs.outerjoin(
                    versions,
                    and_(
                        versions.c.journey_slug == runs.c.journey_slug,
                        versions.c.version == runs.c.version,
                    ),
                )
            )
            .where(runs.c.status == "running", runs.c.customer_id.in_(ids[start : start + 500]))
            .order_by(runs.c.customer_id, runs.c.id)
        )
        for row in rows:
            values = dict(row._mapping)
            definition = values.pop("definition")
            found.append((RunSummary.model_validate(values), definition))
    return found


def running_runs_of_customer(conn: Connection, *, customer_id: str) -> list[RunSummary]:
    """The customer's runs still in flight (to signal them an event or an exit)."""
    rows = conn.execute(
        select(*_SUMMARY_COLUMNS)
        .where(runs.c.customer_id == customer_id, runs.c.status == "running")
        .order_by(runs.c.id)
    )
    return [_summary(row) for row in rows]


def running_runs_of_journey(
    conn: Connection, *, journey_slug: str, limit: int | None = None
) -> list[RunSummary]:
    """A journey's runs still in flight (archive-cancel walks these)."""
    query = (
        select(*_SUMMARY_COLUMNS)
        .where(runs.c.journey_slug == journey_slug, runs.c.status == "running")
        .order_by(runs.c.id)
    )
    if limit is not None:
        query = query.limit(limit)
    return [_summary(row) for row in conn.execute(query)]


def customer_runs(conn: Connection, *, customer_id: str) -> list[RunWithTimeline]:
    """Every run of a customer, newest first, each with its timeline in order."""
    summaries = [
        _summary(row)
        for row in conn.execute(
            select(*_SUMMARY_COLUMNS)
            .where(runs.c.customer_id == customer_id)
            .order_by(runs.c.entered_at.desc(), runs.c.id.desc())
        )
    ]
    lines: dict[tuple[str, str], list[TimelineLine]] = {}
    for row in conn.execute(
        select(
            run_events.c.workflow_id,
            run_events.c.run_id,
            run_events.c.seq,
            run_events.c.step,
            run_events.c.kind,
            run_events.c.reason,
            run_events.c.detail,
            run_events.c.occurred_at,
        )
        .where(run_events.c.customer_id == customer_id)
        .order_by(run_events.c.workflow_id, run_events.c.run_id, run_events.c.seq)
    ):
        lines.setdefault((row.workflow_id, row.run_id), []).append(
            TimelineLine(
                seq=row.seq,
                step=row.step,
                kind=row.kind,
                reason=row.reason,
                detail=row.detail or {},
                occurred_at=row.occurred_at,
            )
        )
    return [
        RunWithTimeline(
            **summary.model_dump(), timeline=lines.get((summary.workflow_id, summary.run_id), [])
        )
        for summary in summaries
    ]


def mark_runs_ended(
    conn: Connection, *, keys: Sequence[tuple[str, str]], status: str, now: datetime
) -> None:
    """Close runs from outside the workflow (archive-cancel, a terminated run)."""
    for workflow_id, run_id in keys:
        conn.execute(
            update(runs)
            .where(
                runs.c.workflow_id == workflow_id,
                runs.c.run_id == run_id,
                runs.c.status == "running",
            )
            .values(status=status, ended_at=now, waiting_for=None, waiting_until=None)
        )
