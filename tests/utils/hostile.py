"""Hostile JSON for the write routes: a valid body with one value (or one nested subtree)
replaced by something no store keeps. Shared by the property tests and bench/fuzz.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from hypothesis import strategies as st

from core.tables import utcnow

# --- valid bodies of the write routes, to be made hostile one member at a time --------


def purchase(event_id: str = "e-ok", customer_id: str = "c-ok") -> dict[str, Any]:
    """A valid purchase an hour ago."""
    return {
        "event_id": event_id,
        "customer_id": customer_id,
        "name": "Purchase",
        "occurred_at": (utcnow() - timedelta(hours=1)).isoformat(),
        "properties": {"total_price": 42.5, "items": [{"sku": "a", "qty": 2}], "note": "hi"},
    }


CONDITION = {
    "all": [
        {
            "event": "Purchase",
            "count": {"gte": 1},
            "within": "P30D",
            "where": [{"property": "total_price", "op": "gte", "value": 10}],
        },
        {
            "any": [
                {"attribute": "plan", "op": "in", "value": ["pro", "team"]},
                {"not": {"attribute": "signed_up_at", "op": "after", "value": "P30D"}},
                {"event": "*", "last": {"more_than": "P7D"}},
            ]
        },
    ]
}
SEGMENT = {"slug": "hostile-seg", "name": "Hostile", "condition": CONDITION, "schedule": "PT5M"}
MODEL = {
    "slug": "hostile-model",
    "name": "Hostile",
    "recency_event": "Purchase",
    "frequency_event": "Purchase",
    "monetary_event": "Purchase",
    "monetary_property": "total_price",
    "timeframe": "P90D",
    "targeting": {"attribute": "email", "op": "exists", "value": True},
    "segment_map": "seed5",
    "realtime": True,
}
JOURNEY = {
    "slug": "hostile-journey",
    "name": "Hostile",
    "trigger": {"segment": "buyers"},
    "goal": {"event": "Purchase", "within": "P30D"},
    "reentry": {"policy": "after_completion", "cooldown": "P30D"},
    "start": "welcome",
    "steps": {
        "welcome": {"type": "email", "template": "champions/welcome.html", "next": "wait"},
        "wait": {"type": "delay", "duration": "P2D", "next": "branch"},
        "branch": {
            "type": "branch",
            "branches": [
                {"condition": {"attribute": "plan", "op": "eq", "value": "pro"}, "next": "done"}
            ],
            "default": "done",
        },
        "done": {"type": "exit"},
    },
}
CAMPAIGN = {
    "slug": "hostile-campaign",
    "name": "Hostile",
    "control_share": 0.1,
    "conversion": {
        "event": "Purchase",
        "where": [{"property": "total_price", "op": "gte", "value": 10}],
        "value_property": "total_price",
        "within": "P7D",
    },
    "default": {"banner": "Hi {{ customer.first_name | default('there') }}", "offer": ""},
    "experiences": [
        {"name": "Buyers", "segment": "buyers", "content": {"offer": "10% off"}},
        {"name": "Rest", "condition": CONDITION, "content": {"banner": "Welcome"}},
    ],
    "cors_origins": ["https://shop.example.com"],
}
CUSTOMER = {"email": "ada@example.com", "attributes": {"plan": "pro", "address": {"city": "Oslo"}}}


# What makes each value hostile, by class (the bench counts answers per class).
HOSTILE_CLASSES = (
    "nul",
    "surrogate",
    "big_integer",
    "non_finite",
    "deep",
    "long_text",
    "epoch_time",
    "impossible_time",
    "huge_duration",
    "wrong_type",
    "garbage",
)


@dataclass(frozen=True)
class Hostile:
    """A value and its class; `Raw` text is spliced into the JSON as it is (NaN, 1e400)."""

    kind: str
    value: Any


@dataclass(frozen=True)
class Raw:
    text: str


def _nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


_text = st.text(max_size=12)

HOSTILE_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "nul": st.builds(lambda a, b: f"{a}\x00{b}", _text, _text),
    "surrogate": st.sampled_from(["\udfff", "a\ud800", "\udc00b", "x\ud83d"]),
    "big_integer": st.one_of(
        st.integers(min_value=2**63, max_value=2**80),
        st.integers(min_value=-(2**80), max_value=-(2**63) - 1),
        st.just(Raw("1" + "0" * 400)),
    ),
    "non_finite": st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400")]),
    "deep": st.integers(min_value=33, max_value=300).map(_nested),
    "long_text": st.integers(min_value=70_000, max_value=90_000).map(lambda n: "x" * n),
    "epoch_time": st.one_of(
        st.integers(min_value=0, max_value=2_000_000_000),
        st.integers(min_value=0, max_value=2_000_000_000).map(str),
    ),
    "impossible_time": st.sampled_from(
        [
            "2026-02-30T00:00:00Z",
            "2025-02-29T10:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-20T24:00:00Z",
            "2026-11-20T10:00:00",
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "2026-11-20T10:00:00+99:00",
        ]
    ),
    "huge_duration": st.integers(min_value=3661, max_value=10**30).map(lambda n: f"P{n}D"),
    "wrong_type": st.sampled_from([[], {}, True, None, 0, "yes", [1, 2]]),
    "garbage": st.text(min_size=1, max_size=40),
}

hostile_values = st.sampled_from(HOSTILE_CLASSES).flatmap(
    lambda kind: HOSTILE_VALUES[kind].map(lambda value: Hostile(kind, value))
)


def dumps(body: Any) -> bytes:
    """JSON text of `body`, with `Raw` values spliced in as they are."""
    marks: dict[str, str] = {}

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            token = f"__raw_{len(marks)}__"
            marks[f'"{token}"'] = value.text
            return token
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(body))  # ensure_ascii: a lone surrogate travels as \\udfff
    for token, raw in marks.items():
        text = text.replace(token, raw)
    return text.encode()


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in `value` a hostile value can go: each member, and a new key."""
    found: list[tuple[Any, ...]] = [prefix] if prefix else []
    if isinstance(value, dict):
        found.append((*prefix, "hostile_key"))
        for key, item in value.items():
            found.extend(paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(paths(item, (*prefix, index)))
    return found


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of `value` with the member at `path` set to `new`."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy = dict(value)
        copy[head] = replaced(value.get(head), rest, new)
        return copy
    copy = list(value)
    copy[head] = replaced(value[head], rest, new)
    return copy


@st.composite
def hostile_bodies(draw: st.DrawFn, valid: Any) -> tuple[Any, Hostile, tuple[Any, ...]]:
    """`valid` with one member replaced by a hostile value: (body, what, where)."""
    where = draw(st.sampled_from(paths(valid)))
    what = draw(hostile_values)
    return replaced(valid, where, what.value), what, where
