"""Conditions in words, for people: `total_spent > 500`, `at least 2 Purchase in the last
30 days where total_price >= 100`, `all of: ...`. Pure functions over parsed conditions;
the console and the explain route show these beside the JSON."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from core.conditions import (
    AllOf,
    AnyOf,
    AttributeCondition,
    Condition,
    EventCondition,
    NotOf,
    PropertyFilter,
    SegmentCondition,
)
from core.durations import format_duration, parse_duration

_OPS = {"eq": "=", "ne": "≠", "gt": ">", "gte": "≥", "lt": "<", "lte": "≤"}
_COUNT_WORDS = {
    "eq": "exactly",
    "gte": "at least",
    "gt": "more than",
    "lte": "at most",
    "lt": "fewer than",
}


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _moment(value: str) -> str:
    if value.strip().upper().startswith("P"):
        return f"{human_duration(value)} ago"
    return value


def human_duration(duration: str | timedelta) -> str:
    """`P30D` -> `30 days`, `PT12H` -> `12 hours`; text that is no duration as written."""
    if isinstance(duration, str):
        try:
            duration = parse_duration(duration)
        except ValueError:
            return duration
    seconds = int(duration.total_seconds())
    for unit, size in (("week", 604_800), ("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return format_duration(duration)


def comparison_text(name: str, op: str, value: Any) -> str:
    """One attribute or property comparison: `plan = "pro"`, `email exists`."""
    if op == "exists":
        return f"{name} is not set" if value is False else f"{name} is set"
    if op in _OPS:
        return f"{name} {_OPS[op]} {_value(value)}"
    if op == "in":
        return f"{name} is one of {', '.join(_value(v) for v in value)}"
    if op == "contains":
        return f"{name} contains {_value(value)}"
    if op == "before":
        return f"{name} before {_moment(value)}"
    if op == "after":
        return f"{name} after {_moment(value)}"
    return f"{name} {op} {_value(value)}"


def _filters(filters: list[PropertyFilter]) -> str:
    if not filters:
        return ""
    return " where " + " and ".join(comparison_text(f.property, f.op, f.value) for f in filters)


def event_text(node: EventCondition) -> str:
    """`at least 2 Purchase in the last 30 days`, `last Purchase more than 30 days ago`."""
    where = _filters(node.where)
    if node.count is not None:
        bounds = [
            f"{_COUNT_WORDS[key]} {getattr(node.count, key)}"
            for key in ("eq", "gte", "gt", "lte", "lt")
            if getattr(node.count, key) is not None
        ]
        window = (
            f" in the last {human_duration(node.within)}" if node.within is not None else " ever"
        )
        name = "events of any kind" if node.event == "*" else node.event
        return f"{' and '.join(bounds)} {name}{where}{window}"
    assert node.last is not None
    parts = []
    if node.last.more_than is not None:
        parts.append(f"more than {human_duration(node.last.more_than)} ago")
    if node.last.less_than is not None:
        parts.append(f"less than {human_duration(node.last.less_than)} ago")
    name = "event of any kind" if node.event == "*" else node.event
    return f"last {name}{where} {' and '.join(parts)}"


def node_text(node: Condition) -> str:
    """The node alone (a group is named by its kind): `all of`, `total_spent > 500`."""
    if isinstance(node, AllOf):
        return "all of"
    if isinstance(node, AnyOf):
        return "any of"
    if isinstance(node, NotOf):
        return "not"
    if isinstance(node, AttributeCondition):
        return comparison_text(node.attribute, node.op, node.value)
    if isinstance(node, SegmentCondition):
        return f"in segment {node.segment}"
    if isinstance(node, EventCondition):
        return event_text(node)
    return type(node).__name__


def condition_lines(node: Condition, depth: int = 0) -> list[tuple[int, str]]:
    """The whole condition as indented lines: (depth, text), parents first."""
    lines = [(depth, node_text(node))]
    if isinstance(node, AllOf | AnyOf):
        for child in node.all if isinstance(node, AllOf) else node.any:
            lines.extend(condition_lines(child, depth + 1))
    elif isinstance(node, NotOf):
        lines.extend(condition_lines(node.not_, depth + 1))
    return lines


def condition_text(node: Condition) -> str:
    """The whole condition on one line: `all of (in segment x, total_spent > 500)`."""
    if isinstance(node, AllOf | AnyOf):
        children = node.all if isinstance(node, AllOf) else node.any
        return f"{node_text(node)} ({', '.join(condition_text(c) for c in children)})"
    if isinstance(node, NotOf):
        return f"not ({condition_text(node.not_)})"
    return node_text(node)
