"""RFM scoring in set-based SQL (docs/rfm.md, "The scoring definition").

As of instant T, with window (T - timeframe, T], a customer is scored when they pass the
model's targeting and have at least one recency or frequency event in the window:

    recency_days  whole days (floor) from their last recency event in the window to T
    frequency     count of frequency events in the window
    monetary      sum of the monetary property over monetary events in the window
                  (a JSON number; missing or anything else counts 0)
    score         1 + floor(5 * W / N), W = scored customers strictly worse on the measure
    label         first rule of the segment map matching (R, F, M)

Everything is computed by the database: one statement measures, ranks (window functions)
and labels every customer into a staged table; one comparison with the stored scores
finds the customers whose scores change, and only their rows are written, only the
relabelled ones go through `store.transitions.apply_membership` (memberships and
transitions). All of it runs in the caller's transaction, so a crash leaves the previous
pass whole and a rerun changes nothing.

Both databases get the same numbers: times are compared as stored, whole days come from
integer microseconds, and money is summed as integer millionths so that ties (equal
measures) are the same ties on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError

from core.errors import NotFound
from core.rfm import SegmentRule, label_for, segment_slug
from core.tables import RfmModel, RfmPass, UTCDateTime
from store.customers import flag_for_realtime
from store.failures import FailureSubject, clear_failures, failing_keys, record_failure
from store.membership_locks import hold_for_pass, keys_held_by_a_pass, rfm_model_key
from store.rfm_models import StoredModel, get_model, stored_model
from store.transitions import MembershipDiff, apply_membership

passes = RfmPass.__table__
model_rows = RfmModel.__table__

MONEY_UNITS = 1_000_000  # monetary is summed in integer millionths
MONEY_CLAMP = 10**15  # one event counts at most +-1e9 (keeps the integer sum in range)
MICROS_PER_DAY = 86_400_000_000
PASS_WORK_MEM = "256MB"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

PASS_STEPS = (
    "locking the model",
    "scoring customers",
    "reading cut-points",
    "updating segments",
    "recording the pass",
)

Progress = Callable[[int, int, str], None]
"""Called as `progress(steps_done, total_steps, next_step)` while a pass runs."""


@dataclass(frozen=True)
class PassResult:
    pass_id: int
    model_slug: str
    as_of: datetime
    scored: int
    entries: int
    exits: int
    duration_ms: int


# --- SQL building blocks ----------------------------------------------------------------


def _time(name: str) -> Any:
    return bindparam(name, type_=UTCDateTime())


def _micros(value: datetime) -> int:
    delta = value.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _recency_days_sql(dialect: str, column: str) -> str:
    """Whole days from `column` to :rfm_as_of, floor, exact to the microsecond."""
    if dialect == "postgresql":
        micros = f"CAST(EXTRACT(EPOCH FROM (:rfm_as_of - {column})) * 1000000 AS bigint)"
    else:
        # Stored text is 'YYYY-MM-DD HH:MM:SS.ffffff': whole seconds + the microseconds
        # (strftime itself would round .999999 up to the next second).
        micros = (
            f"(:rfm_as_of_us - (CAST(strftime('%s', substr({column}, 1, 19)) AS INTEGER) * 1000000"
            f" + CAST(substr({column}, 21, 6) AS INTEGER)))"
        )
    return f"({micros} / {MICROS_PER_DAY})"


def _money_units_sql(dialect: str) -> str:
    """One event's monetary property in integer millionths, 0 unless it is a JSON number."""
    if dialect == "postgresql":
        value = "(e.properties ->> CAST(:rfm_property AS text))::numeric"
        clamped = f"LEAST(GREATEST(ROUND({value} * {MONEY_UNITS}), -{MONEY_CLAMP}), {MONEY_CLAMP})"
        return (
            "CASE WHEN jsonb_typeof(e.properties -> CAST(:rfm_property AS text)) = 'number'"
            f" THEN CAST({clamped} AS bigint) ELSE 0 END"
        )
    value = "json_extract(e.properties, :rfm_property_path)"
    clamped = f"MIN(MAX(ROUND({value} * {MONEY_UNITS}), -{MONEY_CLAMP}), {MONEY_CLAMP})"
    return (
        "CASE WHEN json_type(e.properties, :rfm_property_path) IN ('integer', 'real')"
        f" THEN CAST({clamped} AS INTEGER) ELSE 0 END"
    )


def _label_case(rules: Sequence[SegmentRule], params: dict[str, Any]) -> str:
    """`CASE WHEN <rule 1> THEN label ... END` over columns r, f, m."""
    whens = []
    for i, rule in enumerate(rules):
        clauses = [
            f"{column} BETWEEN {bounds[0]} AND {bounds[1]}"
            for column, bounds in (
                ("r", rule.r),
                ("f", rule.f),
                ("m", rule.m),
                ("((f + m + 1) / 2)", rule.fm),
            )
            if bounds is not None and tuple(bounds) != (1, 5)
        ]
        params[f"rfm_label_{i}"] = rule.label
        whens.append(
            f"WHEN {' AND '.join(clauses) or '1 = 1'} THEN CAST(:rfm_label_{i} AS VARCHAR(100))"
        )
    return "CASE " + " ".join(whens) + " END"


def _segment_case(model: StoredModel, params: dict[str, Any], column: str = "s.label") -> str:
    """`CASE label WHEN ... THEN 'model:label' END`."""
    whens = []
    for i, label in enumerate(model.definition.labels()):
        params[f"rfm_seg_label_{i}"] = label
        params[f"rfm_seg_slug_{i}"] = segment_slug(model.slug, label)
        whens.append(
            f"WHEN CAST(:rfm_seg_label_{i} AS VARCHAR(100))"
            f" THEN CAST(:rfm_seg_slug_{i} AS VARCHAR(200))"
        )
    return f"CASE {column} " + " ".join(whens) + " END"


def _context_sql(model: StoredModel, params: dict[str, Any], *, pass_id: int) -> str:
    """The entry transition's context as JSON text: model, pass, label, then r, f, m.

    Built by concatenating a per-label prefix (encoded here, so any label is valid JSON)
    with the three one-digit scores: a pass writes it for every scored customer, and
    this is several times cheaper than a JSON constructor per row.
    """
    whens = []
    for i, label in enumerate(model.definition.labels()):
        prefix = json.dumps({"model": model.slug, "pass_id": pass_id, "label": label})
        params[f"rfm_ctx_label_{i}"] = label
        params[f"rfm_ctx_{i}"] = prefix[:-1] + ', "r": '
        whens.append(
            f"WHEN CAST(:rfm_ctx_label_{i} AS VARCHAR(100)) THEN CAST(:rfm_ctx_{i} AS TEXT)"
        )
    return (
        f"(CASE s.label {' '.join(whens)} END"
        " || CAST(s.r AS VARCHAR(1)) || ', \"f\": ' || CAST(s.f AS VARCHAR(1))"
        " || ', \"m\": ' || CAST(s.m AS VARCHAR(1)) || '}')"
    )


def _targeting(
    conn: Connection, model: StoredModel, now: datetime
) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    """The model's targeting as a SQL predicate over customers `c` (TRUE when none)."""
    condition = model.definition.targeting
    if condition is None:
        return "", {}, ()
    from store.segments import compile_condition

    compiled = compile_condition(condition, dialect=conn.dialect.name, now=now)
    expanding = tuple(getattr(compiled, "expanding", ()) or ())
    return compiled.sql, dict(compiled.params), expanding


def _measures_sql(
    conn: Connection,
    model: StoredModel,
    *,
    as_of: datetime,
    params: dict[str, Any],
    customer_filter: str = "",
) -> tuple[str, tuple[str, ...]]:
    """SELECT customer_id, recency_days, frequency, monetary_units of every scored customer."""
    dialect = conn.dialect.name
    definition = model.definition
    window_start = as_of - definition.timeframe
    params.update(
        rfm_recency_event=definition.recency_event,
        rfm_frequency_event=definition.frequency_event,
        rfm_monetary_event=definition.monetary_event,
        rfm_window_start=window_start,
        rfm_as_of=as_of,
        rfm_as_of_us=_micros(as_of),
        rfm_property=definition.monetary_property,
        rfm_property_path='$."' + definition.monetary_property + '"',
        # No recency event in the window (recency and frequency events differ): count the
        # customer as old as the window, worse than anyone who has one.
        rfm_worst_days=math.ceil(definition.timeframe.total_seconds() / 86_400),
    )
    targeting_sql, targeting_params, expanding = _targeting(conn, model, as_of)
    params.update(targeting_params)
    targeting_join = ""
    if targeting_sql:
        targeting_join = f" JOIN customers c ON c.id = a.customer_id WHERE ({targeting_sql})"
    sql = f"""
        SELECT a.customer_id,
               COALESCE({_recency_days_sql(dialect, "a.last_recency")}, :rfm_worst_days)
                   AS recency_days,
               a.frequency,
               a.monetary_units
        FROM (
            SELECT e.customer_id,
                   MAX(CASE WHEN e.name = :rfm_recency_event THEN e.occurred_at END)
                       AS last_recency,
                   SUM(CASE WHEN e.name = :rfm_frequency_event THEN 1 ELSE 0 END) AS frequency,
                   SUM(CASE WHEN e.name = :rfm_monetary_event
                            THEN {_money_units_sql(dialect)} ELSE 0 END) AS monetary_units,
                   SUM(CASE WHEN e.name IN (:rfm_recency_event, :rfm_frequency_event)
                            THEN 1 ELSE 0 END) AS active
            FROM events e
            WHERE e.name IN (:rfm_recency_event, :rfm_frequency_event, :rfm_monetary_event)
              AND e.occurred_at > :rfm_window_start AND e.occurred_at <= :rfm_as_of
              {customer_filter}
            GROUP BY e.customer_id
        ) a{targeting_join}
        {"AND" if targeting_join else "WHERE"} a.active > 0
    """
    return sql, expanding


def _bind(sql: str, expanding: Sequence[str] = ()) -> Any:
    names = ("rfm_window_start", "rfm_as_of", "rfm_now")
    binds = [_time(name) for name in names if f":{name}" in sql]
    binds += [bindparam(name, expanding=True) for name in expanding]
    return text(sql).bindparams(*binds)


def scoring_sql(
    conn: Connection, model: StoredModel, *, as_of: datetime
) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    """The bare scoring statement: every scored customer with measures, scores and label."""
    params: dict[str, Any] = {}
    measures, expanding = _measures_sql(conn, model, as_of=as_of, params=params)
    label = _label_case(model.definition.rules(), params)
    # RANK() - 1 counts the customers strictly before in the order: strictly worse ones.
    sql = f"""
        SELECT customer_id, recency_days, frequency, monetary_units, r, f, m, {label} AS label
        FROM (
            SELECT customer_id, recency_days, frequency, monetary_units,
                   1 + (5 * (RANK() OVER (ORDER BY recency_days DESC) - 1)) / COUNT(*) OVER ()
                       AS r,
                   1 + (5 * (RANK() OVER (ORDER BY frequency) - 1)) / COUNT(*) OVER () AS f,
                   1 + (5 * (RANK() OVER (ORDER BY monetary_units) - 1)) / COUNT(*) OVER ()
                       AS m
            FROM ({measures}) measured
        ) ranked
    """
    return sql, params, expanding


# --- the full pass ----------------------------------------------------------------------


def score_model(
    conn: Connection,
    *,
    model_slug: str,
    as_of: datetime,
    progress: Progress | None = None,
) -> PassResult:
    """Run one full scoring pass of `model_slug` as of `as_of`, in the caller's transaction.

    Replaces the model's scores, records a pass (with the cut-points real-time rescoring
    places customers on), and makes the label segments' memberships match the new labels,
    writing one transition per entry and exit (source `rfm-pass:{id}`). Customers no
    longer scored leave every label segment; rule segments naming a label segment are
    re-evaluated after it. Raises NotFound for an unknown model.
    """
    started = time.perf_counter()
    total = len(PASS_STEPS)

    def step(done: int) -> None:
        if progress is not None:
            progress(done, total, PASS_STEPS[done] if done < total else "done")

    step(0)
    if as_of.tzinfo is None:
        raise ValueError("as_of must carry a zone")
    now = datetime.now(UTC)
    # Writing first takes the write lock on SQLite and the row lock on PostgreSQL, so two
    # passes of one model queue instead of interleaving.
    tune_for_pass(conn)
    hold_for_pass(conn, key=rfm_model_key(model_slug))
    locked = conn.execute(
        text("UPDATE rfm_models SET version = version WHERE slug = :slug"), {"slug": model_slug}
    ).rowcount
    if not locked:
        raise NotFound(f"no RFM model {model_slug!r}", field="slug")
    model = get_model(conn, slug=model_slug)
    pass_id = conn.execute(
        insert(passes)
        .values(
            model_slug=model_slug,
            model_version=model.version,
            as_of=as_of,
            started_at=now,
            scored=0,
            entries=0,
            exits=0,
            cutpoints={},
        )
        .returning(passes.c.id)
    ).scalar_one()

    step(1)
    scored_sql, params, expanding = scoring_sql(conn, model, as_of=as_of)
    params.update(rfm_model=model_slug, rfm_pass_id=pass_id, rfm_now=now)
    scored = _stage_scores(conn, scored_sql, params, expanding)
    _stage_changes(conn, params)
    summary = _pass_summary(conn)
    newcomers = _write_changes(conn, params)

    step(2)
    cutpoints = read_cutpoints(conn, model_slug=model_slug)

    step(3)
    label_slugs = [segment_slug(model_slug, label) for label in model.definition.labels()]
    diff = _apply_label_memberships(
        conn, model, params, segment_slugs=label_slugs, pass_id=pass_id, now=now
    )
    _drop_stages(conn)
    _analyze_if_stale(conn, table="rfm_scores", inserted=newcomers)
    _analyze_if_stale(conn, table="segment_memberships", inserted=diff.entries)

    # Rule segments that name this model's segments follow in the same transaction.
    from store.segments import evaluate_dependents

    evaluate_dependents(conn, segment_slugs=label_slugs, now=now)

    step(4)
    duration_ms = int((time.perf_counter() - started) * 1000)
    conn.execute(
        update(passes)
        .where(passes.c.id == pass_id)
        .values(
            finished_at=datetime.now(UTC),
            scored=scored,
            entries=diff.entries,
            exits=diff.exits,
            cutpoints=cutpoints,
            summary=summary,
        )
    )
    step(5)
    return PassResult(
        pass_id=pass_id,
        model_slug=model_slug,
        as_of=as_of,
        scored=scored,
        entries=diff.entries,
        exits=diff.exits,
        duration_ms=duration_ms,
    )


# The stored score columns a pass writes, with their SQL types (for typed NULLs).
_SCORE_COLUMNS = {
    "recency_days": "INTEGER",
    "frequency": "INTEGER",
    "monetary": "DOUBLE PRECISION",
    "r": "INTEGER",
    "f": "INTEGER",
    "m": "INTEGER",
    "label": "VARCHAR(100)",
}
_MODEL_ROWS = "rfm_scores.model_slug = CAST(:rfm_model AS VARCHAR(100))"

# The customers this pass relabels: newcomers, leavers and new labels (`rfm_changes`).
_RELABELLED_SQL = (
    "SELECT c.customer_id FROM rfm_changes c"
    " WHERE c.old_label IS NULL OR c.label IS NULL OR c.old_label <> c.label"
)


def _stage_scores(
    conn: Connection, scored_sql: str, params: dict[str, Any], expanding: tuple[str, ...]
) -> int:
    """Run the scoring statement into the temporary table `rfm_stage`; returns its rows.

    Staging is what lets the scoring statement run in parallel on PostgreSQL (the SELECT
    of an INSERT ... SELECT never does).
    """
    pg = conn.dialect.name == "postgresql"
    money = f"monetary_units / {MONEY_UNITS}.0"
    if pg:
        money = f"CAST({money} AS DOUBLE PRECISION)"
    else:
        conn.execute(text("DROP TABLE IF EXISTS temp.rfm_stage"))
    stage = (
        f"CREATE TEMP TABLE rfm_stage{' ON COMMIT DROP' if pg else ''} AS"
        f" SELECT customer_id, recency_days, frequency, {money} AS monetary, r, f, m, label"
        f" FROM ({scored_sql}) scored"
    )
    conn.execute(_bind(stage, expanding), params)
    if not pg:
        # SQLite joins by index lookups only: the stage needs one on its key.
        conn.execute(text("CREATE UNIQUE INDEX temp.rfm_stage_customer ON rfm_stage (customer_id)"))
    return int(conn.execute(text("SELECT COUNT(*) FROM rfm_stage")).scalar_one())


def _stage_changes(conn: Connection, params: dict[str, Any]) -> None:
    """Compare the staged scores with the stored ones into the temporary table
    `rfm_changes`: one row per customer whose scores change, with the new values
    (all NULL for a customer no longer scored) and `old_label` (NULL for a newcomer).

    Every later step of the pass (score writes, membership diff) reads this one
    comparison instead of joining the whole stage against the whole model again.
    """
    pg = conn.dialect.name == "postgresql"
    values = ", ".join(f"t.{c}" for c in _SCORE_COLUMNS)
    differs = " OR ".join(f"s.{c} <> t.{c}" for c in _SCORE_COLUMNS)
    stored = "SELECT * FROM rfm_scores WHERE model_slug = CAST(:rfm_model AS VARCHAR(100))"
    if pg:
        # One hash full join: both sides read once.
        changes = (
            f"SELECT COALESCE(t.customer_id, s.customer_id) AS customer_id, {values},"
            f" s.label AS old_label FROM rfm_stage t FULL JOIN ({stored}) s"
            f" ON s.customer_id = t.customer_id"
            f" WHERE t.customer_id IS NULL OR s.customer_id IS NULL OR {differs}"
        )
    else:
        # SQLite before 3.39 has no FULL JOIN: new and changed rows, then leavers.
        nulls = ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in _SCORE_COLUMNS.items())
        conn.execute(text("DROP TABLE IF EXISTS temp.rfm_changes"))
        changes = (
            f"SELECT t.customer_id, {values}, s.label AS old_label"
            f" FROM rfm_stage t LEFT JOIN ({stored}) s ON s.customer_id = t.customer_id"
            f" WHERE s.customer_id IS NULL OR {differs}"
            f" UNION ALL SELECT s.customer_id, {nulls}, s.label FROM ({stored}) s"
            " WHERE NOT EXISTS (SELECT 1 FROM rfm_stage t WHERE t.customer_id = s.customer_id)"
        )
    conn.execute(
        text(f"CREATE TEMP TABLE rfm_changes{' ON COMMIT DROP' if pg else ''} AS {changes}"),
        params,
    )


def _pass_summary(conn: Connection) -> dict[str, Any]:
    """What this pass counts, from its stages: customers and monetary per label, the
    R-by-F grid, and the label moves (`from` None: newly scored; `to` None: no longer
    scored). Customers who kept their label are not moves; a label's stayers are its
    count less the moves into it. Kept on the pass (`rfm_passes.summary`): the labels
    held before a pass exist nowhere else once it has written."""
    labels = conn.execute(
        text("SELECT label, COUNT(*), SUM(monetary) FROM rfm_stage GROUP BY label")
    ).all()
    grid = [[0] * 5 for _ in range(5)]
    for r, f, count in conn.execute(text("SELECT r, f, COUNT(*) FROM rfm_stage GROUP BY r, f")):
        grid[r - 1][f - 1] = int(count)
    moves = conn.execute(
        text(
            "SELECT old_label, label, COUNT(*) FROM rfm_changes WHERE old_label IS NULL"
            " OR label IS NULL OR old_label <> label GROUP BY old_label, label"
        )
    ).all()
    return {
        "labels": {
            # Money: summed floats leave noise like 88209.46000000005.
            label: {"count": int(count), "monetary": round(float(money or 0), 2)}
            for label, count, money in labels
        },
        "grid": grid,
        "moves": [
            {"from": old, "to": new, "customers": int(count)}
            for old, new, count in sorted(moves, key=lambda row: (row[0] or "", row[1] or ""))
        ],
    }


def _write_changes(conn: Connection, params: dict[str, Any]) -> int:
    """Make the model's `rfm_scores` rows equal the staged scores, writing only the rows
    `rfm_changes` names, so `pass_id` and `scored_at` name the pass that last changed a
    row (between hourly passes most rows do not change at all). Returns how many rows
    were inserted (newly scored customers)."""
    conn.execute(
        text(
            f"DELETE FROM rfm_scores WHERE {_MODEL_ROWS} AND rfm_scores.customer_id IN"
            " (SELECT c.customer_id FROM rfm_changes c WHERE c.label IS NULL)"
        ),
        params,
    )
    conn.execute(
        _bind(
            "UPDATE rfm_scores SET "
            + ", ".join(f"{c} = t.{c}" for c in _SCORE_COLUMNS)
            + ", pass_id = CAST(:rfm_pass_id AS BIGINT), scored_at = :rfm_now"
            f" FROM rfm_changes t WHERE {_MODEL_ROWS} AND rfm_scores.customer_id = t.customer_id"
            " AND t.label IS NOT NULL AND t.old_label IS NOT NULL"
        ),
        params,
    )
    inserted = conn.execute(
        _bind(
            "INSERT INTO rfm_scores (model_slug, customer_id, "
            + ", ".join(_SCORE_COLUMNS)
            + ", pass_id, scored_at) SELECT CAST(:rfm_model AS VARCHAR(100)), t.customer_id, "
            + ", ".join(f"t.{c}" for c in _SCORE_COLUMNS)
            + ", CAST(:rfm_pass_id AS BIGINT), :rfm_now FROM rfm_changes t"
            " WHERE t.old_label IS NULL"
        ),
        params,
    )
    return inserted.rowcount or 0


def _analyze_if_stale(conn: Connection, *, table: str, inserted: int) -> None:
    """ANALYZE `table` (PostgreSQL) when this pass inserted more rows than its statistics
    say it holds.

    A first pass fills tables the planner still takes for empty (a new store, vacuumed
    while empty). Until autovacuum analyses them, later passes and every real-time
    rescoring are planned for empty tables: seen here, one customer's stored score read
    by scanning the model's whole label index (40 ms instead of 1), and anti-joins that
    sort every membership to find a few hundred entries.
    """
    if conn.dialect.name != "postgresql" or not inserted:
        return
    estimate = conn.execute(
        text("SELECT reltuples FROM pg_class WHERE oid = CAST(:table AS regclass)"),
        {"table": table},
    ).scalar_one()
    if inserted > max(estimate, 0):
        conn.execute(text(f"ANALYZE {table}"))


def _drop_stages(conn: Connection) -> None:
    conn.execute(text("DROP TABLE rfm_changes"))
    conn.execute(text("DROP TABLE rfm_stage"))


def _apply_label_memberships(
    conn: Connection,
    model: StoredModel,
    params: dict[str, Any],
    *,
    segment_slugs: list[str],
    pass_id: int,
    now: datetime,
) -> MembershipDiff:
    """Make the label segments' memberships follow the scores this pass wrote."""
    if _same_version_as_last_pass(conn, model, pass_id=pass_id):
        # Memberships mirror the stored labels (this pass and real-time rescoring change
        # both together), so only relabelled customers can enter or exit a segment.
        staged_sql = _relabelled_membership_sql(model, params, pass_id=pass_id)
        scope_sql: str | None = _RELABELLED_SQL
    else:
        # A new version may bring back a label whose segment a previous one emptied
        # while its customers kept the label: compare every customer.
        staged_sql = _staged_membership_sql(conn, model, params, pass_id=pass_id)
        scope_sql = None
    return apply_membership(
        conn,
        segment_slugs=segment_slugs,
        staged_sql=staged_sql,
        scope_sql=scope_sql,
        params=params,
        source=f"rfm-pass:{pass_id}",
        now=now,
    )


def _same_version_as_last_pass(conn: Connection, model: StoredModel, *, pass_id: int) -> bool:
    """Whether the model's previous pass scored with the version this one does."""
    previous = conn.execute(
        select(passes.c.model_version)
        .where(passes.c.model_slug == model.slug, passes.c.id < pass_id)
        .order_by(passes.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    return previous == model.version


def tune_for_pass(conn: Connection) -> None:
    """Give this transaction the sort and hash memory a pass needs (PostgreSQL's default
    4MB would spill the per-customer aggregate and the rank sorts to disk)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SET LOCAL work_mem = '{PASS_WORK_MEM}'"))
        # The membership stage is a temp table: with the default 8MB of local buffers a
        # million staged rows go through disk. PostgreSQL refuses the change once the
        # session has used a temp table (a pooled connection that staged a bulk batch):
        # the pass then runs with the buffers it has.
        try:
            with conn.begin_nested():
                conn.execute(text(f"SET LOCAL temp_buffers = '{PASS_WORK_MEM}'"))
        except DataError:
            pass
        # A pass joins whole tables. On an empty (freshly vacuumed) memberships table the
        # planner picks a nested loop for `INSERT INTO segment_memberships ... WHERE NOT
        # EXISTS (SELECT ... FROM segment_memberships)`, whose inner scan re-reads every
        # row the statement has inserted so far: quadratic, hours at a million entries.
        conn.execute(text("SET LOCAL enable_nestloop = off"))


def _staged_membership_sql(
    conn: Connection,
    model: StoredModel,
    params: dict[str, Any],
    *,
    pass_id: int,
    customer_filter: str = "",
) -> str:
    params.update(rfm_model=model.slug, rfm_pass_id=pass_id)
    return (
        f"SELECT {_segment_case(model, params)} AS segment_slug, s.customer_id,"
        f" {_context_sql(model, params, pass_id=pass_id)} AS context"
        " FROM rfm_scores s WHERE s.model_slug = CAST(:rfm_model AS VARCHAR(100))"
        f"{customer_filter}"
    )


def _relabelled_membership_sql(model: StoredModel, params: dict[str, Any], *, pass_id: int) -> str:
    """The label memberships of the customers this pass relabels (rows of `rfm_changes`)."""
    return (
        f"SELECT {_segment_case(model, params)} AS segment_slug, s.customer_id,"
        f" {_context_sql(model, params, pass_id=pass_id)} AS context"
        " FROM rfm_changes s WHERE s.label IS NOT NULL"
        " AND (s.old_label IS NULL OR s.old_label <> s.label)"
    )


def read_cutpoints(conn: Connection, *, model_slug: str) -> dict[str, Any]:
    """The measures at which each score starts, from the model's current scores.

    A score of k or more needs: recency_days < recency[k-2]; frequency > frequency[k-2];
    monetary_units > monetary_units[k-2] (None: nobody was scored, every score is 1).
    Every scored customer lands on exactly the score the pass gave them.
    """
    columns = []
    for k in (2, 3, 4, 5):
        columns += [
            f"MIN(CASE WHEN r < {k} THEN recency_days END) AS r{k}",
            f"MAX(CASE WHEN f < {k} THEN frequency END) AS f{k}",
            f"MAX(CASE WHEN m < {k} THEN monetary END) AS m{k}",
        ]
    row = (
        conn.execute(
            text(
                f"SELECT COUNT(*) AS n, {', '.join(columns)} FROM rfm_scores WHERE model_slug = :slug"
            ),
            {"slug": model_slug},
        )
        .mappings()
        .one()
    )

    def units(value: float | None) -> int | None:
        return None if value is None else round(value * MONEY_UNITS)

    return {
        "n": row["n"],
        "recency_days": [row[f"r{k}"] for k in (2, 3, 4, 5)],
        "frequency": [row[f"f{k}"] for k in (2, 3, 4, 5)],
        "monetary_units": [units(row[f"m{k}"]) for k in (2, 3, 4, 5)],
    }


def place(
    cutpoints: dict[str, Any], *, recency_days: int, frequency: int, monetary_units: int
) -> tuple[int, int, int]:
    """(R, F, M) of measures on a pass's cut-points."""
    r = 1 + sum(1 for c in cutpoints["recency_days"] if c is not None and recency_days < c)
    f = 1 + sum(1 for c in cutpoints["frequency"] if c is not None and frequency > c)
    m = 1 + sum(1 for c in cutpoints["monetary_units"] if c is not None and monetary_units > c)
    return r, f, m


# --- real-time rescoring ------------------------------------------------------------------


def rescore_customers(conn: Connection, *, customer_ids: Sequence[str], now: datetime) -> int:
    """Re-score `customer_ids` on every real-time model, against the latest full pass.

    Each customer's measures are recomputed as of `now`, placed on the cut-points of the
    model's latest pass and relabelled; their score rows and label memberships follow
    (transitions with source `rfm-realtime:{pass_id}`), in the caller's transaction.
    A model with no pass yet is skipped. Returns how many (model, customer) labels changed.
    """
    ids = sorted(set(customer_ids))
    if not ids:
        return 0
    failing = failing_keys(conn, kind="rfm_model", stage="realtime")
    changed = 0
    # Asked before the models are read: a model being scored is skipped without waiting
    # for its pass, and these customers come back once the pass has committed.
    slugs = conn.execute(select(model_rows.c.slug)).scalars().all()
    held_keys = keys_held_by_a_pass(conn, keys=[rfm_model_key(slug) for slug in slugs])
    held = {slug for slug in slugs if rfm_model_key(slug) in held_keys}
    if held:
        flag_for_realtime(conn, customer_ids=ids)
    for model, last_pass in _realtime_models(conn, skip=held):
        if failing.get(model.slug, now) > now:
            continue  # set aside: it waits for its retry time, the other models go on
        try:
            with conn.begin_nested():
                changed += _rescore_model(
                    conn, model=model, last_pass=last_pass, customer_ids=ids, now=now
                )
        except Exception:  # noqa: BLE001 - the model's own failure, or the customers'?
            if _rescores_no_customer(conn, model=model, last_pass=last_pass, now=now):
                raise  # the customers' data: the caller finds the customer
            continue
        if model.slug in failing:
            clear_failures(conn, kind="rfm_model", stage="realtime", keys=[model.slug])
    return changed


def _rescores_no_customer(
    conn: Connection, *, model: StoredModel, last_pass: dict[str, Any], now: datetime
) -> bool:
    """Whether the model's real-time rescoring runs at all; one that does not is set aside."""
    try:
        with conn.begin_nested():
            # No customer has an empty id: the model's SQL runs on nobody's data.
            _rescore_model(conn, model=model, last_pass=last_pass, customer_ids=[""], now=now)
        return True
    except Exception as exc:  # noqa: BLE001 - the model is the poison
        record_failure(
            conn, subject=FailureSubject("rfm_model", model.slug, "realtime"), error=exc, now=now
        )
        return False


def _realtime_models(
    conn: Connection, *, skip: set[str]
) -> list[tuple[StoredModel, dict[str, Any]]]:
    """Real-time models but `skip` (being scored) with their latest pass (id and
    cut-points), in one round trip. On PostgreSQL the share lock keeps the model from
    changing under the rescoring (an edit waits for it)."""
    newest = passes.alias("newest")
    latest = (
        select(func.max(newest.c.id))
        .where(newest.c.model_slug == model_rows.c.slug)
        .correlate(model_rows)
        .scalar_subquery()
    )
    query = (
        select(model_rows, passes.c.id.label("pass_id"), passes.c.cutpoints)
        .select_from(model_rows.join(passes, passes.c.id == latest))
        .where(model_rows.c.slug.not_in(sorted(skip)))
        .order_by(model_rows.c.slug)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True, of=model_rows)
    found = []
    for row in conn.execute(query):
        model = stored_model(row)
        if model.definition.realtime:
            found.append((model, {"id": row.pass_id, "cutpoints": row.cutpoints}))
    return found


def _rescore_model(
    conn: Connection,
    *,
    model: StoredModel,
    last_pass: dict[str, Any],
    customer_ids: list[str],
    now: datetime,
) -> int:
    params: dict[str, Any] = {"rfm_ids": customer_ids, "rfm_model": model.slug}
    measures_sql, expanding = _measures_sql(
        conn,
        model,
        as_of=now,
        params=params,
        customer_filter="AND e.customer_id IN :rfm_ids",
    )
    # New measures and the stored labels of the same customers, in one round trip.
    rows = conn.execute(
        _bind(
            "SELECT 'new' AS kind, customer_id, recency_days, frequency, monetary_units,"
            " NULL AS label"
            f" FROM ({measures_sql}) measured"
            " UNION ALL SELECT 'old', customer_id, NULL, NULL, NULL, label FROM rfm_scores"
            " WHERE model_slug = CAST(:rfm_model AS VARCHAR(100)) AND customer_id IN :rfm_ids",
            (*expanding, "rfm_ids"),
        ),
        params,
    ).all()
    measured = [row[1:5] for row in rows if row[0] == "new"]
    old_labels = {row[1]: row[5] for row in rows if row[0] == "old"}
    rules = model.definition.rules()
    cutpoints = last_pass["cutpoints"]
    pass_id = last_pass["id"]
    rows = []
    new_labels: dict[str, str] = {}
    for customer_id, recency_days, frequency, monetary_units in measured:
        r, f, m = place(
            cutpoints,
            recency_days=int(recency_days),
            frequency=int(frequency),
            monetary_units=int(monetary_units),
        )
        label = label_for(rules, r, f, m)
        new_labels[customer_id] = label
        rows.append(
            {
                "model_slug": model.slug,
                "customer_id": customer_id,
                "recency_days": int(recency_days),
                "frequency": int(frequency),
                "monetary": int(monetary_units) / MONEY_UNITS,
                "r": r,
                "f": f,
                "m": m,
                "label": label,
                "pass_id": pass_id,
                "scored_at": now,
            }
        )
    gone = [cid for cid in old_labels if cid not in new_labels]
    if gone:
        conn.execute(
            text(
                "DELETE FROM rfm_scores WHERE model_slug = :slug AND customer_id IN :ids"
            ).bindparams(bindparam("ids", expanding=True)),
            {"slug": model.slug, "ids": gone},
        )
    if rows:
        _upsert_scores(conn, rows)
    # Memberships mirror labels, so only customers whose label changed need the diff.
    relabelled = sorted(
        cid
        for cid in set(old_labels) | set(new_labels)
        if old_labels.get(cid) != new_labels.get(cid)
    )
    if relabelled:
        params = {"rfm_ids": relabelled}
        apply_membership(
            conn,
            segment_slugs=[segment_slug(model.slug, label) for label in model.definition.labels()],
            staged_sql=_staged_membership_sql(
                conn,
                model,
                params,
                pass_id=pass_id,
                customer_filter=" AND s.customer_id IN :rfm_ids",
            ),
            params=params,
            expanding=("rfm_ids",),
            source=f"rfm-realtime:{pass_id}",
            now=now,
            customer_ids=relabelled,
        )
    return len(relabelled)


def _upsert_scores(conn: Connection, rows: list[dict[str, Any]]) -> None:
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    from core.tables import RfmScore

    table = RfmScore.__table__
    insert_ = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = insert_(table).values(rows)
    columns = (
        "recency_days",
        "frequency",
        "monetary",
        "r",
        "f",
        "m",
        "label",
        "pass_id",
        "scored_at",
    )
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["model_slug", "customer_id"],
            set_={name: statement.excluded[name] for name in columns},
        )
    )


# --- read side ----------------------------------------------------------------------------


def page_scores(
    conn: Connection, *, model_slug: str, limit: int, after: str | None = None
) -> list[dict[str, Any]]:
    """The model's scores ordered by customer id, `limit` rows after customer `after`."""
    sql = (
        "SELECT customer_id, recency_days, frequency, monetary, r, f, m, label"
        " FROM rfm_scores WHERE model_slug = :slug"
        + (" AND customer_id > :after" if after is not None else "")
        + " ORDER BY customer_id LIMIT :limit"
    )
    params: dict[str, Any] = {"slug": model_slug, "limit": limit}
    if after is not None:
        params["after"] = after
    return [dict(row) for row in conn.execute(text(sql), params).mappings()]


def summarize(conn: Connection, *, model_slug: str) -> dict[str, Any]:
    """Per label: count and monetary; and the 5x5 R-by-F grid of counts."""
    labels = conn.execute(
        text(
            "SELECT label, COUNT(*) AS count, SUM(monetary) AS monetary FROM rfm_scores"
            " WHERE model_slug = :slug GROUP BY label"
        ),
        {"slug": model_slug},
    ).all()
    grid = [[0] * 5 for _ in range(5)]
    for r, f, count in conn.execute(
        text("SELECT r, f, COUNT(*) FROM rfm_scores WHERE model_slug = :slug GROUP BY r, f"),
        {"slug": model_slug},
    ):
        grid[r - 1][f - 1] = count
    return {
        "labels": {
            # Summing floats leaves noise like 88209.46000000005; the measure is money.
            label: {"count": count, "monetary": round(float(monetary or 0), 2)}
            for label, count, monetary in labels
        },
        "grid": grid,
    }
