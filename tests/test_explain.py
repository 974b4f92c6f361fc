""" "Why": every node of a condition, evaluated for one customer, agrees with what a full
segment pass makes of that node, on SQLite and PostgreSQL; and the explain route."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from core.conditions import iter_nodes, parse_condition
from core.personalization import bucket_of
from store import segments as segment_store
from store.explain import NodeExplanation, explain_condition
from tests.utils.api import api_harness
from tests.utils.personalization import campaign
from tests.utils.segments import NOW, add_customer, add_event, add_label_segment

# Every kind of node, nested: groups, attributes of each type, columns, events with
# windows, filters and `last`, a segment, `not`.
CONDITION: dict[str, Any] = {
    "any": [
        {
            "all": [
                {"segment": "default:champions"},
                {"attribute": "total_spent", "op": "gt", "value": 500},
            ]
        },
        {
            "all": [
                {"attribute": "plan", "op": "in", "value": ["pro", "team"]},
                {
                    "not": {
                        "event": "Purchase",
                        "count": {"gte": 2},
                        "within": "P30D",
                        "where": [{"property": "total_price", "op": "gte", "value": 50}],
                    }
                },
            ]
        },
        {
            "all": [
                {"event": "*", "last": {"more_than": "P20D"}},
                {"attribute": "email", "op": "exists", "value": True},
                {"attribute": "address.city", "op": "ne", "value": "Paris"},
            ]
        },
        {"attribute": "signed_up_at", "op": "after", "value": "P60D"},
    ]
}


def _population(engine: Engine, size: int = 40) -> list[str]:
    rng = random.Random(20)
    ids = [f"x-{i:03d}" for i in range(size)]
    champions = []
    for customer_id in ids:
        attributes: dict[str, Any] = {}
        if rng.random() < 0.7:
            attributes["total_spent"] = rng.choice([100, 499.5, 500, 501, 1200, "900"])
        if rng.random() < 0.6:
            attributes["plan"] = rng.choice(["pro", "team", "free", True])
        if rng.random() < 0.5:
            attributes["address"] = {"city": rng.choice(["Paris", "Lyon"])}
        if rng.random() < 0.5:
            days = rng.choice([10, 59, 61, 200])
            attributes["signed_up_at"] = (NOW - timedelta(days=days)).isoformat()
        add_customer(
            engine,
            customer_id,
            attributes,
            email=f"{customer_id}@example.com" if rng.random() < 0.6 else None,
        )
        for _ in range(rng.randrange(0, 4)):
            add_event(
                engine,
                customer_id,
                rng.choice(["Purchase", "Visit"]),
                days_ago=rng.choice([1, 5, 25, 29.5, 31, 45]),
                properties={"total_price": rng.choice([10, 50, 80])},
            )
        if rng.random() < 0.4:
            champions.append(customer_id)
    add_label_segment(engine, "default:champions", champions)
    return ids


def _node_segments(engine: Engine) -> dict[str, str]:
    """A rule segment per node of CONDITION, evaluated by a full pass: path -> slug."""
    parsed = parse_condition(CONDITION)
    slugs = {}
    with engine.begin() as conn:
        for index, (path, node) in enumerate(iter_nodes(parsed)):
            slug = f"node-{index}"
            segment_store.create_segment(
                conn,
                slug=slug,
                name=path,
                kind="rule",
                condition=segment_store.CONDITION_ADAPTER.dump_python(
                    node, mode="json", by_alias=True, exclude_none=True
                ),
                now=NOW,
            )
            segment_store.evaluate_segment(conn, slug=slug, now=NOW)
            slugs[path] = slug
    return slugs


def _flatten(node: NodeExplanation) -> list[NodeExplanation]:
    return [node, *(n for child in node.children for n in _flatten(child))]


def test_each_node_agrees_with_a_full_pass_of_that_node(store_engine: Engine) -> None:
    ids = _population(store_engine)
    slugs = _node_segments(store_engine)
    parsed = parse_condition(CONDITION)
    with store_engine.connect() as conn:
        members = {
            slug: {m.customer_id for m in segment_store.iter_members(conn, slug=slug)}
            for slug in slugs.values()
        }
        outcomes = set()
        for customer_id in ids:
            tree = explain_condition(conn, customer_id=customer_id, condition=parsed, now=NOW)
            nodes = _flatten(tree)
            assert [n.path for n in nodes] == list(slugs)
            for node in nodes:
                in_segment = customer_id in members[slugs[node.path]]
                assert node.result == in_segment, (customer_id, node.path, node.text)
                outcomes.add((node.path, node.result))
    # The population reaches both answers at every node: each comparison was exercised.
    assert outcomes == {(path, result) for path in slugs for result in (True, False)}


def test_values_are_what_each_node_compared(store_engine: Engine) -> None:
    add_customer(
        store_engine,
        "v-1",
        {"total_spent": 620.5, "plan": "pro", "address": {"city": "Lyon"}},
        email="v1@example.com",
    )
    for days, price in ((1, 80), (5, 10), (29, 50), (40, 90)):
        add_event(store_engine, "v-1", "Purchase", days_ago=days, properties={"total_price": price})
    add_event(store_engine, "v-1", "Visit", days_ago=22)
    add_label_segment(store_engine, "default:champions", ["v-1"])
    with store_engine.connect() as conn:
        tree = explain_condition(
            conn, customer_id="v-1", condition=parse_condition(CONDITION), now=NOW
        )
    by_path = {n.path: n for n in _flatten(tree)}
    assert by_path["condition.any[0].all[1]"].value == 620.5
    assert by_path["condition.any[0].all[1]"].value_text == "total_spent is 620.5"
    assert by_path["condition.any[0].all[0]"].value == NOW.isoformat()
    # Purchases in the last 30 days with total_price >= 50: the ones 1 and 29 days ago.
    purchases = by_path["condition.any[1].all[1].not"]
    assert (purchases.value, purchases.result) == (2, True)
    assert by_path["condition.any[1].all[1]"].result is False
    latest = by_path["condition.any[2].all[0]"]
    assert latest.value == (NOW - timedelta(days=1)).isoformat()
    assert latest.result is False
    assert by_path["condition.any[2].all[2]"].value == "Lyon"
    assert by_path["condition.any[3]"].value is None
    assert by_path["condition.any[3]"].value_text == "signed_up_at is not set"
    assert by_path["condition"].value_text == "1 of 4 hold"


def test_a_tree_past_one_statement_s_parameters_is_evaluated_in_several(
    store_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("store.explain._PARAMS_PER_STATEMENT", 3)
    add_customer(store_engine, "p-1", {"plan": "team", "total_spent": 10})
    condition = parse_condition(
        {
            "any": [
                {"attribute": "plan", "op": "in", "value": ["pro", "team", "free"]},
                {"attribute": "total_spent", "op": "gt", "value": 5},
                {"not": {"attribute": "plan", "op": "eq", "value": "team"}},
            ]
        }
    )
    with store_engine.connect() as conn:
        tree = explain_condition(conn, customer_id="p-1", condition=condition, now=NOW)
    assert [n.result for n in _flatten(tree)] == [True, True, True, False, True]


# --- the route ------------------------------------------------------------------------


def test_the_route_explains_segments_branches_and_campaigns(sqlite_engine: Engine) -> None:
    add_customer(sqlite_engine, "r-1", {"total_spent": 900, "sms_opt_in": True})
    add_label_segment(sqlite_engine, "default:champions", ["r-1"])
    add_label_segment(sqlite_engine, "default:at-risk", [])
    with api_harness(sqlite_engine) as api:
        with sqlite_engine.begin() as conn:
            segment_store.create_segment(
                conn,
                slug="high-value",
                name="High value",
                kind="rule",
                condition={
                    "all": [
                        {"segment": "default:champions"},
                        {"attribute": "total_spent", "op": "gt", "value": 500},
                    ]
                },
                now=NOW,
            )
        answer = api.get("/v1/customers/r-1/explain?segment=high-value", role="support")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["kind"], body["member"]) == ("segment", False)
        assert body["conditions"][0]["result"] is True
        assert "the condition holds now" in body["summary"]
        assert [c["result"] for c in body["conditions"][0]["tree"]["children"]] == [True, True]

        winback = json.loads(Path("templates/journeys/at_risk.json").read_text())
        created = api.post("/v1/journeys", json=winback, role="marketer")
        assert created.status_code == 201, created.text
        branch = api.get(
            "/v1/customers/r-1/explain?journey=at-risk-winback&step=by_channel", role="support"
        ).json()
        assert branch["outcome"] == "branch 1 -> winback_sms"
        assert branch["conditions"][0]["tree"]["value"] is True
        trigger = api.get("/v1/customers/r-1/explain?journey=at-risk-winback").json()
        assert (trigger["kind"], trigger["member"]) == ("journey_trigger", False)
        not_branch = api.get("/v1/customers/r-1/explain?journey=at-risk-winback&step=welcome")
        assert (not_branch.status_code, not_branch.json()["error"]["field"]) == (422, "step")

        add_label_segment(sqlite_engine, "vip", [])
        assert (
            api.post("/v1/personalizations", json=campaign("home"), role="marketer").status_code
            == 201
        )
        chosen = api.get("/v1/customers/r-1/explain?personalization=home").json()
        assert [(c["label"], c["result"]) for c in chosen["conditions"]] == [
            ("VIP", False),
            ("Big spenders", True),
        ]
        bucket = bucket_of("home", "r-1")
        assert chosen["outcome"] == (
            "control group: shown the default content instead of Big spenders"
            if bucket < 1_000
            else "experience Big spenders"
        )
        assert chosen["notes"][0].startswith(f"control bucket {bucket} of 10000")
        assert "the campaign is draft" in chosen["notes"][1]

        for query, field in (
            ("", "segment"),
            ("?segment=a&journey=b", "journey"),
            ("?step=x&segment=high-value", "step"),
        ):
            refused = api.get(f"/v1/customers/r-1/explain{query}")
            assert (refused.status_code, refused.json()["error"]["field"]) == (422, field)
        for query, field in (
            ("?segment=nope", "segment"),
            ("?journey=nope", "journey"),
            ("?personalization=nope", "personalization"),
        ):
            missing = api.get(f"/v1/customers/r-1/explain{query}")
            assert (missing.status_code, missing.json()["error"]["field"]) == (404, field)
        unknown = api.get("/v1/customers/nobody/explain?segment=high-value")
        assert (unknown.status_code, unknown.json()["error"]["field"]) == (404, "customer_id")
        for role in ("ingest", "web"):
            assert (
                api.get("/v1/customers/r-1/explain?segment=high-value", role=role).status_code
                == 403
            )
        assert (
            api.get("/v1/customers/r-1/explain?segment=high-value", role="marketer").status_code
            == 200
        )
