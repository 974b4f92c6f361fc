"""Segments: conditions compiled to SQL, evaluation into memberships and transitions, CRUD.

A condition compiles to one boolean SQL expression over the customers table aliased `c`
(`compile_condition`); that form reads events and memberships through correlated
EXISTS / COUNT subqueries and suits one customer or a few. A whole-segment pass uses a
set-based form of the same condition: each event or segment leaf becomes one aggregate
LEFT JOINed to `c`, so the pass is a single query of joins, whatever the nesting.
Both forms share every leaf's SQL, and tests hold them equal on SQLite and PostgreSQL.

Attribute names `email`, `phone` and `created_at` read the customer columns; every other
name (dotted for nested objects: `address.city`) reads `c.attributes`. Times: SQLite keeps
them as naive UTC text `YYYY-MM-DD HH:MM:SS.ffffff`, so times are bound in that form
there; timestamps inside JSON are compared after normalising both sides to UTC
(milliseconds on SQLite).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from core.conditions import (
    CONDITION_ADAPTER,
    COUNT_BOUNDS,
    AllOf,
    AnyOf,
    AttributeCondition,
    Condition,
    EventCondition,
    NotOf,
    PredictionCondition,
    PropertyFilter,
    SegmentCondition,
    column_kind,
    parse_condition,
    referenced_predictions,
    referenced_segments,
    resolve_moment,
)
from core.durations import parse_duration
from core.errors import Conflict, ErrorDetail, JourneysError, NotFound, ValidationFailed
from core.tables import UTCDateTime
from store.customers import flag_for_realtime
from store.failures import (
    FailureRecord,
    FailureSubject,
    clear_failures,
    failing_keys,
    record_failure,
)
from store.membership_locks import hold_for_pass, keys_held_by_a_pass, segment_key
from store.references import lock_for_removal, refuse_if_used, segment_users, share_lock_clause
from store.transitions import MembershipDiff, apply_membership

DEFAULT_SCHEDULE = "PT5M"
SEGMENT_KINDS = ("rule", "external", "rfm")

# Attribute text that PostgreSQL can cast to timestamptz without raising: fields in range
# here, the day of the month checked in SQL (a 30 February must not stop a pass).
_TS_REGEX = (
    r"^[1-9]\d{3}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[T ]([01]\d|2[0-3]):[0-5]\d"
    r"(:[0-5]\d(\.\d+)?)?(Z|[+-](0\d|1[0-4]):[0-5]\d)$"
)
_compilations = itertools.count(1)


@dataclass(frozen=True)
class CompiledCondition:
    """A boolean SQL expression over customers aliased `c`, and its bind parameters.

    Parameter names are unique per compilation, so several compiled conditions can sit
    in one statement. Datetimes are already in the dialect's stored form.
    `joins` is empty for `compile_condition`; the set-based form puts its LEFT JOINs
    there (to follow `FROM customers c`).
    """

    sql: str
    params: dict[str, Any]
    joins: str = ""


def _as_condition(condition: Condition | dict[str, Any]) -> Condition:
    if isinstance(condition, dict):
        return parse_condition(condition)
    return condition


def compile_condition(
    condition: Condition | dict[str, Any],
    *,
    dialect: str,
    now: datetime,
    param_prefix: str | None = None,
) -> CompiledCondition:
    """Compile `condition` as of `now` into a self-contained boolean expression over `c`.

    `dialect` is `sqlite` or `postgresql` (`conn.dialect.name`). The expression is never
    NULL, reads only `c`, `events` and `segment_memberships`, and gives the same answer
    on both databases.
    """
    compiler = _Compiler(dialect, now, param_prefix, set_based=False)
    sql = compiler.compile(_as_condition(condition))
    return CompiledCondition(sql=sql, params=compiler.params)


def compile_condition_set_based(
    condition: Condition | dict[str, Any], *, dialect: str, now: datetime
) -> CompiledCondition:
    """The same condition for a whole-table pass: `FROM customers c {joins} WHERE {sql}`."""
    compiler = _Compiler(dialect, now, None, set_based=True)
    sql = compiler.compile(_as_condition(condition))
    return CompiledCondition(sql=sql, params=compiler.params, joins=" ".join(compiler.joins))


def compile_property_filters(
    filters: Sequence[PropertyFilter],
    *,
    dialect: str,
    now: datetime,
    event_alias: str = "e",
    param_prefix: str | None = None,
) -> CompiledCondition:
    """The `where` filters of an event condition as one boolean expression over the
    properties of events aliased `event_alias` (TRUE without filters), with the segment
    language's semantics on both databases."""
    compiler = _Compiler(dialect, now, param_prefix, set_based=False)
    parts = [compiler.property_leaf(item, event_alias) for item in filters]
    return CompiledCondition(
        sql=f"({' AND '.join(parts)})" if parts else "1 = 1", params=compiler.params
    )


def compile_event_measure(
    node: EventCondition, *, dialect: str, now: datetime, param_prefix: str | None = None
) -> CompiledCondition:
    """What an event condition compares, for one customer `c`, as a scalar expression built
    from the very filters its condition compiles to: how many matching events (a `count`
    condition, inside its window) or when the latest was (a `last` condition; NULL when
    there is none). Shown beside a condition's result, never used to decide it."""
    compiler = _Compiler(dialect, now, param_prefix, set_based=False)
    if node.count is not None:
        since = None if node.within is None else compiler.now - node.within
        filters = " AND ".join(
            ["e.customer_id = c.id", *compiler.event_filters(node, "e", since=since)]
        )
        sql = f"(SELECT COUNT(*) FROM events e WHERE {filters})"
    else:
        filters = " AND ".join(
            ["e.customer_id = c.id", *compiler.event_filters(node, "e", since=None)]
        )
        sql = f"(SELECT MAX(e.occurred_at) FROM events e WHERE {filters})"
    return CompiledCondition(sql=sql, params=compiler.params)


class _Compiler:
    def __init__(self, dialect: str, now: datetime, prefix: str | None, *, set_based: bool):
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported dialect {dialect!r}")
        if now.tzinfo is None:
            raise ValueError("now must carry a zone")
        self.pg = dialect == "postgresql"
        self.now = now.astimezone(UTC)
        self.prefix = prefix or f"sc{next(_compilations)}_"
        self.set_based = set_based
        self.params: dict[str, Any] = {}
        self.joins: list[str] = []
        self._names = itertools.count(1)

    # -- parameters --
    def bind(self, value: Any) -> str:
        name = f"{self.prefix}{next(self._names)}"
        self.params[name] = value
        return f":{name}"

    def bind_time(self, value: datetime) -> str:
        """A time compared with a stored column (naive UTC text on SQLite)."""
        value = value.astimezone(UTC)
        if self.pg:
            return self.bind(value)
        return self.bind(value.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f"))

    def bind_json_time(self, value: datetime) -> str:
        """A time compared with a normalised JSON timestamp (milliseconds on SQLite)."""
        value = value.astimezone(UTC)
        if self.pg:
            return self.bind(value)
        return self.bind(value.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3])

    def alias(self, stem: str) -> str:
        return f"{stem}{len(self.joins) + 1}"

    # -- tree --
    def compile(self, node: Condition) -> str:
        if isinstance(node, AllOf):
            return "(" + " AND ".join(self.compile(child) for child in node.all) + ")"
        if isinstance(node, AnyOf):
            return "(" + " OR ".join(self.compile(child) for child in node.any) + ")"
        if isinstance(node, NotOf):
            return f"(NOT {self.compile(node.not_)})"
        if isinstance(node, AttributeCondition):
            kind = column_kind(node.attribute)
            if kind is not None:
                return self.column_leaf(node.attribute, kind, node.op, node.value)
            return self.json_leaf("c.attributes", node.attribute, node.op, node.value)
        if isinstance(node, SegmentCondition):
            return self.segment_leaf(node.segment)
        if isinstance(node, EventCondition):
            return self.event_leaf(node)
        if isinstance(node, PredictionCondition):
            return self.prediction_leaf(node)
        raise TypeError(f"not a condition: {node!r}")

    # -- attribute leaves: never NULL, so NOT and ne behave --
    def column_leaf(self, column: str, kind: str, op: str, value: Any) -> str:
        col = f"c.{column}"
        if op == "exists":
            present = f"{col} IS NOT NULL"
            return present if value is not False else f"{col} IS NULL"
        if kind == "timestamp":
            moment = self.bind_time(resolve_moment(value, self.now))
            return f"COALESCE({col} {'<' if op == 'before' else '>'} {moment}, FALSE)"
        ordered = f'{col} COLLATE "C"' if self.pg else col
        if op in ("eq", "ne"):
            expr = f"{col} = {self.bind(value)}"
        elif op in ("gt", "gte", "lt", "lte"):
            expr = f"{ordered} {_SQL_OP[op]} {self.bind(value)}"
        elif op == "in":
            expr = f"{col} IN ({', '.join(self.bind(v) for v in value)})"
        else:  # contains
            expr = f"{'strpos' if self.pg else 'instr'}({col}, {self.bind(value)}) > 0"
        leaf = f"COALESCE({expr}, FALSE)"
        return f"(NOT {leaf})" if op == "ne" else leaf

    def json_leaf(self, source: str, path: str, op: str, value: Any) -> str:
        if self.pg:
            expr = self._pg_json(source, path, op, value)
        else:
            expr = self._sqlite_json(source, path, op, value)
        leaf = f"COALESCE({expr}, FALSE)"
        return f"(NOT {leaf})" if op == "ne" else leaf

    def _sqlite_json(self, source: str, path: str, op: str, value: Any) -> str:
        json_path = self.bind("$" + "".join(f'."{part}"' for part in path.split(".")))
        x = f"json_extract({source}, {json_path})"
        t = f"json_type({source}, {json_path})"
        if op == "exists":
            present = f"({t} IS NOT NULL AND {t} <> 'null')"
            return present if value is not False else f"(NOT {present})"
        if op in ("before", "after"):
            moment = self.bind_json_time(resolve_moment(value, self.now))
            normalised = (
                f"CASE WHEN {t} = 'text'"
                f" AND {x} GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9][T ][0-9][0-9]:[0-9][0-9]*'"
                f" AND ({x} GLOB '*Z' OR {x} GLOB '*[+-][0-9][0-9]:[0-9][0-9]')"
                f" AND date(substr({x}, 1, 10)) = substr({x}, 1, 10)"
                f" THEN strftime('%Y-%m-%d %H:%M:%f', {x}) END"
            )
            return f"{normalised} {'<' if op == 'before' else '>'} {moment}"
        if op in ("eq", "ne"):
            return self._sqlite_equals(x, t, [value])
        if op == "in":
            return self._sqlite_equals(x, t, value)
        if op in ("gt", "gte", "lt", "lte"):
            types = "'text'" if isinstance(value, str) else "'integer', 'real'"
            return f"({t} IN ({types}) AND {x} {_SQL_OP[op]} {self.bind(value)})"
        # contains: a substring of a string, or an element of a list
        element = (
            f"EXISTS (SELECT 1 FROM json_each({source}, {json_path}) j"
            f" WHERE {_sqlite_type_test('j.type', value)} AND j.value = {self.bind(_sqlite_value(value))})"
        )
        in_list = f"({t} = 'array' AND {element})"
        if isinstance(value, str):
            return f"(({t} = 'text' AND instr({x}, {self.bind(value)}) > 0) OR {in_list})"
        return in_list

    def _sqlite_equals(self, x: str, t: str, values: Sequence[Any]) -> str:
        """JSON value equal to one of `values`, types respected (true is not 1)."""
        parts = []
        strings = [v for v in values if isinstance(v, str)]
        numbers = [v for v in values if not isinstance(v, str | bool)]
        booleans = sorted({"true" if v else "false" for v in values if isinstance(v, bool)})
        if strings:
            parts.append(f"({t} = 'text' AND {x} IN ({', '.join(self.bind(v) for v in strings)}))")
        if numbers:
            parts.append(
                f"({t} IN ('integer', 'real') AND {x} IN ({', '.join(self.bind(v) for v in numbers)}))"
            )
        if booleans:
            parts.append(f"{t} IN ({', '.join(repr(b) for b in booleans)})")
        return "(" + " OR ".join(parts) + ")"

    def _pg_json(self, source: str, path: str, op: str, value: Any) -> str:
        x = source + "".join(f" -> CAST({self.bind(part)} AS text)" for part in path.split("."))
        x = f"({x})"
        t = f"jsonb_typeof({x})"
        if op == "exists":
            present = f"({x} IS NOT NULL AND {t} <> 'null')"
            return present if value is not False else f"(NOT COALESCE({present}, FALSE))"
        if op in ("before", "after"):
            moment = self.bind_json_time(resolve_moment(value, self.now))
            raw = f"({x} #>> '{{}}')"
            last_day = (
                f"EXTRACT(DAY FROM CAST(substr({raw}, 1, 7) || '-01' AS date)"
                " + INTERVAL '1 month' - INTERVAL '1 day')"
            )
            # Nested CASEs: PostgreSQL evaluates a CASE's branches in order, never an AND's.
            normalised = (
                f"CASE WHEN {t} = 'string' AND {raw} ~ {self.bind(_TS_REGEX)}"
                f" THEN CASE WHEN CAST(substr({raw}, 9, 2) AS integer) <= {last_day}"
                f" THEN CAST({raw} AS timestamptz) END END"
            )
            return f"{normalised} {'<' if op == 'before' else '>'} {moment}"
        if op in ("eq", "ne"):
            return f"{x} = CAST({self.bind(json.dumps(value))} AS jsonb)"
        if op == "in":
            return (
                f"{x} IN ({', '.join(f'CAST({self.bind(json.dumps(v))} AS jsonb)' for v in value)})"
            )
        if op in ("gt", "gte", "lt", "lte"):
            if isinstance(value, str):
                return (
                    f"CASE WHEN {t} = 'string' THEN ({x} #>> '{{}}') COLLATE \"C\""
                    f" {_SQL_OP[op]} CAST({self.bind(value)} AS text) END"
                )
            return (
                f"CASE WHEN {t} = 'number' THEN CAST({x} AS numeric)"
                f" {_SQL_OP[op]} CAST({self.bind(value)} AS numeric) END"
            )
        element = f"{x} @> jsonb_build_array(CAST({self.bind(json.dumps(value))} AS jsonb))"
        if isinstance(value, str):
            return (
                f"CASE WHEN {t} = 'string' THEN strpos({x} #>> '{{}}', {self.bind(value)}) > 0"
                f" WHEN {t} = 'array' THEN {element} ELSE FALSE END"
            )
        return f"CASE WHEN {t} = 'array' THEN {element} ELSE FALSE END"

    # -- segment leaves --
    def segment_leaf(self, slug: str) -> str:
        bound = self.bind(slug)
        if not self.set_based:
            return (
                "EXISTS (SELECT 1 FROM segment_memberships sm"
                f" WHERE sm.segment_slug = {bound} AND sm.customer_id = c.id)"
            )
        alias = self.alias("sm")
        self.joins.append(
            f"LEFT JOIN segment_memberships {alias}"
            f" ON {alias}.segment_slug = {bound} AND {alias}.customer_id = c.id"
        )
        return f"({alias}.customer_id IS NOT NULL)"

    # -- event leaves --
    def event_filters(
        self, node: EventCondition, alias: str, *, since: datetime | None
    ) -> list[str]:
        where = []
        if node.event != "*":
            where.append(f"{alias}.name = {self.bind(node.event)}")
        if since is not None:
            where.append(f"{alias}.occurred_at > {self.bind_time(since)}")
        if node.between is not None:
            # A fixed window [from, to); still nothing after `now`, as every leaf reads.
            start, end = node.between
            where.append(f"{alias}.occurred_at >= {self.bind_time(start)}")
            where.append(f"{alias}.occurred_at < {self.bind_time(end)}")
        where.append(f"{alias}.occurred_at <= {self.bind_time(self.now)}")
        where.extend(self.property_leaf(f, alias) for f in node.where)
        return where

    def property_leaf(self, item: PropertyFilter, alias: str) -> str:
        return self.json_leaf(f"{alias}.properties", item.property, item.op, item.value)

    def event_leaf(self, node: EventCondition) -> str:
        if node.count is not None:
            return self.count_leaf(node)
        return self.last_leaf(node)

    def count_leaf(self, node: EventCondition) -> str:
        bounds = {
            k: getattr(node.count, k) for k in COUNT_BOUNDS if getattr(node.count, k) is not None
        }
        since = None if node.within is None else self.now - node.within
        if self.set_based:
            alias = self.alias("ev")
            filters = " AND ".join(self.event_filters(node, "e", since=since))
            self.joins.append(
                f"LEFT JOIN (SELECT e.customer_id, COUNT(*) AS n FROM events e WHERE {filters}"
                f" GROUP BY e.customer_id) {alias} ON {alias}.customer_id = c.id"
            )
            counted = f"COALESCE({alias}.n, 0)"
            return (
                "("
                + " AND ".join(f"{counted} {_COUNT_OP[k]} {int(v)}" for k, v in bounds.items())
                + ")"
            )
        filters = " AND ".join(
            ["e.customer_id = c.id", *self.event_filters(node, "e", since=since)]
        )
        if bounds in ({"gte": 1}, {"gt": 0}):
            return f"EXISTS (SELECT 1 FROM events e WHERE {filters})"
        if bounds in ({"eq": 0}, {"lt": 1}, {"lte": 0}):
            return f"(NOT EXISTS (SELECT 1 FROM events e WHERE {filters}))"
        # Counting stops one past the largest bound: enough to decide every comparison.
        cap = max(bounds.values()) + 1
        counted = (
            f"(SELECT COUNT(*) FROM (SELECT 1 FROM events e WHERE {filters} LIMIT {int(cap)}) q)"
        )
        return (
            "("
            + " AND ".join(f"{counted} {_COUNT_OP[k]} {int(v)}" for k, v in bounds.items())
            + ")"
        )

    def last_leaf(self, node: EventCondition) -> str:
        assert node.last is not None
        more, less = node.last.more_than, node.last.less_than
        parts = []
        if self.set_based:
            alias = self.alias("ev")
            # With only less_than, older events cannot matter: aggregate the recent ones.
            since = self.now - less if (less is not None and more is None) else None
            filters = " AND ".join(self.event_filters(node, "e", since=since))
            self.joins.append(
                f"LEFT JOIN (SELECT e.customer_id, MAX(e.occurred_at) AS last_at FROM events e"
                f" WHERE {filters} GROUP BY e.customer_id) {alias} ON {alias}.customer_id = c.id"
            )
            if more is not None:
                parts.append(
                    f"COALESCE({alias}.last_at <= {self.bind_time(self.now - more)}, FALSE)"
                )
            if less is not None:
                parts.append(
                    f"COALESCE({alias}.last_at > {self.bind_time(self.now - less)}, FALSE)"
                )
            return "(" + " AND ".join(parts) + ")"
        filters = " AND ".join(["e.customer_id = c.id", *self.event_filters(node, "e", since=None)])
        if more is not None:
            latest = f"(SELECT MAX(e.occurred_at) FROM events e WHERE {filters})"
            parts.append(f"COALESCE({latest} <= {self.bind_time(self.now - more)}, FALSE)")
        if less is not None:
            recent = " AND ".join(
                ["e.customer_id = c.id", *self.event_filters(node, "e", since=self.now - less)]
            )
            parts.append(f"EXISTS (SELECT 1 FROM events e WHERE {recent})")
        return "(" + " AND ".join(parts) + ")"

    # -- prediction leaves: the stored score of the customer on a predictive model --
    def prediction_leaf(self, node: PredictionCondition) -> str:
        slug = self.bind(node.prediction)

        def test(alias: str) -> str:
            if node.level is not None:
                return f"{alias}.level = {self.bind(node.level)}"
            assert node.op is not None and node.value is not None
            return f"{alias}.probability {_SQL_OP[node.op]} {self.bind(float(node.value))}"

        if not self.set_based:
            return (
                "EXISTS (SELECT 1 FROM prediction_scores ps"
                f" WHERE ps.model_slug = {slug} AND ps.customer_id = c.id AND {test('ps')})"
            )
        alias = self.alias("ps")
        self.joins.append(
            f"LEFT JOIN prediction_scores {alias}"
            f" ON {alias}.model_slug = {slug} AND {alias}.customer_id = c.id"
        )
        return f"COALESCE({test(alias)}, FALSE)"


_SQL_OP = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "=", "ne": "<>"}
_COUNT_OP = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "="}


def _sqlite_type_test(column: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{column} = {'true' if value else 'false'!r}"
    if isinstance(value, str):
        return f"{column} = 'text'"
    return f"{column} IN ('integer', 'real')"


def _sqlite_value(value: Any) -> Any:
    # json_each gives booleans as 1 / 0; the type test above tells them from numbers.
    return int(value) if isinstance(value, bool) else value


# --- segment rows ------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentRecord:
    slug: str
    name: str
    kind: str
    condition: dict[str, Any] | None
    schedule: str | None
    model_slug: str | None
    version: int
    created_at: datetime
    updated_at: datetime
    evaluated_at: datetime | None
    evaluated_version: int | None = None

    @property
    def schedule_or_default(self) -> str:
        return self.schedule or DEFAULT_SCHEDULE

    @property
    def evaluation_state(self) -> Literal["evaluating", "ready"]:
        """A rule segment is ready once a full pass has evaluated its current version;
        external and RFM segments are whatever was reported or scored."""
        if self.kind == "rule" and self.evaluated_version != self.version:
            return "evaluating"
        return "ready"


_SEGMENT_COLUMNS = (
    "slug, name, kind, condition, schedule, model_slug, version, created_at, updated_at,"
    " evaluated_at, evaluated_version"
)
_TIMES = ("created_at", "updated_at", "evaluated_at")


def _times() -> list[Any]:
    """Typed `:now`, so SQLite gets the stored naive-UTC text form."""
    return [bindparam("now", type_=UTCDateTime())]


def _record(row: Any) -> SegmentRecord:
    data = dict(row._mapping)
    for key in _TIMES:
        data[key] = UTCDateTime().process_result_value(data[key], None)
    if isinstance(data["condition"], str):
        data["condition"] = json.loads(data["condition"])
    return SegmentRecord(**data)


def get_segment(conn: Connection, *, slug: str) -> SegmentRecord:
    """The segment `slug`; NotFound if there is none."""
    row = conn.execute(
        text(f"SELECT {_SEGMENT_COLUMNS} FROM segments WHERE slug = :slug"), {"slug": slug}
    ).first()
    if row is None:
        raise NotFound(f"no segment {slug!r}", field="slug")
    return _record(row)


def list_segments(conn: Connection, *, kind: str | None = None) -> list[SegmentRecord]:
    """Every segment (of `kind`), by slug."""
    sql = f"SELECT {_SEGMENT_COLUMNS} FROM segments"
    params: dict[str, Any] = {}
    if kind is not None:
        sql += " WHERE kind = :kind"
        params["kind"] = kind
    return [_record(r) for r in conn.execute(text(sql + " ORDER BY slug"), params)]


def _json_param(value: dict[str, Any] | None) -> Any:
    return None if value is None else json.dumps(value)


def _condition_cast(conn: Connection) -> str:
    return "CAST(:condition AS jsonb)" if conn.dialect.name == "postgresql" else ":condition"


def validate_definition(
    conn: Connection, *, slug: str, condition: Any, path: str = "condition"
) -> Condition:
    """Parse a rule segment's condition and check its references: every segment it names
    exists, and saving it would close no cycle. Errors name the offending node's path."""
    parsed = parse_condition(condition, path=path)
    unknown = _unknown_predictions(conn, parsed, path)
    if unknown:
        raise ValidationFailed(unknown)
    refs = referenced_segments(parsed, path)
    if not refs:
        return parsed
    _hold_referenced(conn, [ref for _, ref in refs])
    known = {r.slug: r for r in list_segments(conn)}
    errors: list[ErrorDetail] = []
    for node_path, ref in refs:
        if ref == slug:
            errors.append(
                ErrorDetail("cycle", f"segment {slug!r} cannot include itself", node_path)
            )
        elif ref not in known:
            errors.append(
                ErrorDetail("unknown_segment", f"no segment {ref!r}", f"{node_path}.segment")
            )
    if errors:
        raise ValidationFailed(errors)
    graph = _dependency_graph(known.values())
    graph[slug] = {ref for _, ref in refs}
    for node_path, ref in refs:
        chain = _path_to(graph, start=ref, goal=slug)
        if chain:
            loop = " -> ".join([slug, *chain])
            errors.append(ErrorDetail("cycle", f"segments would form a cycle: {loop}", node_path))
    if errors:
        raise ValidationFailed(errors)
    return parsed


def _unknown_predictions(conn: Connection, parsed: Condition, path: str) -> list[ErrorDetail]:
    """One error per predictive model the condition names that does not exist. The named
    models are share-locked (PostgreSQL), so a delete waits for this save."""
    refs = referenced_predictions(parsed, path)
    if not refs:
        return []
    known = set(
        conn.execute(
            text(
                f"SELECT slug FROM prediction_models WHERE slug IN :slugs{share_lock_clause(conn)}"
            ).bindparams(bindparam("slugs", expanding=True)),
            {"slugs": sorted({slug for _, slug in refs})},
        ).scalars()
    )
    return [
        ErrorDetail(
            "unknown_prediction", f"no predictive model {slug!r}", f"{node_path}.prediction"
        )
        for node_path, slug in refs
        if slug not in known
    ]


def _hold_referenced(conn: Connection, slugs: list[str]) -> None:
    """Share-lock the named segments (PostgreSQL) so a delete waits for this save."""
    lock = share_lock_clause(conn)
    if lock:
        conn.execute(
            text(f"SELECT 1 FROM segments WHERE slug IN :slugs{lock}").bindparams(
                bindparam("slugs", expanding=True)
            ),
            {"slugs": sorted(set(slugs))},
        )


def _dependency_graph(segments: Any) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for seg in segments:
        graph[seg.slug] = _named_segments(seg.condition) if seg.kind == "rule" else set()
    return graph


def _named_segments(stored: Any) -> set[str]:
    """Slugs a stored condition names, read from its JSON without validating it: one
    segment that no longer validates must not keep the others from being ordered."""
    found: set[str] = set()
    pending = [stored]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if isinstance(node.get("segment"), str):
                found.add(node["segment"])
            pending.extend(node.get(key) for key in ("all", "any", "not"))
        elif isinstance(node, list):
            pending.extend(node)
    return found


def _path_to(graph: dict[str, set[str]], *, start: str, goal: str) -> list[str] | None:
    """A dependency chain from `start` to `goal` (both included), or None."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, chain = stack.pop()
        if node == goal:
            return chain
        if node in seen:
            continue
        seen.add(node)
        stack.extend((nxt, [*chain, nxt]) for nxt in sorted(graph.get(node, ())))
    return None


def validate_schedule(schedule: str | None, *, field_name: str = "schedule") -> str | None:
    if schedule is None:
        return None
    try:
        every = parse_duration(schedule)
    except ValueError as exc:
        raise ValidationFailed([ErrorDetail("invalid_value", str(exc), field_name)]) from exc
    if every.total_seconds() < 60:
        raise ValidationFailed(
            [
                ErrorDetail(
                    "invalid_value", "a segment is evaluated at most once a minute", field_name
                )
            ]
        )
    return schedule


def create_segment(
    conn: Connection,
    *,
    slug: str,
    name: str,
    kind: str,
    now: datetime,
    condition: Any = None,
    schedule: str | None = None,
    model_slug: str | None = None,
) -> SegmentRecord:
    """Store a new segment. A rule segment's condition is validated (`validate_definition`);
    external and rfm segments carry none. Conflict if the slug is taken."""
    if kind not in SEGMENT_KINDS:
        raise ValidationFailed(
            [ErrorDetail("invalid_value", f"kind is one of {SEGMENT_KINDS}", "kind")]
        )
    if conn.execute(text("SELECT 1 FROM segments WHERE slug = :slug"), {"slug": slug}).first():
        raise Conflict(f"segment {slug!r} exists already", field="slug")
    stored = _definition_for(conn, slug=slug, kind=kind, condition=condition)
    conn.execute(
        text(
            "INSERT INTO segments (slug, name, kind, condition, model_slug, schedule, version,"
            f" created_at, updated_at) VALUES (:slug, :name, :kind, {_condition_cast(conn)},"
            " :model_slug, :schedule, 1, :now, :now)"
        ).bindparams(*_times()),
        {
            "slug": slug,
            "name": name,
            "kind": kind,
            "condition": _json_param(stored),
            "model_slug": model_slug,
            "schedule": validate_schedule(schedule) if kind == "rule" else None,
            "now": now,
        },
    )
    return get_segment(conn, slug=slug)


def _definition_for(
    conn: Connection, *, slug: str, kind: str, condition: Any
) -> dict[str, Any] | None:
    if kind != "rule":
        if condition is not None:
            raise ValidationFailed(
                [ErrorDetail("invalid", f"an {kind} segment has no condition", "condition")]
            )
        return None
    if condition is None:
        raise ValidationFailed(
            [ErrorDetail("missing_field", "a rule segment needs a condition", "condition")]
        )
    parsed = validate_definition(conn, slug=slug, condition=condition)
    return CONDITION_ADAPTER.dump_python(parsed, mode="json", by_alias=True, exclude_none=True)


def update_segment(
    conn: Connection,
    *,
    slug: str,
    name: str,
    now: datetime,
    condition: Any = None,
    schedule: str | None = None,
) -> SegmentRecord:
    """Replace a rule or external segment's definition (version + 1). Its members stay
    until the next evaluation."""
    current = get_segment(conn, slug=slug)
    if current.kind == "rfm":
        raise Conflict(
            f"{slug!r} belongs to RFM model {current.model_slug!r}; change the model", field="slug"
        )
    stored = _definition_for(conn, slug=slug, kind=current.kind, condition=condition)
    conn.execute(
        text(
            f"UPDATE segments SET name = :name, condition = {_condition_cast(conn)},"
            " schedule = :schedule, version = version + 1, updated_at = :now WHERE slug = :slug"
        ).bindparams(*_times()),
        {
            "slug": slug,
            "name": name,
            "condition": _json_param(stored),
            "schedule": validate_schedule(schedule) if current.kind == "rule" else None,
            "now": now,
        },
    )
    return get_segment(conn, slug=slug)


def delete_segment(conn: Connection, *, slug: str) -> None:
    """Delete a rule or external segment and its memberships (its transitions stay as
    history). Conflict `in_use` naming every user while a segment, an RFM model's
    targeting or a journey not archived names it (`store.references`)."""
    current = get_segment(conn, slug=slug)
    if current.kind == "rfm":
        raise Conflict(f"{slug!r} belongs to RFM model {current.model_slug!r}", field="slug")
    lock_for_removal(conn, table="segments", column="slug", keys=[slug])
    refuse_if_used(segment_users(conn, slugs=[slug]), field="slug")
    conn.execute(text("DELETE FROM segment_memberships WHERE segment_slug = :slug"), {"slug": slug})
    conn.execute(text("DELETE FROM segments WHERE slug = :slug"), {"slug": slug})


# --- evaluation --------------------------------------------------------------------------


def _source(kind: str, slug: str) -> str:
    # segment_transitions.source holds 40 characters.
    return f"{kind}:{slug}"[:40]


def _rule_condition(segment: SegmentRecord) -> Condition:
    if segment.kind != "rule" or segment.condition is None:
        raise Conflict(f"segment {segment.slug!r} is {segment.kind}, not rule-based", field="slug")
    return CONDITION_ADAPTER.validate_python(segment.condition)


def segment_members_sql(
    condition: Condition, *, dialect: str, now: datetime, slug_param: str
) -> CompiledCondition:
    """The one SELECT of `(segment_slug, customer_id)` a whole-segment pass stages."""
    compiled = compile_condition_set_based(condition, dialect=dialect, now=now)
    sql = (
        f"SELECT CAST(:{slug_param} AS VARCHAR(200)) AS segment_slug, c.id AS customer_id"
        f" FROM customers c {compiled.joins} WHERE {compiled.sql}"
    )
    return CompiledCondition(sql=sql, params=compiled.params)


def evaluate_segment(conn: Connection, *, slug: str, now: datetime) -> MembershipDiff:
    """Evaluate rule segment `slug` as of `now` in one query and make its memberships
    match, writing one transition per change (source `segment-pass:{slug}`). Runs in the
    caller's transaction; a rerun with nothing changed writes nothing."""
    hold_for_pass(conn, key=segment_key(slug))
    segment = get_segment(conn, slug=slug)
    staged = segment_members_sql(
        _rule_condition(segment), dialect=conn.dialect.name, now=now, slug_param="seg_slug"
    )
    diff = apply_membership(
        conn,
        segment_slugs=[slug],
        staged_sql=staged.sql,
        params={**staged.params, "seg_slug": slug},
        source=_source("segment-pass", slug),
        now=now,
    )
    conn.execute(
        text(
            "UPDATE segments SET evaluated_at = :now, evaluated_version = :version"
            " WHERE slug = :slug"
        ).bindparams(*_times()),
        {"slug": slug, "now": now, "version": segment.version},
    )
    return diff


@dataclass(frozen=True)
class SegmentPreview:
    count: int
    sample: list[str] = field(default_factory=list)


def preview(
    conn: Connection, *, condition: Condition | dict[str, Any], now: datetime, sample: int = 20
) -> SegmentPreview:
    """How many customers match `condition` now, and up to `sample` of their ids (by id)."""
    compiled = compile_condition_set_based(condition, dialect=conn.dialect.name, now=now)
    base = f"FROM customers c {compiled.joins} WHERE {compiled.sql}"
    count = conn.execute(text(f"SELECT COUNT(*) {base}"), compiled.params).scalar_one()
    ids = conn.execute(
        text(f"SELECT c.id {base} ORDER BY c.id LIMIT :preview_limit"),
        {**compiled.params, "preview_limit": sample},
    ).scalars()
    return SegmentPreview(count=int(count), sample=list(ids))


def customer_matches(
    conn: Connection, *, customer_id: str, condition: Condition | dict[str, Any], now: datetime
) -> bool:
    """Whether customer `customer_id` matches `condition` as of `now` (False if unknown)."""
    compiled = compile_condition(condition, dialect=conn.dialect.name, now=now)
    row = conn.execute(
        text(f"SELECT 1 FROM customers c WHERE c.id = :match_customer AND {compiled.sql}"),
        {**compiled.params, "match_customer": customer_id},
    ).first()
    return row is not None


def _rule_levels(segments: Sequence[SegmentRecord]) -> list[list[SegmentRecord]]:
    """Rule segments grouped so every segment comes after the rule segments it names."""
    by_slug = {s.slug: s for s in segments if s.kind == "rule"}
    graph = {
        slug: deps & by_slug.keys() for slug, deps in _dependency_graph(by_slug.values()).items()
    }
    level: dict[str, int] = {}

    def depth(slug: str, trail: frozenset[str]) -> int:
        if slug not in level:
            if slug in trail:  # saved definitions have no cycles; never loop on a bad row
                return 0
            level[slug] = 1 + max((depth(d, trail | {slug}) for d in graph[slug]), default=-1)
        return level[slug]

    for slug in sorted(by_slug):
        depth(slug, frozenset())
    levels: list[list[SegmentRecord]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for slug in sorted(by_slug):
        levels[level[slug]].append(by_slug[slug])
    return levels


def reevaluate_customers(
    conn: Connection, *, customer_ids: Sequence[str], now: datetime
) -> MembershipDiff:
    """Real time: re-evaluate every rule segment for just these customers, segments that
    name other segments after those, and record their transitions (source
    `segment-realtime`). Any rule segment may read an event or attribute of theirs, so all
    are checked. Each dependency level costs one read over the few customers, and the
    membership diff only when that read shows a change."""
    ids = sorted(set(customer_ids))
    if not ids:
        return MembershipDiff(0, 0)
    failing = failing_keys(conn, kind="segment", stage="realtime")
    entries = exits = 0
    for level in _rule_levels(list_segments(conn, kind="rule")):
        # A segment set aside waits for its retry time; the others go on without it.
        level = [s for s in level if failing.get(s.slug, now) <= now]
        # A segment a full pass is writing is left to it: these customers come back.
        held = keys_held_by_a_pass(conn, keys=[segment_key(s.slug) for s in level])
        if held:
            flag_for_realtime(conn, customer_ids=ids)
            level = [s for s in level if segment_key(s.slug) not in held]
        if not level:
            continue
        diff = _reevaluate_level_apart_from_poison(conn, level, ids, now)
        clear_failures(
            conn,
            kind="segment",
            stage="realtime",
            keys=[s.slug for s in level if s.slug in failing],
        )
        entries += diff.entries
        exits += diff.exits
    return MembershipDiff(entries=entries, exits=exits)


def _reevaluate_level_apart_from_poison(
    conn: Connection, level: list[SegmentRecord], ids: list[str], now: datetime
) -> MembershipDiff:
    """The level re-evaluated; a segment that fails whoever the customers are is set
    aside and the level runs without it. A failure that no segment has alone comes from
    the customers' data: it is raised, for the caller to find the customer."""
    try:
        with conn.begin_nested():
            return _reevaluate_level(conn, level, ids, now)
    except Exception:  # noqa: BLE001 - decide below whose failure it is
        healthy = [s for s in level if _runs_on_no_customer(conn, s, now)]
        if len(healthy) == len(level):
            raise
    return _reevaluate_level(conn, healthy, ids, now) if healthy else MembershipDiff(0, 0)


def _runs_on_no_customer(conn: Connection, segment: SegmentRecord, now: datetime) -> bool:
    """Whether the segment's own query runs at all; one that does not is set aside."""
    try:
        with conn.begin_nested():
            staged_sql, params = _level_query(conn, [segment], now)
            conn.execute(
                text(f"SELECT COUNT(*) FROM ({staged_sql}) q").bindparams(
                    bindparam("rt_ids", expanding=True)
                ),
                {**params, "rt_ids": [""]},  # no customer has an empty id
            )
        return True
    except Exception as exc:  # noqa: BLE001 - the segment is the poison
        record_failure(
            conn, subject=FailureSubject("segment", segment.slug, "realtime"), error=exc, now=now
        )
        return False


def _level_query(
    conn: Connection, level: Sequence[SegmentRecord], now: datetime
) -> tuple[str, dict[str, Any]]:
    selects, params = [], {}
    for i, segment in enumerate(level):
        compiled = compile_condition(_rule_condition(segment), dialect=conn.dialect.name, now=now)
        selects.append(
            f"SELECT CAST(:rt_slug_{i} AS VARCHAR(200)) AS segment_slug, c.id AS customer_id"
            f" FROM customers c WHERE c.id IN :rt_ids AND {compiled.sql}"
        )
        params.update(compiled.params)
        params[f"rt_slug_{i}"] = segment.slug
    return " UNION ALL ".join(selects), params


def _reevaluate_level(
    conn: Connection, level: Sequence[SegmentRecord], ids: list[str], now: datetime
) -> MembershipDiff:
    staged_sql, params = _level_query(conn, level, now)
    params["rt_ids"] = ids
    if _memberships_unchanged(conn, level, staged_sql, params):
        return MembershipDiff(0, 0)  # the usual case: two reads instead of the diff's writes
    return apply_membership(
        conn,
        segment_slugs=[s.slug for s in level],
        staged_sql=staged_sql,
        params=params,
        expanding=("rt_ids",),
        source="segment-realtime",
        now=now,
        customer_ids=ids,
    )


def _memberships_unchanged(
    conn: Connection,
    level: Sequence[SegmentRecord],
    staged_sql: str,
    params: dict[str, Any],
) -> bool:
    # One round trip for both sides: under load each round trip is what costs.
    rows = conn.execute(
        text(
            f"SELECT 'match' AS side, q.segment_slug, q.customer_id FROM ({staged_sql}) q"
            " UNION ALL SELECT 'member', m.segment_slug, m.customer_id FROM segment_memberships m"
            " WHERE m.segment_slug IN :rt_level_slugs AND m.customer_id IN :rt_ids"
        ).bindparams(
            bindparam("rt_ids", expanding=True), bindparam("rt_level_slugs", expanding=True)
        ),
        {**params, "rt_level_slugs": [s.slug for s in level]},
    ).all()
    matching = {(r[1], r[2]) for r in rows if r[0] == "match"}
    return matching == {(r[1], r[2]) for r in rows if r[0] == "member"}


def dependents_in_order(conn: Connection, *, segment_slugs: Sequence[str]) -> list[str]:
    """Rule segments that name any of `segment_slugs`, directly or through others,
    each after the segments it names."""
    segments = list_segments(conn)
    graph = _dependency_graph(segments)
    wanted = set(segment_slugs)
    affected: set[str] = set()
    changed = True
    while changed:
        changed = False
        for slug, deps in graph.items():
            if slug not in affected and deps & (wanted | affected):
                affected.add(slug)
                changed = True
    return [s.slug for level in _rule_levels(segments) for s in level if s.slug in affected]


def evaluate_set_aside_on_failure(
    conn: Connection, *, slug: str, now: datetime
) -> MembershipDiff | FailureRecord:
    """`evaluate_segment` in a savepoint: a segment that fails is set aside with its error
    (stage `segment_pass`) and its failure returned instead of raised; a success clears
    an earlier failure."""
    try:
        with conn.begin_nested():
            diff = evaluate_segment(conn, slug=slug, now=now)
    except JourneysError:
        raise  # the caller's mistake (an unknown slug), not the segment's
    except Exception as exc:  # noqa: BLE001 - set aside, never stop the others
        return record_failure(
            conn, subject=FailureSubject("segment", slug, "segment_pass"), error=exc, now=now
        )
    clear_failures(conn, kind="segment", stage="segment_pass", keys=[slug])
    return diff


def evaluate_dependents(
    conn: Connection, *, segment_slugs: Sequence[str], now: datetime
) -> dict[str, MembershipDiff | FailureRecord]:
    """Re-evaluate every rule segment that depends on any of `segment_slugs`,
    transitively, in dependency order; call after an RFM pass with the model's label
    segments. Returns each slug's diff (or its failure: one failing dependent is set
    aside and the others still run), in the order run."""
    return {
        slug: evaluate_set_aside_on_failure(conn, slug=slug, now=now)
        for slug in dependents_in_order(conn, segment_slugs=segment_slugs)
    }


def due_segments(conn: Connection, *, now: datetime) -> list[str]:
    """Rule segments whose schedule interval has passed since they were last evaluated."""
    return [
        s.slug
        for level in _rule_levels(list_segments(conn, kind="rule"))
        for s in level
        if s.evaluated_at is None or s.evaluated_at + parse_duration(s.schedule_or_default) <= now
    ]


# --- members and transitions -------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    customer_id: str
    since: datetime


def member_counts(conn: Connection, *, slugs: Sequence[str]) -> dict[str, int]:
    """How many members each of `slugs` has now (an index-only count per segment)."""
    if not slugs:
        return {}
    rows = conn.execute(
        text(
            "SELECT segment_slug, COUNT(*) FROM segment_memberships"
            " WHERE segment_slug IN :slugs GROUP BY segment_slug"
        ).bindparams(bindparam("slugs", expanding=True)),
        {"slugs": sorted(set(slugs))},
    )
    counts = {slug: 0 for slug in slugs}
    counts.update({slug: count for slug, count in rows})
    return counts


def list_members(
    conn: Connection, *, slug: str, limit: int, after: str | None = None
) -> list[Member]:
    """Up to `limit` members of `slug` by customer id, starting after `after`."""
    sql = "SELECT customer_id, since FROM segment_memberships WHERE segment_slug = :slug"
    params: dict[str, Any] = {"slug": slug, "limit": limit}
    if after is not None:
        sql += " AND customer_id > :after"
        params["after"] = after
    rows = conn.execute(text(sql + " ORDER BY customer_id LIMIT :limit"), params)
    convert = UTCDateTime().process_result_value
    return [Member(r.customer_id, convert(r.since, None)) for r in rows]  # type: ignore[arg-type]


def iter_members(conn: Connection, *, slug: str, batch: int = 5_000) -> Iterator[Member]:
    """Every member of `slug`, paged through by customer id."""
    after: str | None = None
    while True:
        page = list_members(conn, slug=slug, limit=batch, after=after)
        yield from page
        if len(page) < batch:
            return
        after = page[-1].customer_id


@dataclass(frozen=True)
class Transition:
    id: int
    customer_id: str
    kind: str
    source: str
    occurred_at: datetime


def list_transitions(
    conn: Connection,
    *,
    slug: str,
    limit: int,
    after_id: int | None = None,
    since_time: datetime | None = None,
) -> list[Transition]:
    """Transitions of `slug` in the order written: those with id > `after_id`, or
    those at or after `since_time`."""
    sql = (
        "SELECT id, customer_id, kind, source, occurred_at FROM segment_transitions"
        " WHERE segment_slug = :slug"
    )
    params: dict[str, Any] = {"slug": slug, "limit": limit}
    binds = []
    if after_id is not None:
        sql += " AND id > :after_id"
        params["after_id"] = after_id
    if since_time is not None:
        sql += " AND occurred_at >= :since_time"
        params["since_time"] = since_time
        binds.append(bindparam("since_time", type_=UTCDateTime()))
    rows = conn.execute(text(sql + " ORDER BY id LIMIT :limit").bindparams(*binds), params)
    convert = UTCDateTime().process_result_value
    return [
        Transition(r.id, r.customer_id, r.kind, r.source, convert(r.occurred_at, None))  # type: ignore[arg-type]
        for r in rows
    ]
