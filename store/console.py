"""The console's reads: what the overview, segment, RFM and journey pages show beside what
other modules already give (analytics, inspection, explain, campaign analytics).

Each read is shaped for a page at a million customers and ten million events: it reads
an index, a bounded slice (the newest events by id), a small table (journeys, failures,
passes), or it is an aggregate the console computes off the request path and caches
(api/console/cache.py) and says how old it is.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from core.journeys import JourneyDefinition
from core.tables import JSONType, UTCDateTime

_to_time = UTCDateTime().process_result_value


# --- overview -------------------------------------------------------------------------------


class MinuteCount(BaseModel):
    minute: datetime
    events: int


class Throughput(BaseModel):
    """Events received per minute, counted over the newest `sampled` events by id."""

    minutes: list[MinuteCount] = Field(description="the window's minutes, oldest first")
    window_minutes: int
    sampled: int = Field(description="events read (the newest, at most the cap)")
    capped: bool = Field(description="the cap was reached: older minutes of the window are short")


def events_per_minute(
    conn: Connection, *, now: datetime, minutes: int = 60, cap: int = 100_000
) -> Throughput:
    """Events received in each of the last `minutes` minutes, from the newest `cap`
    events by id (ids follow arrival closely; a busier window reads as capped)."""
    since = now - timedelta(minutes=minutes)
    if conn.dialect.name == "postgresql":
        bucket = "date_trunc('minute', t.received_at)"
    else:
        bucket = "substr(t.received_at, 1, 16)"
    newest = "SELECT received_at FROM events ORDER BY id DESC LIMIT :cap"
    rows = conn.execute(
        text(
            f"SELECT {bucket} AS minute, COUNT(*) AS n FROM ({newest}) t"
            " WHERE t.received_at >= :since GROUP BY 1"
        ).bindparams(bindparam("since", type_=UTCDateTime())),
        {"cap": cap, "since": since},
    ).all()
    sampled = int(
        conn.execute(text(f"SELECT COUNT(*) FROM ({newest}) t"), {"cap": cap}).scalar_one()
    )
    counts: dict[datetime, int] = {}
    for minute, n in rows:
        if isinstance(minute, str):
            minute = datetime.fromisoformat(minute + ":00")
        at = _to_time(minute, None)
        assert at is not None
        counts[at.replace(second=0, microsecond=0)] = int(n)
    first = since.replace(second=0, microsecond=0) + timedelta(minutes=1)
    window = [first + timedelta(minutes=i) for i in range(minutes)]
    return Throughput(
        minutes=[MinuteCount(minute=m, events=counts.get(m, 0)) for m in window],
        window_minutes=minutes,
        sampled=sampled,
        capped=sampled >= cap,
    )


class RealtimeLag(BaseModel):
    pending_events: int = Field(description="events not processed yet (counted up to the cap)")
    pending_customers: int
    capped: bool
    oldest_pending_at: datetime | None = Field(description="when the oldest waiting event came")
    lag_seconds: float = Field(description="how long the oldest waiting event has waited")


def realtime_lag(conn: Connection, *, now: datetime, cap: int = 100_000) -> RealtimeLag:
    """What the real-time processor has still to do, from its partial indexes."""
    pending = int(
        conn.execute(
            text("SELECT COUNT(*) FROM (SELECT 1 FROM events WHERE realtime_pending LIMIT :cap) t"),
            {"cap": cap},
        ).scalar_one()
    )
    customers = int(
        conn.execute(
            text(
                "SELECT COUNT(*) FROM (SELECT 1 FROM customers WHERE realtime_pending LIMIT :cap) t"
            ),
            {"cap": cap},
        ).scalar_one()
    )
    oldest = conn.execute(
        text(
            "SELECT received_at FROM events WHERE id ="
            " (SELECT MIN(id) FROM events WHERE realtime_pending)"
        )
    ).scalar()
    oldest_at = _to_time(oldest, None)
    return RealtimeLag(
        pending_events=pending,
        pending_customers=customers,
        capped=pending >= cap or customers >= cap,
        oldest_pending_at=oldest_at,
        lag_seconds=max((now - oldest_at).total_seconds(), 0.0) if oldest_at else 0.0,
    )


class Activity(BaseModel):
    journeys_by_state: dict[str, int]
    runs_by_status: dict[str, int]
    runs_by_journey: dict[str, int] = Field(description="running runs of each journey")
    sends_by_outcome: dict[str, dict[str, int]] = Field(description="channel -> status -> messages")


def activity(conn: Connection) -> Activity:
    """Journeys by state, runs by status (and running per journey), messages by outcome."""
    journeys = dict(conn.execute(text("SELECT state, COUNT(*) FROM journeys GROUP BY state")).all())
    runs: dict[str, int] = {}
    running: dict[str, int] = {}
    for slug, status, count in conn.execute(
        text(
            "SELECT journey_slug, status, COUNT(*) FROM journey_runs GROUP BY journey_slug, status"
        )
    ):
        runs[status] = runs.get(status, 0) + int(count)
        if status == "running":
            running[slug] = int(count)
    sends: dict[str, dict[str, int]] = {}
    for channel, status, count in conn.execute(
        text("SELECT channel, status, COUNT(*) FROM messages GROUP BY channel, status")
    ):
        sends.setdefault(channel, {})[status] = int(count)
    return Activity(
        journeys_by_state={k: int(v) for k, v in journeys.items()},
        runs_by_status=runs,
        runs_by_journey=running,
        sends_by_outcome=sends,
    )


class FailureCount(BaseModel):
    kind: str
    stage: str
    count: int


class RecentFailure(BaseModel):
    kind: str
    key: str
    stage: str
    error: str
    attempts: int
    last_failed_at: datetime
    next_attempt_at: datetime


class Quarantine(BaseModel):
    counts: list[FailureCount]
    recent: list[RecentFailure]


def quarantine(conn: Connection, *, recent: int = 10) -> Quarantine:
    """Records set aside, by kind and stage, and the latest few."""
    counts = [
        FailureCount(kind=kind, stage=stage, count=int(count))
        for kind, stage, count in conn.execute(
            text(
                "SELECT kind, stage, COUNT(*) FROM failures GROUP BY kind, stage"
                " ORDER BY kind, stage"
            )
        )
    ]
    rows = conn.execute(
        text(
            "SELECT kind, key, stage, error, attempts, last_failed_at, next_attempt_at"
            " FROM failures ORDER BY last_failed_at DESC, id DESC LIMIT :n"
        ).columns(last_failed_at=UTCDateTime(), next_attempt_at=UTCDateTime()),
        {"n": recent},
    ).mappings()
    return Quarantine(counts=counts, recent=[RecentFailure(**row) for row in rows])


# --- segments -------------------------------------------------------------------------------


class DayCount(BaseModel):
    day: date
    entered: int = 0
    exited: int = 0


def transitions_per_day(
    conn: Connection, *, now: datetime, days: int, slug: str | None = None
) -> dict[str, list[DayCount]]:
    """Entries and exits per UTC day over the last `days` days (today included), per
    segment (or for `slug` alone), every day present."""
    first = (now - timedelta(days=days - 1)).date()
    since = datetime(first.year, first.month, first.day, tzinfo=now.tzinfo)
    if conn.dialect.name == "postgresql":
        day = "CAST(occurred_at AT TIME ZONE 'UTC' AS date)"
    else:
        day = "substr(occurred_at, 1, 10)"
    where = "occurred_at >= :since"
    params: dict[str, Any] = {"since": since}
    if slug is not None:
        where += " AND segment_slug = :slug"
        params["slug"] = slug
    rows = conn.execute(
        text(
            f"SELECT segment_slug, kind, {day} AS day, COUNT(*) FROM segment_transitions"
            f" WHERE {where} GROUP BY segment_slug, kind, {day}"
        ).bindparams(bindparam("since", type_=UTCDateTime())),
        params,
    ).all()
    found: dict[str, dict[date, DayCount]] = {}
    for segment, kind, when, count in rows:
        when = date.fromisoformat(when) if isinstance(when, str) else when
        cell = found.setdefault(segment, {}).setdefault(when, DayCount(day=when))
        if kind == "entered":
            cell.entered += int(count)
        else:
            cell.exited += int(count)
    if slug is not None:
        found.setdefault(slug, {})
    calendar = [first + timedelta(days=i) for i in range(days)]
    return {
        segment: [cells.get(d, DayCount(day=d)) for d in calendar]
        for segment, cells in found.items()
    }


def member_count(conn: Connection, *, slug: str) -> int:
    return int(
        conn.execute(
            text("SELECT COUNT(*) FROM segment_memberships WHERE segment_slug = :slug"),
            {"slug": slug},
        ).scalar_one()
    )


# --- RFM ------------------------------------------------------------------------------------


class LabelCount(BaseModel):
    count: int
    monetary: float


class LabelMove(BaseModel):
    from_label: str | None = Field(alias="from")
    to_label: str | None = Field(alias="to")
    customers: int

    model_config = {"populate_by_name": True}


class PassSummary(BaseModel):
    labels: dict[str, LabelCount]
    grid: list[list[int]] = Field(description="grid[r-1][f-1]")
    moves: list[LabelMove]


class PassRecord(BaseModel):
    id: int
    model_version: int
    as_of: datetime
    started_at: datetime
    finished_at: datetime | None
    scored: int
    entries: int
    exits: int
    summary: PassSummary | None = Field(description="None for passes before migration 0014")


def model_passes(conn: Connection, *, model_slug: str, limit: int = 24) -> list[PassRecord]:
    """The model's newest finished passes, newest first, with what each counted."""
    rows = conn.execute(
        text(
            "SELECT id, model_version, as_of, started_at, finished_at, scored, entries, exits,"
            " summary FROM rfm_passes WHERE model_slug = :slug AND finished_at IS NOT NULL"
            " ORDER BY id DESC LIMIT :limit"
        ).columns(
            summary=JSONType,
            as_of=UTCDateTime(),
            started_at=UTCDateTime(),
            finished_at=UTCDateTime(),
        ),
        {"slug": model_slug, "limit": limit},
    ).mappings()
    return [PassRecord.model_validate(dict(row)) for row in rows]


class MigrationMatrix(BaseModel):
    """Where the labels held before a pass went in it: cells[from][to] = customers.

    `from` includes `not scored` (customers the pass scored for the first time), `to`
    includes `not scored` (customers it no longer scores); a label's diagonal cell is the
    customers who kept it."""

    pass_id: int
    labels: list[str]
    rows: list[str]
    columns: list[str]
    cells: dict[str, dict[str, int]]
    before: dict[str, int]
    after: dict[str, int]


NOT_SCORED = "not scored"


def migration_matrix(record: PassRecord, labels: list[str]) -> MigrationMatrix | None:
    """The pass's label moves as a full from -> to matrix (None without a summary)."""
    summary = record.summary
    if summary is None:
        return None
    known = list(dict.fromkeys([*labels, *summary.labels]))
    for move in summary.moves:
        for label in (move.from_label, move.to_label):
            if label is not None and label not in known:
                known.append(label)
    cells: dict[str, dict[str, int]] = {
        row: {col: 0 for col in [*known, NOT_SCORED]} for row in [*known, NOT_SCORED]
    }
    moved_in: dict[str, int] = {}
    for move in summary.moves:
        source = move.from_label or NOT_SCORED
        target = move.to_label or NOT_SCORED
        cells[source][target] += move.customers
        moved_in[target] = moved_in.get(target, 0) + move.customers
    after = {
        label: summary.labels.get(label, LabelCount(count=0, monetary=0)).count for label in known
    }
    for label in known:
        cells[label][label] = after[label] - moved_in.get(label, 0)
    before = {row: sum(cells[row].values()) for row in known}
    return MigrationMatrix(
        pass_id=record.id,
        labels=known,
        rows=[*known, NOT_SCORED],
        columns=[*known, NOT_SCORED],
        cells=cells,
        before=before,
        after=after,
    )


# --- journeys -------------------------------------------------------------------------------


def step_outcomes(
    conn: Connection, *, journey_slug: str, version: int | None
) -> dict[str, dict[str, int]]:
    """Per step, how many timeline lines of each outcome kind its visits wrote (a
    finished visit writes one: a send's outcome, a wait's decision, a delay's timer...)."""
    sql = (
        "SELECT step, kind, COUNT(*) FROM run_events WHERE journey_slug = :slug"
        " AND step IS NOT NULL"
    )
    params: dict[str, Any] = {"slug": journey_slug}
    if version is not None:
        sql += " AND version = :version"
        params["version"] = version
    found: dict[str, dict[str, int]] = {}
    for step, kind, count in conn.execute(text(sql + " GROUP BY step, kind"), params):
        key = str(step).partition("#")[0]
        found.setdefault(key, {})
        found[key][kind] = found[key].get(kind, 0) + int(count)
    return found


def journey_definition(conn: Connection, *, slug: str, version: int) -> JourneyDefinition | None:
    """One version's definition, None when it no longer parses."""
    row = conn.execute(
        text(
            "SELECT definition FROM journey_versions WHERE journey_slug = :slug"
            " AND version = :version"
        ).columns(definition=JSONType),
        {"slug": slug, "version": version},
    ).first()
    if row is None:
        return None
    try:
        return JourneyDefinition.model_validate(row.definition)
    except ValueError:
        return None


# --- customers ------------------------------------------------------------------------------


class CustomerHit(BaseModel):
    id: str
    email: str | None


def find_customers(conn: Connection, *, query: str, limit: int = 20) -> list[CustomerHit]:
    """Customers whose id is `query` or starts with it, or whose email is `query` (both
    indexed)."""
    rows = conn.execute(
        text(
            "SELECT id, email FROM customers WHERE id = :q OR email = :q"
            " UNION SELECT id, email FROM ("
            "  SELECT id, email FROM customers WHERE id >= :q AND id < :upper"
            "  ORDER BY id LIMIT :limit) p"
            " ORDER BY id LIMIT :limit"
        ),
        {"q": query, "upper": query + "\U0010ffff", "limit": limit},
    ).all()
    return [CustomerHit(id=row.id, email=row.email) for row in rows]
