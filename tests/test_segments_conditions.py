"""The condition language: parsing, value types per operator, JSON paths of errors."""

from __future__ import annotations

import pytest

from core.conditions import (
    AllOf,
    AttributeCondition,
    EventCondition,
    NotOf,
    parse_condition,
    referenced_segments,
)
from core.errors import ValidationFailed


def fields_of(raw) -> list[tuple[str, str]]:
    with pytest.raises(ValidationFailed) as caught:
        parse_condition(raw)
    return [(e.field, e.code) for e in caught.value.errors]


def test_nested_condition_parses_to_the_shared_classes():
    parsed = parse_condition(
        {
            "all": [
                {"attribute": "plan", "op": "eq", "value": "pro"},
                {"not": {"event": "Purchase", "count": {"gte": 2}, "within": "P30D"}},
            ]
        }
    )
    assert isinstance(parsed, AllOf)
    assert isinstance(parsed.all[0], AttributeCondition)
    assert isinstance(parsed.all[1], NotOf)
    assert isinstance(parsed.all[1].not_, EventCondition)
    assert parsed.all[1].not_.within.days == 30


def test_unknown_operator_is_named_by_its_path():
    raw = {"all": [{"segment": "x"}, {"any": [{"attribute": "plan", "op": "like", "value": "p"}]}]}
    assert fields_of(raw) == [("condition.all[1].any[0].op", "unknown_operator")]


def test_unknown_key_and_unknown_condition_kind():
    assert fields_of({"attribute": "a", "op": "eq", "value": 1, "colour": "red"}) == [
        ("condition.colour", "unknown_field")
    ]
    assert fields_of({"any": [{"wat": 1}]}) == [("condition.any[0]", "invalid")]
    assert fields_of({"all": []}) == [("condition.all", "invalid")]
    assert fields_of({"attribute": "a", "segment": "b"}) == [("condition", "invalid")]


@pytest.mark.parametrize(
    ("op", "value"),
    [
        ("eq", None),
        ("eq", [1]),
        ("eq", {"a": 1}),
        ("gt", True),
        ("gt", [1]),
        ("in", []),
        ("in", "pro"),
        ("in", [1, None]),
        ("contains", None),
        ("exists", "yes"),
        ("before", 12),
        ("before", "2026-11-01T00:00:00"),  # no zone
        ("after", "last week"),
        ("after", "P0D"),
    ],
)
def test_wrong_value_types_are_rejected_at_the_value(op, value):
    raw = {"any": [{"attribute": "x", "op": op, "value": value}]}
    assert fields_of(raw) == [("condition.any[0].value", "invalid_value")]


@pytest.mark.parametrize(
    ("op", "value"),
    [
        ("eq", "pro"),
        ("eq", 3.5),
        ("eq", False),
        ("gte", 10),
        ("lt", "m"),
        ("in", ["a", 2, True]),
        ("contains", "vip"),
        ("contains", 3),
        ("exists", True),
        ("before", "2026-11-01T00:00:00+02:00"),
        ("after", "P30D"),
    ],
)
def test_right_value_types_pass(op, value):
    assert isinstance(
        parse_condition({"attribute": "x", "op": op, "value": value}), AttributeCondition
    )


def test_exists_needs_no_value_but_other_ops_do():
    assert parse_condition({"attribute": "x", "op": "exists"}).op == "exists"
    assert fields_of({"attribute": "x", "op": "eq"}) == [("condition.value", "missing_field")]


def test_column_attributes_check_their_type():
    assert fields_of({"attribute": "email", "op": "eq", "value": 3}) == [
        ("condition.value", "invalid_value")
    ]
    assert fields_of({"attribute": "created_at", "op": "gt", "value": 3}) == [
        ("condition.value", "invalid_value")
    ]
    assert fields_of({"attribute": "email", "op": "before", "value": "P1D"}) == [
        ("condition.value", "invalid_value")
    ]
    assert (
        parse_condition({"attribute": "created_at", "op": "after", "value": "P30D"}).op == "after"
    )


def test_attribute_paths_refuse_json_path_syntax():
    assert fields_of({"attribute": 'a."b', "op": "exists"}) == [("condition.attribute", "invalid")]
    assert fields_of({"attribute": "a..b", "op": "exists"}) == [("condition.attribute", "invalid")]
    assert (
        parse_condition({"attribute": "address.city", "op": "eq", "value": "Paris"}).attribute
        == "address.city"
    )


def test_event_condition_rules():
    assert fields_of({"event": "Purchase"}) == [("condition", "invalid")]
    assert fields_of({"event": "Purchase", "count": {"gte": -1}}) == [
        ("condition.count.gte", "invalid_value")
    ]
    assert fields_of({"event": "Purchase", "count": {"atleast": 2}}) == [
        ("condition.count.atleast", "unknown_operator")
    ]
    assert fields_of({"event": "Purchase", "count": {"gte": 1}, "within": "30 days"}) == [
        ("condition.within", "invalid_value")
    ]
    assert fields_of({"event": "*", "last": {"more_than": "P30D"}, "within": "P1D"}) == [
        ("condition.within", "invalid")
    ]
    assert fields_of({"event": "*", "last": {"since": "P30D"}}) == [
        ("condition.last.since", "unknown_operator")
    ]
    raw = {
        "event": "Purchase",
        "count": {"gte": 1},
        "where": [{"property": "total_price", "op": "gte", "value": "x", "y": 1}],
    }
    assert fields_of(raw) == [("condition.where[0].y", "unknown_field")]
    raw = {
        "event": "Purchase",
        "count": {"gte": 1},
        "where": [{"property": "total_price", "op": "between", "value": 1}],
    }
    assert fields_of(raw) == [("condition.where[0].op", "unknown_operator")]


def test_every_error_is_reported_with_a_custom_root():
    raw = {"all": [{"attribute": "a", "op": "gt", "value": None}, {"segment": ""}]}
    with pytest.raises(ValidationFailed) as caught:
        parse_condition(raw, path="steps.check.branches[0].condition")
    assert [e.field for e in caught.value.errors] == [
        "steps.check.branches[0].condition.all[0].value",
        "steps.check.branches[0].condition.all[1].segment",
    ]


def test_referenced_segments_walks_every_level():
    parsed = parse_condition({"any": [{"segment": "a"}, {"not": {"all": [{"segment": "b"}]}}]})
    assert referenced_segments(parsed) == [
        ("condition.any[0]", "a"),
        ("condition.any[1].not.all[0]", "b"),
    ]
