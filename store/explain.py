"""Why a customer is where they are: a condition tree with every node evaluated for them.

Each node's result comes from that node's own compiled SQL (`store.segments`
`compile_condition`, the form real-time evaluation, journey branches and decisions use),
run for this one customer: there is no second evaluator that could disagree with the
product. Beside each result stands the value the node compared, read for display only:
the attribute's value, how many matching events (or when the latest was), the segment
membership.

Subjects: a segment (rule segments by their condition; RFM label segments by the
customer's scores and the map rule that gave the label; external segments by what was
reported), a journey's trigger or one of its branch steps (each branch's condition, and
which one wins now), and a personalisation campaign (each experience's audience, the
first that matches, and the control group).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import text
from sqlalchemy.engine import Connection

from core.condition_text import node_text
from core.conditions import (
    AllOf,
    AnyOf,
    AttributeCondition,
    Condition,
    EventCondition,
    NotOf,
    SegmentCondition,
    column_kind,
    iter_nodes,
)
from core.errors import ErrorDetail, NotFound, ValidationFailed
from core.journeys import BranchStep, JourneyDefinition
from core.personalization import BUCKETS, bucket_of
from core.rfm import SegmentRule
from core.tables import JSONType, UTCDateTime
from store.rfm_models import customer_scores, get_model
from store.segments import compile_condition, compile_event_measure, get_segment

# A statement's bind parameters stay well under SQLite's limit (32,766); a tree whose
# nodes need more is evaluated in several statements.
_PARAMS_PER_STATEMENT = 20_000
_KINDS = {
    AllOf: "all",
    AnyOf: "any",
    NotOf: "not",
    AttributeCondition: "attribute",
    SegmentCondition: "segment",
    EventCondition: "event",
}
_to_time = UTCDateTime().process_result_value


class NodeExplanation(BaseModel):
    """One node of a condition, evaluated for the customer."""

    path: str = Field(description="the node's JSON path, e.g. condition.all[1]")
    kind: Literal["all", "any", "not", "attribute", "segment", "event"]
    text: str = Field(description="the node in words, e.g. total_spent > 500")
    result: bool = Field(description="whether the node holds for the customer now")
    value: Any = Field(
        default=None,
        description="what the node compared: the attribute's value, the number of matching"
        " events or the time of the latest, the membership's start (null: none)",
    )
    value_text: str = Field(description="the value in words, e.g. total_spent is 620.5")
    children: list[NodeExplanation] = Field(default_factory=list)


class ExplainedCondition(BaseModel):
    label: str = Field(description="which condition: condition, branch 1 -> vip, Champions")
    result: bool
    tree: NodeExplanation


class Explanation(BaseModel):
    customer_id: str
    evaluated_at: datetime
    kind: Literal["segment", "journey_trigger", "journey_branch", "personalization"]
    subject: str = Field(description="what is explained, e.g. segment high-value-champions")
    summary: str = Field(description="the answer in one sentence")
    member: bool | None = Field(
        default=None, description="segments: whether the customer is a member (stored)"
    )
    outcome: str | None = Field(
        default=None, description="branch steps and campaigns: what the conditions decide now"
    )
    conditions: list[ExplainedCondition] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="more of the why, in words")


# --- one condition ------------------------------------------------------------------------


def _customer_row(conn: Connection, customer_id: str) -> Any:
    row = conn.execute(
        text(
            "SELECT id, email, phone, created_at, attributes FROM customers WHERE id = :id"
        ).columns(attributes=JSONType),
        {"id": customer_id},
    ).first()
    if row is None:
        raise NotFound(f"no customer {customer_id}", field="customer_id")
    return row


def _evaluate_nodes(
    conn: Connection, customer_id: str, nodes: list[tuple[str, Any]], now: datetime
) -> tuple[list[bool], list[Any]]:
    """Each node's result (its compiled SQL for this customer) and its measure."""
    dialect = conn.dialect.name
    columns: list[tuple[str, str | None, dict[str, Any]]] = []
    for index, (_, node) in enumerate(nodes):
        compiled = compile_condition(node, dialect=dialect, now=now, param_prefix=f"xr{index}_")
        result_sql = f"CASE WHEN {compiled.sql} THEN 1 ELSE 0 END"
        params = dict(compiled.params)
        measure_sql = None
        if isinstance(node, EventCondition):
            measure = compile_event_measure(
                node, dialect=dialect, now=now, param_prefix=f"xm{index}_"
            )
            measure_sql = measure.sql
            params.update(measure.params)
        elif isinstance(node, SegmentCondition):
            params[f"xs{index}"] = node.segment
            measure_sql = (
                "(SELECT sm.since FROM segment_memberships sm"
                f" WHERE sm.segment_slug = :xs{index} AND sm.customer_id = c.id)"
            )
        columns.append((result_sql, measure_sql, params))
    results: list[bool] = [False] * len(nodes)
    measures: list[Any] = [None] * len(nodes)
    for batch in _batches(columns):
        selects, params = [], {"x_customer": customer_id}
        for index in batch:
            result_sql, measure_sql, node_params = columns[index]
            selects.append(f"{result_sql} AS r{index}")
            selects.append(f"{measure_sql or 'NULL'} AS m{index}")
            params.update(node_params)
        row = conn.execute(
            text(f"SELECT {', '.join(selects)} FROM customers c WHERE c.id = :x_customer"),
            params,
        ).one()
        mapping = row._mapping
        for index in batch:
            results[index] = bool(mapping[f"r{index}"])
            measures[index] = mapping[f"m{index}"]
    return results, measures


def _batches(columns: list[tuple[str, str | None, dict[str, Any]]]) -> list[list[int]]:
    batches: list[list[int]] = [[]]
    size = 0
    for index, (_, _, params) in enumerate(columns):
        if batches[-1] and size + len(params) > _PARAMS_PER_STATEMENT:
            batches.append([])
            size = 0
        batches[-1].append(index)
        size += len(params)
    return batches


def _attribute_value(row: Any, name: str) -> tuple[bool, Any]:
    """(present, value) of an attribute path on the customer, as the node reads it."""
    if column_kind(name) is not None:
        value = getattr(row, name)
        if isinstance(value, datetime) or (name == "created_at" and value is not None):
            value = _to_time(value, None).isoformat()  # type: ignore[union-attr]
        return value is not None, value
    current: Any = row.attributes or {}
    if isinstance(current, str):
        current = json.loads(current)
    for part in name.split("."):
        if not isinstance(current, dict) or part not in current:
            return False, None
        current = current[part]
    return current is not None, current


def _describe(node: Any, row: Any, measure: Any, child_results: list[bool]) -> tuple[Any, str]:
    """(value, value in words) of one node for the customer."""
    if isinstance(node, AllOf | AnyOf):
        held = sum(child_results)
        return held, f"{held} of {len(child_results)} hold"
    if isinstance(node, NotOf):
        inner = child_results[0] if child_results else False
        return inner, f"the condition inside is {'true' if inner else 'false'}"
    if isinstance(node, AttributeCondition):
        present, value = _attribute_value(row, node.attribute)
        if not present:
            return None, f"{node.attribute} is not set"
        return value, f"{node.attribute} is {json.dumps(value, ensure_ascii=False)}"
    if isinstance(node, SegmentCondition):
        if measure is None:
            return None, f"not a member of {node.segment}"
        since = _to_time(measure, None)
        assert since is not None
        return since.isoformat(), f"member of {node.segment} since {since:%Y-%m-%d %H:%M} UTC"
    if isinstance(node, EventCondition):
        name = "events" if node.event == "*" else f"{node.event} events"
        if node.count is not None:
            count = int(measure or 0)
            window = "" if node.within is None else " in the window"
            return count, f"{count} matching {name}{window}"
        if measure is None:
            return None, f"no matching {name}"
        latest = _to_time(measure, None)
        assert latest is not None
        return latest.isoformat(), f"the latest matching event was on {latest:%Y-%m-%d %H:%M} UTC"
    return None, ""


def explain_condition(
    conn: Connection,
    *,
    customer_id: str,
    condition: Condition,
    now: datetime,
    path: str = "condition",
) -> NodeExplanation:
    """The condition's tree, each node's result from its own compiled SQL for this
    customer as of `now`, with the value it compared. NotFound for an unknown customer."""
    row = _customer_row(conn, customer_id)
    nodes = list(iter_nodes(condition, path))
    results, measures = _evaluate_nodes(conn, customer_id, nodes, now)
    by_path = {node_path: index for index, (node_path, _) in enumerate(nodes)}

    def build(node_path: str) -> NodeExplanation:
        index = by_path[node_path]
        node = nodes[index][1]
        children = [
            build(child_path) for child_path, _ in nodes if _is_child(node_path, child_path, node)
        ]
        value, value_text = _describe(node, row, measures[index], [c.result for c in children])
        return NodeExplanation(
            path=node_path,
            kind=_KINDS[type(node)],  # type: ignore[arg-type]
            text=node_text(node),
            result=results[index],
            value=value,
            value_text=value_text,
            children=children,
        )

    return build(path)


def _is_child(parent: str, candidate: str, node: Any) -> bool:
    if isinstance(node, AllOf | AnyOf):
        rest = candidate.removeprefix(f"{parent}.{'all' if isinstance(node, AllOf) else 'any'}[")
        return rest != candidate and rest.rstrip("]").isdigit() and rest.endswith("]")
    if isinstance(node, NotOf):
        return candidate == f"{parent}.not"
    return False


# --- subjects -----------------------------------------------------------------------------


def _when(value: datetime) -> str:
    return f"{value:%Y-%m-%d %H:%M} UTC"


def _membership(conn: Connection, slug: str, customer_id: str) -> datetime | None:
    since = conn.execute(
        text(
            "SELECT since FROM segment_memberships WHERE segment_slug = :slug"
            " AND customer_id = :customer"
        ),
        {"slug": slug, "customer": customer_id},
    ).scalar()
    return _to_time(since, None)


def _last_transition(conn: Connection, slug: str, customer_id: str) -> Any:
    return conn.execute(
        text(
            "SELECT id, kind, source, occurred_at FROM segment_transitions"
            " WHERE customer_id = :customer AND segment_slug = :slug ORDER BY id DESC LIMIT 1"
        ),
        {"slug": slug, "customer": customer_id},
    ).first()


def _rule_text(rule: SegmentRule) -> str:
    parts = [
        f"{name.upper()} {bounds[0]}" + (f"-{bounds[1]}" if bounds[1] != bounds[0] else "")
        for name in ("r", "f", "m", "fm")
        if (bounds := getattr(rule, name)) is not None
    ]
    return " and ".join(parts) or "every cell"


def explain_segment(conn: Connection, *, customer_id: str, slug: str, now: datetime) -> Explanation:
    """Whether the customer is in segment `slug`, and why."""
    _customer_row(conn, customer_id)
    try:
        segment = get_segment(conn, slug=slug)
    except NotFound:
        raise NotFound(f"no segment {slug!r}", field="segment") from None
    since = _membership(conn, slug, customer_id)
    member = since is not None
    stored = f"member since {_when(since)}" if since else "not a member"
    notes: list[str] = []
    conditions: list[ExplainedCondition] = []
    last = _last_transition(conn, slug, customer_id)
    if last is not None:
        at = _to_time(last.occurred_at, None)
        assert at is not None
        notes.append(
            f"last change: {last.kind} on {_when(at)} (transition {last.id}, {last.source})"
        )
    if segment.kind == "rule" and segment.condition is not None:
        from core.conditions import CONDITION_ADAPTER

        condition = CONDITION_ADAPTER.validate_python(segment.condition)
        tree = explain_condition(conn, customer_id=customer_id, condition=condition, now=now)
        conditions.append(ExplainedCondition(label="condition", result=tree.result, tree=tree))
        holds = "holds" if tree.result else "does not hold"
        summary = f"{stored}; the condition {holds} now"
        if tree.result != member:
            notes.append(
                "membership follows the segment's evaluations (real time on the customer's"
                " own changes, a full pass on its schedule): the next one brings it in line"
            )
    elif segment.kind == "rfm":
        summary = f"{stored}; set by RFM model {segment.model_slug}'s scores"
        notes.extend(_rfm_notes(conn, customer_id, segment.model_slug or ""))
    else:
        summary = f"{stored}; reported by an external system (entries and exits)"
    return Explanation(
        customer_id=customer_id,
        evaluated_at=now,
        kind="segment",
        subject=f"segment {slug}",
        summary=summary,
        member=member,
        conditions=conditions,
        notes=notes,
    )


def _rfm_notes(conn: Connection, customer_id: str, model_slug: str) -> list[str]:
    score = next(
        (s for s in customer_scores(conn, customer_id=customer_id) if s.model == model_slug), None
    )
    if score is None:
        return [f"model {model_slug} has not scored this customer"]
    notes = [
        f"scores R{score.r} F{score.f} M{score.m} (recency {score.recency_days} days,"
        f" frequency {score.frequency}, monetary {score.monetary:g}), from pass {score.pass_id}"
    ]
    try:
        rules = get_model(conn, slug=model_slug).definition.rules()
    except (NotFound, ValidationError):
        return notes
    rule = next((r for r in rules if r.matches(score.r, score.f, score.m)), None)
    if rule is not None:
        notes.append(
            f"label {rule.label}: the first rule of the map that holds is {_rule_text(rule)}"
        )
    return notes


def _journey_definition(conn: Connection, slug: str) -> tuple[int, JourneyDefinition]:
    row = conn.execute(
        text(
            "SELECT j.active_version, j.latest_version, v.definition FROM journeys j"
            " JOIN journey_versions v ON v.journey_slug = j.slug"
            " AND v.version = COALESCE(j.active_version, j.latest_version)"
            " WHERE j.slug = :slug"
        ).columns(definition=JSONType),
        {"slug": slug},
    ).first()
    if row is None:
        raise NotFound(f"no journey {slug!r}", field="journey")
    version = row.active_version or row.latest_version
    try:
        return version, JourneyDefinition.model_validate(row.definition)
    except ValidationError as exc:
        raise ValidationFailed(
            [
                ErrorDetail(
                    "invalid", f"journey {slug!r} v{version} does not parse: {exc}", "journey"
                )
            ]
        ) from None


def explain_journey(
    conn: Connection, *, customer_id: str, slug: str, step: str | None, now: datetime
) -> Explanation:
    """A journey's trigger (no `step`) or one branch step, for the customer, on the
    journey's active version (its latest while it has none)."""
    _customer_row(conn, customer_id)
    version, definition = _journey_definition(conn, slug)
    if step is None:
        trigger = explain_segment(
            conn, customer_id=customer_id, slug=definition.trigger.segment, now=now
        )
        return trigger.model_copy(
            update={
                "kind": "journey_trigger",
                "subject": f"journey {slug} (v{version}) trigger: segment {definition.trigger.segment}",
            }
        )
    branch = definition.steps.get(step)
    if not isinstance(branch, BranchStep):
        what = "no step" if branch is None else f"a {branch.type} step"
        raise ValidationFailed(
            [
                ErrorDetail(
                    "invalid",
                    f"{step!r} is {what} of journey {slug!r} v{version}; a branch step is explained",
                    "step",
                )
            ]
        )
    conditions = []
    for index, case in enumerate(branch.branches):
        tree = explain_condition(
            conn,
            customer_id=customer_id,
            condition=case.condition,
            now=now,
            path=f"steps.{step}.branches[{index}].condition",
        )
        conditions.append(
            ExplainedCondition(
                label=f"branch {index + 1} -> {case.next or 'end'}", result=tree.result, tree=tree
            )
        )
    winner = next((c for c in conditions if c.result), None)
    outcome = winner.label if winner else f"no condition holds -> default {branch.default or 'end'}"
    notes = []
    taken = conn.execute(
        text(
            "SELECT detail, occurred_at, reason FROM run_events WHERE customer_id = :customer"
            " AND journey_slug = :slug AND step = :step AND kind = 'branch_taken'"
            " ORDER BY occurred_at DESC, id DESC LIMIT 1"
        ).columns(detail=JSONType),
        {"customer": customer_id, "slug": slug, "step": step},
    ).first()
    if taken is not None:
        at = _to_time(taken.occurred_at, None)
        assert at is not None
        notes.append(f"the run decided on {_when(at)}: {taken.reason}")
    return Explanation(
        customer_id=customer_id,
        evaluated_at=now,
        kind="journey_branch",
        subject=f"journey {slug} (v{version}) step {step}",
        summary=f"now: {outcome}",
        outcome=outcome,
        conditions=conditions,
        notes=notes,
    )


def explain_personalization(
    conn: Connection, *, customer_id: str, slug: str, now: datetime
) -> Explanation:
    """Each experience's audience for the customer, the first that matches, and the
    control group, on the campaign's active version (its latest while it has none)."""
    from store.personalization import default_analytics_version, version_definition

    _customer_row(conn, customer_id)
    try:
        version = default_analytics_version(conn, slug=slug)
    except NotFound:
        raise NotFound(f"no personalisation campaign {slug!r}", field="personalization") from None
    definition = version_definition(conn, slug=slug, version=version)
    conditions = []
    for index, experience in enumerate(definition.experiences):
        tree = explain_condition(
            conn,
            customer_id=customer_id,
            condition=experience.target(),
            now=now,
            path=f"experiences[{index}].{'condition' if experience.condition else 'segment'}",
        )
        conditions.append(ExplainedCondition(label=experience.name, result=tree.result, tree=tree))
    winner = next((c for c in conditions if c.result), None)
    bucket = bucket_of(slug, customer_id)
    threshold = definition.control_threshold
    notes = [
        f"control bucket {bucket} of {BUCKETS}: the control group is buckets below {threshold}"
    ]
    if winner is None:
        outcome = "default content: no experience's audience holds"
    elif bucket < threshold:
        outcome = f"control group: shown the default content instead of {winner.label}"
    else:
        outcome = f"experience {winner.label}"
    state = conn.execute(
        text("SELECT state FROM personalizations WHERE slug = :slug"), {"slug": slug}
    ).scalar()
    if state != "active":
        notes.append(f"the campaign is {state}: everyone is shown the default content now")
    return Explanation(
        customer_id=customer_id,
        evaluated_at=now,
        kind="personalization",
        subject=f"personalisation {slug} (v{version})",
        summary=f"now: {outcome}",
        outcome=outcome,
        conditions=conditions,
        notes=notes,
    )
