"""Features and labels of predictive models, computed in SQL from the event store.

Features as of a cutoff read only events at or before it (`occurred_at <= cutoff`), for
every customer with at least one such event; a label reads only the horizon after a
cutoff (`cutoff < occurred_at <= cutoff + horizon`). Nothing else of the event store is
read, so a training as of T whose labels end at T cannot see what came after T.
Attributes are the one input without history: they are read as they are now.

Per customer (days are fractional, from the time of the event to the cutoff):

    recency_days, frequency, monetary     the purchase event: days since the last, how
                                          many, the sum of its value property
    purchase_tenure_days                  days since the first purchase
    ipi_mean, ipi_last, ipi_recent        days between consecutive purchases: all, the
                                          last, the last three (their trend is a ratio)
    tenure_days, days_since_last_event    any event: since the first, since the last
    events_total, events_7d ... _365d     any event: all, and in the last 7/30/90/365 days
    target_count, target_days             the target (its filters met): events, and the
                                          distinct UTC days with one (BG/NBD's x + 1)
    target_recency_days, target_tenure_days  since its last, since its first
    target_last_horizon, target_prev_horizon  how many in the last horizon, the one before
    target_30d, target_90d, target_365d
    attr:<name>                           a chosen attribute: a number, true 1, false 0
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from core.prediction_learning import FeatureFrame
from core.predictions import PredictiveModelDefinition
from core.tables import UTCDateTime

WINDOW_DAYS = (7, 30, 90, 365)
TARGET_WINDOW_DAYS = (30, 90, 365)
FETCH_ROWS = 50_000


def feature_columns(definition: PredictiveModelDefinition) -> tuple[str, ...]:
    """The columns `read_features` gives, in order (after the customer id)."""
    columns = ["recency_days", "frequency"]
    if definition.features.value_property is not None:
        columns.append("monetary")
    columns += ["purchase_tenure_days", "ipi_mean", "ipi_last", "ipi_recent"]
    columns += ["tenure_days", "days_since_last_event", "events_total"]
    columns += [f"events_{d}d" for d in WINDOW_DAYS]
    columns += [
        "target_count",
        "target_days",
        "target_recency_days",
        "target_tenure_days",
        "target_last_horizon",
        "target_prev_horizon",
    ]
    columns += [f"target_{d}d" for d in TARGET_WINDOW_DAYS]
    columns += [f"attr:{name}" for name in definition.features.attributes]
    return tuple(columns)


class _Sql:
    """The dialect's spelling of what the feature query needs."""

    def __init__(self, dialect: str):
        self.pg = dialect == "postgresql"

    def days(self, later: str, earlier: str) -> str:
        if self.pg:
            return (
                f"(CAST(EXTRACT(EPOCH FROM ({later} - {earlier})) AS double precision) / 86400.0)"
            )
        return f"(julianday({later}) - julianday({earlier}))"

    def day(self, column: str) -> str:
        if self.pg:
            return f"CAST({column} AT TIME ZONE 'UTC' AS date)"
        return f"substr({column}, 1, 10)"

    def json_number(self, source: str, path_param: str) -> str:
        """A JSON number at the path as a double; NULL for anything else."""
        if self.pg:
            at = f"{source} #> CAST(:{path_param} AS text[])"
            return (
                f"CASE WHEN jsonb_typeof({at}) = 'number'"
                f" THEN CAST({source} #>> CAST(:{path_param} AS text[]) AS double precision) END"
            )
        return (
            f"CASE WHEN json_type({source}, :{path_param}) IN ('integer', 'real')"
            f" THEN CAST(json_extract({source}, :{path_param}) AS REAL) END"
        )

    def json_feature(self, source: str, path_param: str) -> str:
        """A JSON number as itself, a boolean as 1 / 0; NULL for anything else."""
        if self.pg:
            at = f"{source} #> CAST(:{path_param} AS text[])"
            return (
                f"CASE jsonb_typeof({at})"
                f" WHEN 'number' THEN CAST({source} #>> CAST(:{path_param} AS text[]) AS double precision)"
                f" WHEN 'boolean' THEN CASE WHEN {source} #>> CAST(:{path_param} AS text[]) = 'true'"
                " THEN 1.0 ELSE 0.0 END END"
            )
        kind = f"json_type({source}, :{path_param})"
        return (
            f"CASE WHEN {kind} IN ('integer', 'real') THEN CAST(json_extract({source}, :{path_param}) AS REAL)"
            f" WHEN {kind} = 'true' THEN 1.0 WHEN {kind} = 'false' THEN 0.0 END"
        )

    def path(self, dotted: str) -> str:
        parts = dotted.split(".")
        if self.pg:
            return "{" + ",".join('"' + p + '"' for p in parts) + "}"
        return "$" + "".join(f'."{p}"' for p in parts)


def _target_test(
    conn: Connection, definition: PredictiveModelDefinition, *, now: datetime, prefix: str
) -> tuple[str, dict[str, Any]]:
    """`e.name = target AND <its property filters>` over events aliased `e`."""
    from store.segments import compile_property_filters

    filters = compile_property_filters(
        definition.target.where, dialect=conn.dialect.name, now=now, param_prefix=prefix
    )
    params = {**filters.params, f"{prefix}event": definition.target.event}
    return f"(e.name = :{prefix}event AND {filters.sql})", params


def _times(sql: str, names: Sequence[str]) -> Any:
    return text(sql).bindparams(*(bindparam(n, type_=UTCDateTime()) for n in names))


def features_sql(
    conn: Connection,
    definition: PredictiveModelDefinition,
    *,
    cutoff: datetime,
    for_customers: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """The feature statement as of `cutoff` (with `:pf_ids`, an expanding list of
    customer ids, when `for_customers`) and its parameters: customer_id, then
    `feature_columns(definition)`, by customer id."""
    sql = _Sql(conn.dialect.name)
    horizon = definition.horizon
    is_target, params = _target_test(conn, definition, now=cutoff, prefix="pft_")
    times = {"pf_cut": cutoff, "pf_h1": cutoff - horizon, "pf_h2": cutoff - 2 * horizon}
    times.update({f"pf_w{d}": cutoff - timedelta(days=d) for d in WINDOW_DAYS})
    params.update(times)
    params["pf_purchase"] = definition.purchase_event
    ids = " AND e.customer_id IN :pf_ids" if for_customers else ""
    purchase = "e.name = :pf_purchase"

    aggregates = [
        "COUNT(*) AS events_total",
        "MIN(e.occurred_at) AS first_at",
        "MAX(e.occurred_at) AS last_at",
        *(
            f"SUM(CASE WHEN e.occurred_at > :pf_w{d} THEN 1 ELSE 0 END) AS events_{d}d"
            for d in WINDOW_DAYS
        ),
        f"SUM(CASE WHEN {purchase} THEN 1 ELSE 0 END) AS frequency",
        f"MAX(CASE WHEN {purchase} THEN e.occurred_at END) AS p_last",
        f"MIN(CASE WHEN {purchase} THEN e.occurred_at END) AS p_first",
        f"SUM(CASE WHEN {is_target} THEN 1 ELSE 0 END) AS target_count",
        f"COUNT(DISTINCT CASE WHEN {is_target} THEN {sql.day('e.occurred_at')} END) AS target_days",
        f"MAX(CASE WHEN {is_target} THEN e.occurred_at END) AS t_last",
        f"MIN(CASE WHEN {is_target} THEN e.occurred_at END) AS t_first",
        f"SUM(CASE WHEN {is_target} AND e.occurred_at > :pf_h1 THEN 1 ELSE 0 END)"
        " AS target_last_horizon",
        f"SUM(CASE WHEN {is_target} AND e.occurred_at > :pf_h2 AND e.occurred_at <= :pf_h1"
        " THEN 1 ELSE 0 END) AS target_prev_horizon",
        *(
            f"SUM(CASE WHEN {is_target} AND e.occurred_at > :pf_w{d} THEN 1 ELSE 0 END)"
            f" AS target_{d}d"
            for d in TARGET_WINDOW_DAYS
        ),
    ]
    if definition.features.value_property is not None:
        params["pf_value"] = sql.path(definition.features.value_property)
        aggregates.append(
            f"SUM(CASE WHEN {purchase} THEN {sql.json_number('e.properties', 'pf_value')} END)"
            " AS monetary"
        )

    # Gaps between consecutive purchases, and which purchase is the last (rn = 1).
    gaps = f"""
        SELECT customer_id, AVG(gap) AS ipi_mean,
               MAX(CASE WHEN rn = 1 THEN gap END) AS ipi_last,
               AVG(CASE WHEN rn <= 3 THEN gap END) AS ipi_recent
        FROM (
            SELECT e.customer_id,
                   {sql.days("e.occurred_at", "LAG(e.occurred_at) OVER (PARTITION BY e.customer_id ORDER BY e.occurred_at, e.id)")} AS gap,
                   ROW_NUMBER() OVER (PARTITION BY e.customer_id
                                      ORDER BY e.occurred_at DESC, e.id DESC) AS rn
            FROM events e
            WHERE {purchase} AND e.occurred_at <= :pf_cut{ids}
        ) g
        WHERE gap IS NOT NULL
        GROUP BY customer_id
    """
    cut = "CAST(:pf_cut AS timestamptz)" if sql.pg else ":pf_cut"
    outputs = {
        "recency_days": sql.days(cut, "a.p_last"),
        "frequency": "a.frequency",
        "monetary": "a.monetary",
        "purchase_tenure_days": sql.days(cut, "a.p_first"),
        "ipi_mean": "iv.ipi_mean",
        "ipi_last": "iv.ipi_last",
        "ipi_recent": "iv.ipi_recent",
        "tenure_days": sql.days(cut, "a.first_at"),
        "days_since_last_event": sql.days(cut, "a.last_at"),
        "events_total": "a.events_total",
        **{f"events_{d}d": f"a.events_{d}d" for d in WINDOW_DAYS},
        "target_count": "a.target_count",
        "target_days": "a.target_days",
        "target_recency_days": sql.days(cut, "a.t_last"),
        "target_tenure_days": sql.days(cut, "a.t_first"),
        "target_last_horizon": "a.target_last_horizon",
        "target_prev_horizon": "a.target_prev_horizon",
        **{f"target_{d}d": f"a.target_{d}d" for d in TARGET_WINDOW_DAYS},
    }
    attribute_join = ""
    for i, name in enumerate(definition.features.attributes):
        params[f"pf_attr_{i}"] = sql.path(name)
        outputs[f"attr:{name}"] = sql.json_feature("c.attributes", f"pf_attr_{i}")
        attribute_join = " LEFT JOIN customers c ON c.id = a.customer_id"
    selected = ", ".join(
        f"CAST({outputs[column]} AS {'double precision' if sql.pg else 'REAL'})"
        for column in feature_columns(definition)
    )
    statement = f"""
        SELECT a.customer_id, {selected}
        FROM (
            SELECT e.customer_id, {", ".join(aggregates)}
            FROM events e
            WHERE e.occurred_at <= :pf_cut{ids}
            GROUP BY e.customer_id
        ) a
        LEFT JOIN ({gaps}) iv ON iv.customer_id = a.customer_id{attribute_join}
        ORDER BY a.customer_id
    """
    bound = _times(statement, list(times))
    if for_customers:
        bound = bound.bindparams(bindparam("pf_ids", expanding=True))
    return bound, params


def read_features(
    conn: Connection,
    definition: PredictiveModelDefinition,
    *,
    cutoff: datetime,
    customer_ids: Sequence[str] | None = None,
) -> FeatureFrame:
    """Every customer's features as of `cutoff` (or only `customer_ids`'), by id."""
    statement, params = features_sql(
        conn, definition, cutoff=cutoff, for_customers=customer_ids is not None
    )
    if customer_ids is not None:
        params["pf_ids"] = list(customer_ids) or [""]
    # On the statement, not the connection: a connection's options outlive the call.
    result = conn.execute(
        statement.execution_options(stream_results=True, yield_per=FETCH_ROWS), params
    )
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    for part in result.partitions(FETCH_ROWS):
        ids.extend(row[0] for row in part)
        chunks.append(np.array([row[1:] for row in part], dtype=np.float64))
    columns = feature_columns(definition)
    values = np.vstack(chunks) if chunks else np.zeros((0, len(columns)))
    return FeatureFrame(customer_ids=ids, columns=columns, values=values)


def read_outcomes(
    conn: Connection,
    definition: PredictiveModelDefinition,
    *,
    cutoff: datetime,
    end: datetime,
) -> set[str]:
    """The customers who did the target (its filters met) in (cutoff, end]."""
    is_target, params = _target_test(conn, definition, now=end, prefix="plt_")
    params.update(pl_start=cutoff, pl_end=end)
    rows = conn.execute(
        _times(
            f"SELECT DISTINCT e.customer_id FROM events e WHERE {is_target}"
            " AND e.occurred_at > :pl_start AND e.occurred_at <= :pl_end",
            ["pl_start", "pl_end"],
        ),
        params,
    )
    return {row[0] for row in rows}


def outcomes_of(frame: FeatureFrame, did: set[str]) -> np.ndarray:
    """1 for each customer of the frame in `did`, else 0 (the frame's order)."""
    return np.fromiter((cid in did for cid in frame.customer_ids), dtype=np.int8, count=len(frame))
