"""Prediction conditions and fixed windows in the condition language, compiled to SQL on
SQLite and PostgreSQL: the per-customer form, the set-based form and a segment pass."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from core.conditions import parse_condition
from core.errors import ValidationFailed
from core.predictions import PredictionLevels, PredictiveModelCreate
from store import predictions as prediction_store
from store import segments as segment_store
from tests.utils.predictions import model_body
from tests.utils.rfm import EventRow, add_customers, load
from tests.utils.segments import add_label_segment, create_rule_segment, segment_members

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
PEOPLE = ["a", "b", "c", "d"]


@pytest.fixture
def scored(store_engine):
    """a high (0.9), b medium (0.5), c low (0.1), d unscored; a and b are Champions."""
    with store_engine.begin() as conn:
        add_customers(conn, PEOPLE)
        prediction_store.create_model(
            conn, model=PredictiveModelCreate.model_validate(model_body(slug="buy")), now=NOW
        )
        prediction_store.replace_scores(
            conn,
            slug="buy",
            training_id=1,
            customer_ids=["a", "b", "c"],
            probabilities=np.array([0.9, 0.5, 0.1]),
            levels=PredictionLevels(medium=0.3, high=0.6),
            now=NOW,
        )
    add_label_segment(store_engine, "default:champions", ["a", "b"])
    return store_engine


def _both_forms(engine, condition: dict, now: datetime = NOW) -> set[str]:
    """Who matches, by the set-based form; the per-customer form must agree."""
    parsed = parse_condition(condition)
    with engine.connect() as conn:
        preview = segment_store.preview(conn, condition=parsed, now=now, sample=100)
        one_by_one = {
            c
            for c in PEOPLE
            if segment_store.customer_matches(conn, customer_id=c, condition=parsed, now=now)
        }
    assert set(preview.sample) == one_by_one
    assert preview.count == len(one_by_one)
    return one_by_one


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"prediction": "buy", "level": "high"}, {"a"}),
        ({"prediction": "buy", "level": "medium"}, {"b"}),
        ({"prediction": "buy", "level": "low"}, {"c"}),
        ({"prediction": "buy", "op": "gte", "value": 0.5}, {"a", "b"}),
        ({"prediction": "buy", "op": "gt", "value": 0.5}, {"a"}),
        ({"prediction": "buy", "op": "lt", "value": 0.5}, {"c"}),
        ({"prediction": "buy", "op": "lte", "value": 1}, {"a", "b", "c"}),
        ({"not": {"prediction": "buy", "level": "high"}}, {"b", "c", "d"}),
        (
            {
                "all": [
                    {"prediction": "buy", "level": "high"},
                    {"segment": "default:champions"},
                ]
            },
            {"a"},
        ),
        (
            {
                "any": [
                    {"prediction": "buy", "op": "lt", "value": 0.2},
                    {"segment": "default:champions"},
                ]
            },
            {"a", "b", "c"},
        ),
    ],
)
def test_prediction_conditions_on_both_databases(scored, condition, expected):
    assert _both_forms(scored, condition) == expected


def test_a_rule_segment_on_a_prediction_evaluates_and_unknown_models_are_refused(scored):
    create_rule_segment(
        scored,
        "likely-champions",
        {"all": [{"prediction": "buy", "level": "high"}, {"segment": "default:champions"}]},
    )
    with scored.begin() as conn:
        segment_store.evaluate_segment(conn, slug="likely-champions", now=NOW)
    assert segment_members(scored, "likely-champions") == ["a"]
    with pytest.raises(ValidationFailed) as refused:
        create_rule_segment(
            scored, "nope", {"any": [{"prediction": "no-such-model", "level": "high"}]}
        )
    assert [(e.field, e.code) for e in refused.value.errors] == [
        ("condition.any[0].prediction", "unknown_prediction")
    ]


@pytest.fixture
def may_purchases(store_engine):
    load(
        store_engine,
        [
            EventRow("a", "Purchase", datetime(2023, 5, 20, 15, tzinfo=UTC)),
            EventRow("b", "Purchase", datetime(2023, 6, 1, tzinfo=UTC)),  # the end: outside
            EventRow("c", "Purchase", datetime(2023, 5, 15, tzinfo=UTC)),  # the start: inside
            EventRow("c", "Visit", datetime(2023, 5, 16, tzinfo=UTC)),
            EventRow("d", "Purchase", datetime(2023, 4, 1, tzinfo=UTC)),
        ],
    )
    return store_engine


MAY = ["2023-05-15T00:00:00Z", "2023-06-01T00:00:00Z"]


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"event": "Purchase", "count": {"gte": 1}, "between": MAY}, {"a", "c"}),
        ({"event": "Purchase", "count": {"eq": 0}, "between": MAY}, {"b", "d"}),
        ({"event": "*", "count": {"gte": 2}, "between": MAY}, {"c"}),
        # The same window written in another zone.
        (
            {
                "event": "Purchase",
                "count": {"gte": 1},
                "between": ["2023-05-15T02:00:00+02:00", "2023-05-31T20:00:00-04:00"],
            },
            {"a", "c"},
        ),
        (
            {
                "not": {
                    "event": "Purchase",
                    "count": {"gte": 1},
                    "between": MAY,
                    "where": [{"property": "x", "op": "exists", "value": False}],
                }
            },
            {"b", "d"},
        ),
    ],
)
def test_fixed_windows_on_both_databases(may_purchases, condition, expected):
    assert _both_forms(may_purchases, condition) == expected


def test_a_fixed_window_reads_nothing_after_the_evaluation_instant(may_purchases):
    # Evaluated as of May 18th, the window holds only what had happened by then.
    condition = {"event": "Purchase", "count": {"gte": 1}, "between": MAY}
    assert _both_forms(may_purchases, condition, now=datetime(2023, 5, 18, tzinfo=UTC)) == {"c"}


def test_a_fixed_window_segment_evaluates(may_purchases):
    create_rule_segment(
        may_purchases,
        "may-buyers",
        {"event": "Purchase", "count": {"gte": 1}, "between": MAY},
    )
    with may_purchases.begin() as conn:
        diff = segment_store.evaluate_segment(conn, slug="may-buyers", now=NOW)
    assert diff.entries == 2
    assert segment_members(may_purchases, "may-buyers") == ["a", "c"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"count": {"gte": 1}, "between": [MAY[1], MAY[0]]}, "from before to"),
        ({"count": {"gte": 1}, "between": [MAY[0], MAY[0]]}, "from before to"),
        ({"count": {"gte": 1}, "between": ["2023-05-15T00:00:00", MAY[1]]}, "has no zone"),
        ({"count": {"gte": 1}, "between": [MAY[0]]}, "two timestamps"),
        ({"count": {"gte": 1}, "between": "P3D"}, "two timestamps"),
        ({"count": {"gte": 1}, "between": ["yesterday", MAY[1]]}, "not an ISO 8601"),
        ({"count": {"gte": 1}, "between": MAY, "within": "P3D"}, "not both"),
        ({"last": {"more_than": "P3D"}, "between": MAY}, "goes with count"),
    ],
)
def test_bad_fixed_windows_are_named(raw, message):
    with pytest.raises(ValidationFailed) as refused:
        parse_condition({"any": [{"event": "Purchase", **raw}]})
    fields = [(e.field, e.code) for e in refused.value.errors]
    assert ("condition.any[0].between", "invalid_value") in fields
    assert any(message in e.message for e in refused.value.errors)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"prediction": "buy", "level": "very"}, "condition.level"),
        ({"prediction": "buy", "op": "eq", "value": 0.5}, "condition.op"),
        ({"prediction": "buy", "op": "gte", "value": 1.5}, "condition.value"),
        ({"prediction": "buy", "op": "gte", "value": "high"}, "condition.value"),
        ({"prediction": "buy", "op": "gte", "value": True}, "condition.value"),
        ({"prediction": "buy", "op": "gte"}, "condition.value"),
        ({"prediction": "buy"}, "condition"),
        ({"prediction": "buy", "level": "high", "op": "gte", "value": 0.5}, "condition.level"),
        ({"prediction": "", "level": "high"}, "condition.prediction"),
        ({"prediction": "buy", "level": "high", "colour": 1}, "condition.colour"),
    ],
)
def test_bad_prediction_conditions_are_named(raw, field):
    with pytest.raises(ValidationFailed) as refused:
        parse_condition(raw)
    assert field in [e.field for e in refused.value.errors]
