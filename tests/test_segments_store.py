"""Conditions compiled to SQL: every operator on SQLite and PostgreSQL, in both the
correlated form (`compile_condition`, one customer) and the set-based form (whole pass)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from store.segments import compile_condition, customer_matches, preview
from tests.utils.segments import NOW, add_customer, add_event, add_label_segment

ALL = {"a", "b", "c", "d"}


@pytest.fixture
def shop(store_engine):
    """Four customers whose expected memberships below are worked out by hand."""
    add_customer(
        store_engine,
        "a",
        {
            "plan": "pro",
            "score": 80,
            "ratio": 0.5,
            "vip": True,
            "tags": ["vip", "early", 3],
            "signed_up_at": "2026-11-10T09:00:00Z",
            "address": {"city": "Paris"},
            "nick": "Zed",
        },
        email="a@shop.com",
        phone="+3312",
    )
    add_customer(
        store_engine,
        "b",
        {
            "plan": "free",
            "score": 40,
            "vip": False,
            "tags": ["late"],
            "signed_up_at": "2026-08-01T00:00:00+02:00",
            "address": {"city": "Lyon"},
            "nick": "alpha",
        },
        created_at=NOW.replace(day=10),
    )
    add_customer(
        store_engine,
        "c",
        {
            "plan": "Pro",
            "score": "80",
            "signed_up_at": "not a date",
            "nickname": None,
            "tags": "vip-ish",
        },
        email="c@other.org",
    )
    add_customer(store_engine, "d", {})
    add_event(store_engine, "a", "Purchase", days_ago=1, properties={"total_price": 150})
    add_event(store_engine, "a", "Purchase", days_ago=5, properties={"total_price": 50})
    add_event(store_engine, "a", "Visit", days_ago=2)
    add_event(store_engine, "b", "Purchase", days_ago=40, properties={"total_price": 500})
    add_event(store_engine, "b", "Visit", days_ago=45)
    add_event(store_engine, "c", "Visit", days_ago=10)
    add_event(
        store_engine, "c", "Purchase", days_ago=-3, properties={"total_price": 999}
    )  # in the future
    add_label_segment(store_engine, "default:champions", ["a", "c"])
    return store_engine


def attr(name, op, value=None):
    node = {"attribute": name, "op": op}
    if value is not None:
        node["value"] = value
    return node


CASES = [
    ("eq string, case-sensitive", attr("plan", "eq", "pro"), {"a"}),
    ("eq number is not a numeric string", attr("score", "eq", 80), {"a"}),
    ("eq number matches int and float", attr("ratio", "eq", 0.5), {"a"}),
    ("eq true", attr("vip", "eq", True), {"a"}),
    ("eq false is not 0 or missing", attr("vip", "eq", False), {"b"}),
    ("ne includes the missing", attr("plan", "ne", "pro"), {"b", "c", "d"}),
    ("gt number", attr("score", "gt", 40), {"a"}),
    ("gte number", attr("score", "gte", 40), {"a", "b"}),
    ("lt number", attr("score", "lt", 80), {"b"}),
    ("lte number", attr("score", "lte", 80), {"a", "b"}),
    ("gt string by code point", attr("nick", "gt", "Z"), {"a", "b"}),
    ("lt string by code point", attr("nick", "lt", "a"), {"a"}),
    ("in mixed types", attr("score", "in", [40, "80"]), {"b", "c"}),
    ("in strings", attr("plan", "in", ["pro", "free"]), {"a", "b"}),
    ("contains in a list", attr("tags", "contains", "vip"), {"a", "c"}),
    ("contains a number in a list", attr("tags", "contains", 3), {"a"}),
    ("contains a substring", attr("nick", "contains", "ed"), {"a"}),
    ("exists", attr("address.city", "exists"), {"a", "b"}),
    ("exists: null is absent", attr("nickname", "exists", True), set()),
    ("exists false", attr("nickname", "exists", False), ALL),
    ("after a relative duration", attr("signed_up_at", "after", "P30D"), {"a"}),
    (
        "before an instant in another zone",
        attr("signed_up_at", "before", "2026-07-31T22:00:01Z"),
        {"b"},
    ),
    (
        "after an instant, zone respected",
        attr("signed_up_at", "after", "2026-07-31T22:00:00Z"),
        {"a"},
    ),
    ("dotted path", attr("address.city", "eq", "Lyon"), {"b"}),
    ("email column contains", attr("email", "contains", "@shop"), {"a"}),
    ("email column exists", attr("email", "exists"), {"a", "c"}),
    ("email column ne", attr("email", "ne", "a@shop.com"), {"b", "c", "d"}),
    ("phone column eq", attr("phone", "eq", "+3312"), {"a"}),
    ("phone column in", attr("phone", "in", ["+3312", "+1"]), {"a"}),
    ("email column gt", attr("email", "gt", "b"), {"c"}),
    ("created_at after", attr("created_at", "after", "P30D"), {"b"}),
    ("created_at before", attr("created_at", "before", "P30D"), {"a", "c", "d"}),
    ("count gte within", {"event": "Purchase", "count": {"gte": 2}, "within": "P30D"}, {"a"}),
    (
        "count with a property filter",
        {
            "event": "Purchase",
            "count": {"gte": 1},
            "within": "P30D",
            "where": [{"property": "total_price", "op": "gte", "value": 100}],
        },
        {"a"},
    ),
    (
        "count all time with a filter",
        {
            "event": "Purchase",
            "count": {"gte": 1},
            "where": [{"property": "total_price", "op": "gte", "value": 100}],
        },
        {"a", "b"},
    ),
    (
        "count eq 0 (future events do not count)",
        {"event": "Purchase", "count": {"eq": 0}, "within": "P30D"},
        {"b", "c", "d"},
    ),
    ("count lt", {"event": "Purchase", "count": {"lt": 2}}, {"b", "c", "d"}),
    ("count eq 1", {"event": "Purchase", "count": {"eq": 1}}, {"b"}),
    ("count between", {"event": "Purchase", "count": {"gte": 1, "lte": 1}}, {"b"}),
    ("count gt", {"event": "Purchase", "count": {"gt": 1}}, {"a"}),
    ("any event count", {"event": "*", "count": {"gte": 3}, "within": "P30D"}, {"a"}),
    ("last seen more than", {"event": "*", "last": {"more_than": "P30D"}}, {"b"}),
    ("last seen less than", {"event": "*", "last": {"less_than": "P7D"}}, {"a"}),
    ("last purchase more than", {"event": "Purchase", "last": {"more_than": "P3D"}}, {"b"}),
    ("last purchase less than", {"event": "Purchase", "last": {"less_than": "P30D"}}, {"a"}),
    ("last between", {"event": "Visit", "last": {"more_than": "P5D", "less_than": "P20D"}}, {"c"}),
    (
        "last with a property filter",
        {
            "event": "Purchase",
            "last": {"less_than": "P3D"},
            "where": [{"property": "total_price", "op": "lt", "value": 100}],
        },
        set(),
    ),
    ("segment", {"segment": "default:champions"}, {"a", "c"}),
    ("not segment", {"not": {"segment": "default:champions"}}, {"b", "d"}),
    ("not of a json leaf is exact", {"not": attr("score", "gt", 40)}, {"b", "c", "d"}),
    (
        "three levels deep",
        {
            "any": [
                {
                    "all": [
                        {"event": "Purchase", "count": {"gte": 2}, "within": "P30D"},
                        {"not": {"any": [attr("plan", "eq", "free"), attr("score", "lt", 10)]}},
                    ]
                },
                {
                    "all": [
                        {"segment": "default:champions"},
                        {"event": "*", "last": {"more_than": "P7D"}},
                    ]
                },
            ]
        },
        {"a", "c"},
    ),
]


def matches_three_ways(conn, condition):
    """Customers matching by the correlated form, the set-based form, and one by one."""
    compiled = compile_condition(condition, dialect=conn.dialect.name, now=NOW)
    correlated = set(
        conn.execute(
            text(f"SELECT c.id FROM customers c WHERE {compiled.sql}"), compiled.params
        ).scalars()
    )
    set_based = preview(conn, condition=condition, now=NOW, sample=10)
    one_by_one = {
        cid
        for cid in sorted(ALL)
        if customer_matches(conn, customer_id=cid, condition=condition, now=NOW)
    }
    return correlated, set(set_based.sample), set_based.count, one_by_one


def test_every_operator_in_both_forms(shop):
    # One store for every case: a fresh store per case would cost a second each.
    wrong = []
    with shop.connect() as conn:
        for name, condition, expected in CASES:
            got = matches_three_ways(conn, condition)
            if got != (expected, expected, len(expected), expected):
                wrong.append(f"{name}: expected {sorted(expected)}, got {got}")
    assert not wrong, "\n".join(wrong)


def test_two_compiled_conditions_share_one_statement(shop):
    with shop.connect() as conn:
        first = compile_condition(attr("plan", "eq", "pro"), dialect=conn.dialect.name, now=NOW)
        second = compile_condition(attr("plan", "eq", "free"), dialect=conn.dialect.name, now=NOW)
        assert not set(first.params) & set(second.params)
        sql = f"SELECT c.id FROM customers c WHERE {first.sql} OR {second.sql} ORDER BY c.id"
        assert list(conn.execute(text(sql), {**first.params, **second.params}).scalars()) == [
            "a",
            "b",
        ]


def test_unknown_customer_does_not_match(shop):
    with shop.connect() as conn:
        assert not customer_matches(
            conn, customer_id="nobody", condition=attr("plan", "exists"), now=NOW
        )
