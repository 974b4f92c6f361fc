"""Journey analytics and "who is in a journey", in set-based SQL over runs, timeline lines,
messages and message events (SQLite and PostgreSQL).

What counts as what:

- A run is *triggered* when its row exists; it *converted* with status `converted`
  (a goal event inside the goal window), and `avg_days_to_convert` runs from
  `entered_at` to `converted_at`. *In progress* is `running`; *exited early* is `exited`
  (segment exit or an exit step) or `cancelled` (archived with cancel).
- A step is *entered* once per visit: each finished visit writes one outcome line (a
  send's sent / skipped / in_doubt / failed, a wait's event_received / timer_fired, a
  delay's timer_fired, branch_taken, attribute_updated, an exit step's exited), and a
  visit not finished is a run standing on the step (running there, or ended inside a
  wait by a goal or an exit, or failed there). Counting lines and positions this way
  needs no per-run join. A run cancelled or interrupted during a send's deferral is not
  counted at that step.
- Message counts are per message (a loop sends one per visit): *sent* means the provider
  took it (`sent`, `delivered`, `bounced`, `dropped`, `undelivered`); *delivered* means
  status `delivered` or a `delivered` event; *opened* / *clicked* mean at least one
  `open` / `click` event. Events are counted from their own copy of the message's
  journey, version and step (written by `record_message_event`); an event without it is
  found through its message, so both count alike.
- At a decision point each exit's share is over the runs that have decided there:
  `event_received` / `timer_fired` lines of a `wait_for_event` step, `branch_taken`
  lines (their `detail.matched`) of a `branch` step.

With `entered_from` / `entered_to` only runs that entered in `[from, to)` count, and
only their lines and messages.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from core.cursors import decode_numeric_cursor, encode_cursor
from core.durations import format_duration
from core.journeys import BranchStep, JourneyDefinition, WaitForEventStep
from core.tables import JSONType, UTCDateTime
from store.messages import PROVIDER_TOOK_IT
from store.runs import RunSummary

_EVENT_WORDS = {"email_clicked": "click", "email_opened": "open"}
# The line each finished visit of a step writes, by step type (workflows/journey.py and
# activities/messaging.py): a send's outcome, a wait's decision, a delay's timer...
_COMPLETED_BY: dict[str | None, tuple[str, ...]] = {
    "email": ("sent", "skipped", "in_doubt", "failed"),
    "sms": ("sent", "skipped", "in_doubt", "failed"),
    "wait_for_event": ("event_received", "timer_fired"),
    "delay": ("timer_fired",),
    "branch": ("branch_taken",),
    "update_attribute": ("attribute_updated",),
    "exit": ("exited",),
}
_OUTCOME_KINDS = tuple(sorted({kind for kinds in _COMPLETED_BY.values() for kind in kinds}))
_OUTCOME_KINDS_SQL = ", ".join(f"'{kind}'" for kind in _OUTCOME_KINDS)
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(9999, 12, 30, tzinfo=UTC)


class ExitShare(BaseModel):
    """One exit of a decision point and the share of decided runs that took it."""

    exit: str  # on_event | on_timeout | condition_1 ... | default
    label: str
    next: str | None
    count: int
    share: float


class StepAnalytics(BaseModel):
    step: str
    type: str | None
    entered: int = 0
    sent: int = 0
    delivered: int = 0
    opened: int = 0
    clicked: int = 0
    failed: int = 0
    skipped: int = 0
    in_doubt: int = 0
    # A decision point's exits (wait_for_event, branch); None for other steps.
    exits: list[ExitShare] | None = None


class JourneyAnalytics(BaseModel):
    journey: str
    version: int | None
    entered_from: datetime | None
    entered_to: datetime | None
    triggered: int
    converted: int
    conversion_rate: float
    avg_days_to_convert: float | None
    in_progress: int
    completed: int
    exited_early: int
    failed: int
    steps: list[StepAnalytics]


class RunsPage(BaseModel):
    data: list[RunSummary]
    next_cursor: str | None


# --- filters ----------------------------------------------------------------------------


def _run_filter(version: int | None, entered_from: Any, entered_to: Any) -> str:
    """Conditions on `journey_runs r` (bound: :slug, :version, :entered_from, :entered_to)."""
    parts = ["r.journey_slug = :slug"]
    if version is not None:
        parts.append("r.version = :version")
    if entered_from is not None:
        parts.append("r.entered_at >= :entered_from")
    if entered_to is not None:
        parts.append("r.entered_at < :entered_to")
    return " AND ".join(parts)


def _scoped(table: str, alias: str, version: int | None, windowed: bool) -> tuple[str, str]:
    """(from, where) restricting rows of `table` (run_events or messages) to the journey.

    Without an entry window the rows' own journey columns (indexed) are enough; with
    one, they are joined to their run to read its `entered_at`.
    """
    if windowed:
        return (
            f"{table} {alias} JOIN journey_runs r ON r.workflow_id = {alias}.workflow_id"
            f" AND r.run_id = {alias}.run_id",
            _run_filter(version, True, True),
        )
    where = f"{alias}.journey_slug = :slug"
    if version is not None:
        where += f" AND {alias}.version = :version"
    return f"{table} {alias}", where


def _days_between(dialect: str, start: str, end: str) -> str:
    if dialect == "postgresql":
        return f"EXTRACT(EPOCH FROM ({end} - {start})) / 86400.0"
    return f"julianday({end}) - julianday({start})"


def _json_text(dialect: str, column: str, key: str) -> str:
    if dialect == "postgresql":
        return f"{column} ->> '{key}'"
    return f"CAST(json_extract({column}, '$.{key}') AS TEXT)"


def _statement(sql: str) -> Any:
    """`sql` with the window's bounds bound as store times (SQLite's text format)."""
    statement = text(sql)
    if ":branch_steps" in sql:
        statement = statement.bindparams(bindparam("branch_steps", expanding=True))
    if ":entered_from" in sql:
        statement = statement.bindparams(
            bindparam("entered_from", type_=UTCDateTime()),
            bindparam("entered_to", type_=UTCDateTime()),
        )
    return statement


# --- analytics --------------------------------------------------------------------------


def journey_analytics(
    conn: Connection,
    *,
    journey_slug: str,
    version: int | None = None,
    entered_from: datetime | None = None,
    entered_to: datetime | None = None,
) -> JourneyAnalytics:
    """The journey's funnel: run totals, and per step reach, message outcomes and the
    share taking each exit of its decision points (see the module docstring)."""
    dialect = conn.dialect.name
    windowed = entered_from is not None or entered_to is not None
    params: dict[str, Any] = {"slug": journey_slug}
    if version is not None:
        params["version"] = version
    # A half-open window still joins the run; the missing bound is left wide open.
    if windowed:
        params["entered_from"] = entered_from or _EARLIEST
        params["entered_to"] = entered_to or _LATEST

    def run(sql: str) -> list[Any]:
        return list(conn.execute(_statement(sql), params))

    run_where = _run_filter(version, params.get("entered_from"), params.get("entered_to"))
    if dialect == "postgresql":
        # The counts below hash a few hundred thousand rows; 4 MB would spill to disk.
        conn.execute(text("SET LOCAL work_mem = '64MB'"))
    positions = run(
        "SELECT r.step, r.status, count(*) AS runs FROM journey_runs r"
        f" WHERE {run_where} GROUP BY r.step, r.status"
    )
    conversions = run(
        f"SELECT count(*) AS timed, sum({_days_between(dialect, 'r.entered_at', 'r.converted_at')})"
        " AS days FROM journey_runs r"
        f" WHERE {run_where} AND r.status = 'converted' AND r.converted_at IS NOT NULL"
    )[0]
    definitions = _definitions(conn, journey_slug=journey_slug, version=version)
    event_from, event_where = _scoped("run_events", "e", version, windowed)
    outcomes = run(
        f"SELECT e.step, e.kind, count(*) AS lines FROM {event_from}"
        f" WHERE e.step IS NOT NULL AND e.kind IN ({_OUTCOME_KINDS_SQL}) AND {event_where}"
        " GROUP BY e.step, e.kind"
    )
    params["branch_steps"] = sorted(_steps_of_type(definitions, "branch"))
    branches = (
        run(
            f"SELECT e.step, {_json_text(dialect, 'e.detail', 'matched')} AS matched,"
            f" count(*) AS lines FROM {event_from}"
            " WHERE e.step IN :branch_steps AND e.kind = 'branch_taken'"
            f" AND {event_where} GROUP BY e.step, 2"
        )
        if params["branch_steps"]
        else []
    )
    message_from, message_where = _scoped("messages", "m", version, windowed)
    statuses = run(
        f"SELECT m.step, m.status, count(*) AS messages FROM {message_from}"
        f" WHERE {message_where} GROUP BY m.step, m.status"
    )
    # Message events carry their message's journey, version and step: the counts below
    # read the journey's own events from their index instead of joining all of them.
    journey_events, journey_messages = "me.journey_slug = :slug", "m.journey_slug = :slug"
    if version is not None:
        journey_events += " AND me.version = :version"
        journey_messages += " AND m.version = :version"
    in_window = (
        " JOIN messages m ON m.id = e.message_id JOIN journey_runs r"
        f" ON r.workflow_id = m.workflow_id AND r.run_id = m.run_id WHERE {run_where}"
        if windowed
        else ""
    )
    engagement = run(
        "WITH engaged AS ("
        "  SELECT me.step, me.kind, me.message_id FROM message_events me"
        f"  WHERE {journey_events} AND me.kind IN ('open', 'click') AND me.message_id IS NOT NULL"
        "  UNION ALL"
        # An event stored without the journey columns (written outside
        # record_message_event) is found through its message.
        "  SELECT m.step, me.kind, me.message_id"
        "  FROM message_events me JOIN messages m ON m.id = me.message_id"
        "  WHERE me.journey_slug IS NULL AND me.kind IN ('open', 'click')"
        f"  AND {journey_messages})"
        # Each message once per kind, however often it was opened or clicked.
        " SELECT e.step, e.kind, count(DISTINCT e.message_id) AS messages"
        f" FROM engaged e{in_window} GROUP BY e.step, e.kind"
    )
    # Delivered: the status says so, or a delivery report came before a later status
    # (a bounce after delivery); only the second needs the events. An OR, not a UNION,
    # keeps the planner's estimate of the events right (a hash join, not 300,000 probes).
    delivered_before = run(
        f"SELECT m.step, count(*) AS messages FROM {message_from}"
        f" WHERE {message_where} AND m.status <> 'delivered' AND m.id IN ("
        "  SELECT me.message_id FROM message_events me"
        f"  WHERE me.kind = 'delivered' AND ({journey_events} OR me.journey_slug IS NULL))"
        " GROUP BY m.step"
    )
    steps: dict[str, StepAnalytics] = {}

    def step_of(step_id: str) -> StepAnalytics:
        if step_id not in steps:
            steps[step_id] = StepAnalytics(step=step_id, type=_step_type(definitions, step_id))
        return steps[step_id]

    by_status: dict[str, int] = defaultdict(int)
    for row in positions:
        by_status[row.status] += int(row.runs)
        if row.step is not None and _unfinished_visit(
            _step_type(definitions, row.step), row.status
        ):
            step_of(row.step).entered += int(row.runs)
    taken: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in outcomes:
        step_type = _step_type(definitions, row.step)
        if row.kind in _COMPLETED_BY.get(step_type, _OUTCOME_KINDS):
            step_of(row.step).entered += int(row.lines)
        if step_type == "wait_for_event" and row.kind in ("event_received", "timer_fired"):
            exit_name = "on_event" if row.kind == "event_received" else "on_timeout"
            taken[row.step][exit_name] += int(row.lines)
    for row in branches:
        taken[row.step][_branch_exit(row.matched)] += int(row.lines)
    for row in statuses:
        if row.step is None:
            continue
        stats = step_of(_journey_step(row.step))
        count = int(row.messages)
        if row.status in PROVIDER_TOOK_IT:
            stats.sent += count
        if row.status == "delivered":
            stats.delivered += count
        elif row.status == "failed":
            stats.failed += count
        elif row.status == "skipped":
            stats.skipped += count
        elif row.status == "in_doubt":
            stats.in_doubt += count
    for row in engagement:
        if row.step is None:
            continue
        stats = step_of(_journey_step(row.step))
        if row.kind == "open":
            stats.opened += int(row.messages)
        else:
            stats.clicked += int(row.messages)
    for row in delivered_before:
        if row.step is not None:
            step_of(_journey_step(row.step)).delivered += int(row.messages)
    for step_id in _decision_steps(definitions) | set(taken):
        step_of(step_id).exits = _exit_shares(definitions, step_id, taken.get(step_id, {}))

    triggered = sum(by_status.values())
    converted = by_status["converted"]
    return JourneyAnalytics(
        journey=journey_slug,
        version=version,
        entered_from=entered_from,
        entered_to=entered_to,
        triggered=triggered,
        converted=converted,
        conversion_rate=round(converted / triggered, 4) if triggered else 0.0,
        avg_days_to_convert=(
            round(float(conversions.days) / conversions.timed, 4) if conversions.timed else None
        ),
        in_progress=by_status["running"],
        completed=by_status["completed"],
        exited_early=by_status["exited"] + by_status["cancelled"],
        failed=by_status["failed"],
        steps=[steps[step_id] for step_id in _step_order(definitions, steps)],
    )


def _journey_step(send_key: str) -> str:
    """A message's step key (`reminder#2` on a second visit) -> the definition's step id."""
    return send_key.partition("#")[0]


def _branch_exit(matched: Any) -> str:
    if matched is None or str(matched).lower() in ("", "null", "none"):
        return "default"
    return f"condition_{int(matched) + 1}"


def _unfinished_visit(step_type: str | None, status: str) -> bool:
    """Whether a run standing on a step of this type with this status is there without
    the step's outcome line: running anywhere (it has not finished the step yet), ended
    in a wait (a goal or an exit interrupts a wait before its outcome is written), or
    failed outside a send (a send's failure line already counts as its outcome)."""
    if status == "running":
        return True
    if step_type in ("wait_for_event", "delay"):
        return status in ("converted", "exited", "failed", "cancelled")
    return status == "failed" and step_type not in ("email", "sms")


def _definitions(
    conn: Connection, *, journey_slug: str, version: int | None
) -> list[JourneyDefinition]:
    """The journey's versions (newest first) that parse; only activated ones have runs."""
    sql = "SELECT version, definition FROM journey_versions WHERE journey_slug = :slug"
    params: dict[str, Any] = {"slug": journey_slug}
    if version is not None:
        sql += " AND version = :version"
        params["version"] = version
    rows = conn.execute(
        text(sql + " ORDER BY version DESC").columns(definition=JSONType), params
    ).all()
    parsed: list[JourneyDefinition] = []
    for row in rows:
        try:
            parsed.append(JourneyDefinition.model_validate(row.definition))
        except ValidationError:
            continue
    return parsed


def _step_type(definitions: list[JourneyDefinition], step_id: str) -> str | None:
    for definition in definitions:
        if step_id in definition.steps:
            return definition.steps[step_id].type
    return None


def _steps_of_type(definitions: list[JourneyDefinition], step_type: str) -> set[str]:
    return {
        step_id
        for definition in definitions
        for step_id, step in definition.steps.items()
        if step.type == step_type
    }


def _decision_steps(definitions: list[JourneyDefinition]) -> set[str]:
    return {
        step_id
        for definition in definitions
        for step_id, step in definition.steps.items()
        if isinstance(step, WaitForEventStep | BranchStep)
    }


def _exit_shares(
    definitions: list[JourneyDefinition], step_id: str, counts: dict[str, int]
) -> list[ExitShare] | None:
    step = next((d.steps[step_id] for d in definitions if step_id in d.steps), None)
    exits: list[tuple[str, str, str | None]] = []
    if isinstance(step, WaitForEventStep):
        awaited = _EVENT_WORDS.get(step.event, step.event) + (
            f" on {step.of_step}" if step.of_step else ""
        )
        exits = [
            ("on_event", awaited, step.on_event),
            ("on_timeout", f"no {awaited} within {format_duration(step.timeout)}", step.on_timeout),
        ]
    elif isinstance(step, BranchStep):
        exits = [
            (f"condition_{index + 1}", f"condition {index + 1}", case.next)
            for index, case in enumerate(step.branches)
        ]
        exits.append(("default", "no condition held", step.default))
    elif step is not None:
        return None
    known = {name for name, _, _ in exits}
    exits += [(name, name, None) for name in sorted(counts) if name not in known]
    decided = sum(counts.values())
    return [
        ExitShare(
            exit=name,
            label=label,
            next=target,
            count=counts.get(name, 0),
            share=round(counts.get(name, 0) / decided, 4) if decided else 0.0,
        )
        for name, label, target in exits
    ]


def _step_order(definitions: list[JourneyDefinition], seen: dict[str, StepAnalytics]) -> list[str]:
    """Steps in the order a run meets them (breadth-first from `start`), then the rest."""
    order: list[str] = []
    for definition in definitions:
        queue = [definition.start]
        while queue:
            step_id = queue.pop(0)
            if step_id in order or step_id not in definition.steps:
                continue
            order.append(step_id)
            queue += [t for t in _targets(definition.steps[step_id]) if t is not None]
        order += [s for s in definition.steps if s not in order]
    order += sorted(s for s in seen if s not in order)
    for step_id in order:
        if step_id not in seen:
            seen[step_id] = StepAnalytics(step=step_id, type=_step_type(definitions, step_id))
    return order


def _targets(step: Any) -> list[str | None]:
    if isinstance(step, WaitForEventStep):
        return [step.on_event, step.on_timeout]
    if isinstance(step, BranchStep):
        return [case.next for case in step.branches] + [step.default]
    return [getattr(step, "next", None)]


# --- who is in a journey ----------------------------------------------------------------


def journey_exists(conn: Connection, *, journey_slug: str) -> bool:
    found = conn.execute(text("SELECT 1 FROM journeys WHERE slug = :slug"), {"slug": journey_slug})
    return found.first() is not None


def encode_run_cursor(run_pk: int) -> str:
    return encode_cursor(f"run:{run_pk}")


def decode_run_cursor(cursor: str) -> int:
    """The run position a cursor we gave out stands for; 422 for anything else."""
    return decode_numeric_cursor(cursor, prefix="run")


def runs_by_step(
    conn: Connection,
    *,
    journey_slug: str,
    step: str | None = None,
    status: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> RunsPage:
    """The journey's runs (optionally on one step, of one status), oldest row first."""
    where = ["journey_slug = :slug"]
    params: dict[str, Any] = {"slug": journey_slug, "limit": limit + 1}
    if step is not None:
        where.append("step = :step")
        params["step"] = step
    if status is not None:
        where.append("status = :status")
        params["status"] = status
    if cursor:
        where.append("id > :after")
        params["after"] = decode_run_cursor(cursor)
    columns = ", ".join(RunSummary.model_fields)
    rows = conn.execute(
        text(
            f"SELECT id, {columns} FROM journey_runs WHERE {' AND '.join(where)}"
            " ORDER BY id LIMIT :limit"
        ).columns(
            step_since=UTCDateTime(),
            waiting_until=UTCDateTime(),
            entered_at=UTCDateTime(),
            ended_at=UTCDateTime(),
            converted_at=UTCDateTime(),
        ),
        params,
    ).all()
    page = rows[:limit]
    return RunsPage(
        data=[
            RunSummary.model_validate({k: v for k, v in row._mapping.items() if k != "id"})
            for row in page
        ],
        next_cursor=encode_run_cursor(page[-1].id) if len(rows) > limit else None,
    )
