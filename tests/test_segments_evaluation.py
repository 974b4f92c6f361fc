"""Segment passes: memberships and transitions, real-time re-evaluation, dependencies,
validation of references, and the seed's combined segments (examples/segments/*.json)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from core.errors import Conflict, ValidationFailed
from store import segments as store
from tests.utils.segments import NOW, add_customer, add_event, add_label_segment

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "segments"


def transitions(engine, slug):
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT customer_id, kind, source FROM segment_transitions WHERE segment_slug = :s ORDER BY id"
            ),
            {"s": slug},
        )
        return [tuple(r) for r in rows]


def members(engine, slug):
    with engine.connect() as conn:
        return [m.customer_id for m in store.iter_members(conn, slug=slug)]


def create(engine, slug, condition, **kw):
    with engine.begin() as conn:
        return store.create_segment(
            conn, slug=slug, name=slug, kind="rule", condition=condition, now=NOW, **kw
        )


def evaluate(engine, slug, now=NOW):
    with engine.begin() as conn:
        return store.evaluate_segment(conn, slug=slug, now=now)


BUYERS = {"event": "Purchase", "count": {"gte": 2}, "within": "P30D"}


def test_a_transition_is_written_once_per_change(store_engine):
    for cid in ("a", "b", "c"):
        add_customer(store_engine, cid)
    add_event(store_engine, "a", "Purchase", days_ago=25)
    add_event(store_engine, "a", "Purchase", days_ago=26)
    add_event(store_engine, "b", "Purchase", days_ago=3)
    create(store_engine, "buyers", BUYERS)

    first = evaluate(store_engine, "buyers")
    assert (first.entries, first.exits) == (1, 0)
    assert members(store_engine, "buyers") == ["a"]
    rerun = evaluate(store_engine, "buyers")
    assert (rerun.entries, rerun.exits) == (0, 0)

    add_event(store_engine, "b", "Purchase", days_ago=-5)
    # Ten days on, a's purchases have left the 30-day window and b has two inside it.
    later = NOW + timedelta(days=10)
    changed = evaluate(store_engine, "buyers", now=later)
    assert (changed.entries, changed.exits) == (1, 1)
    assert evaluate(store_engine, "buyers", now=later) == changed.__class__(0, 0)
    assert transitions(store_engine, "buyers") == [
        ("a", "entered", "segment-pass:buyers"),
        ("a", "exited", "segment-pass:buyers"),
        ("b", "entered", "segment-pass:buyers"),
    ]
    with store_engine.connect() as conn:
        assert store.get_segment(conn, slug="buyers").evaluated_at == later


def test_unknown_segment_is_rejected_with_its_path(store_engine):
    with pytest.raises(ValidationFailed) as caught:
        create(
            store_engine,
            "x",
            {"all": [{"attribute": "a", "op": "exists"}, {"any": [{"segment": "nope"}]}]},
        )
    assert [(e.field, e.code) for e in caught.value.errors] == [
        ("condition.all[1].any[0].segment", "unknown_segment")
    ]


def test_cycles_are_rejected_with_the_node_that_closes_them(store_engine):
    add_label_segment(store_engine, "default:champions", [])
    create(store_engine, "one", {"segment": "default:champions"})
    create(store_engine, "two", {"all": [{"segment": "one"}]})
    create(store_engine, "three", {"any": [{"attribute": "a", "op": "exists"}, {"segment": "two"}]})
    with pytest.raises(ValidationFailed) as caught, store_engine.begin() as conn:
        store.update_segment(
            conn,
            slug="one",
            name="one",
            now=NOW,
            condition={"any": [{"segment": "default:champions"}, {"segment": "three"}]},
        )
    error = caught.value.errors[0]
    assert (error.field, error.code) == ("condition.any[1]", "cycle")
    assert "one -> three -> two -> one" in error.message
    with pytest.raises(ValidationFailed) as caught, store_engine.begin() as conn:
        store.update_segment(
            conn, slug="two", name="two", now=NOW, condition={"not": {"segment": "two"}}
        )
    assert caught.value.errors[0].field == "condition.not"


def test_segments_in_use_or_owned_by_rfm_are_not_deleted(store_engine):
    add_label_segment(store_engine, "default:champions", [])
    create(store_engine, "one", {"segment": "default:champions"})
    with pytest.raises(Conflict), store_engine.begin() as conn:
        store.delete_segment(conn, slug="default:champions")
    create(store_engine, "two", {"segment": "one"})
    with pytest.raises(Conflict), store_engine.begin() as conn:
        store.delete_segment(conn, slug="one")
    with store_engine.begin() as conn:
        store.delete_segment(conn, slug="two")
        store.delete_segment(conn, slug="one")
        assert [s.slug for s in store.list_segments(conn)] == ["default:champions"]


def test_dependents_follow_a_label_change_in_order(store_engine):
    for cid in ("a", "b"):
        add_customer(store_engine, cid, {"vip": True})
    add_label_segment(store_engine, "default:champions", ["a"])
    create(
        store_engine,
        "vip-champions",
        {
            "all": [
                {"segment": "default:champions"},
                {"attribute": "vip", "op": "eq", "value": True},
            ]
        },
    )
    create(store_engine, "not-vip-champions", {"not": {"segment": "vip-champions"}})
    create(store_engine, "unrelated", {"attribute": "vip", "op": "exists"})
    with store_engine.begin() as conn:
        ran = store.evaluate_dependents(conn, segment_slugs=["default:champions"], now=NOW)
    assert list(ran) == ["vip-champions", "not-vip-champions"]
    assert members(store_engine, "vip-champions") == ["a"]
    assert members(store_engine, "not-vip-champions") == ["b"]
    assert members(store_engine, "unrelated") == []

    with store_engine.begin() as conn:  # the RFM pass moves b into champions
        conn.execute(
            text(
                "INSERT INTO segment_memberships (segment_slug, customer_id, since) VALUES ('default:champions', 'b', '2026-11-20 12:00:00.000000')"
            )
        )
        ran = store.evaluate_dependents(conn, segment_slugs=["default:champions"], now=NOW)
    assert {slug: (d.entries, d.exits) for slug, d in ran.items()} == {
        "vip-champions": (1, 0),
        "not-vip-champions": (0, 1),
    }


def test_realtime_reevaluation_touches_only_the_given_customers(store_engine):
    for cid in ("a", "b", "c"):
        add_customer(store_engine, cid, {"plan": "pro"})
    create(store_engine, "buyers", BUYERS)
    create(
        store_engine,
        "pro-buyers",
        {"all": [{"segment": "buyers"}, {"attribute": "plan", "op": "eq", "value": "pro"}]},
    )
    add_event(store_engine, "a", "Purchase", days_ago=1)
    add_event(store_engine, "a", "Purchase", days_ago=2)
    add_event(store_engine, "b", "Purchase", days_ago=1)
    add_event(store_engine, "b", "Purchase", days_ago=2)
    with store_engine.begin() as conn:
        diff = store.reevaluate_customers(conn, customer_ids=["a"], now=NOW)
    # buyers first, then pro-buyers that names it, in the same call
    assert (diff.entries, diff.exits) == (2, 0)
    assert members(store_engine, "buyers") == ["a"]
    assert members(store_engine, "pro-buyers") == ["a"]
    assert transitions(store_engine, "pro-buyers") == [("a", "entered", "segment-realtime")]
    with store_engine.begin() as conn:
        again = store.reevaluate_customers(conn, customer_ids=["a", "unknown"], now=NOW)
    assert (again.entries, again.exits) == (0, 0)


def test_due_segments_follow_their_schedule(store_engine):
    create(store_engine, "often", {"attribute": "a", "op": "exists"})
    create(store_engine, "daily", {"attribute": "a", "op": "exists"}, schedule="P1D")
    with store_engine.connect() as conn:
        assert store.due_segments(conn, now=NOW) == ["daily", "often"]
    evaluate(store_engine, "often")
    evaluate(store_engine, "daily")
    with store_engine.connect() as conn:
        assert store.due_segments(conn, now=NOW + timedelta(minutes=6)) == ["often"]
    with pytest.raises(ValidationFailed):
        create(store_engine, "too-often", {"attribute": "a", "op": "exists"}, schedule="PT5S")


def test_members_page_and_transitions_follow(store_engine):
    for i in range(5):
        add_customer(store_engine, f"c{i}", {"n": i})
    create(store_engine, "all", {"attribute": "n", "op": "gte", "value": 0})
    evaluate(store_engine, "all")
    with store_engine.connect() as conn:
        first = store.list_members(conn, slug="all", limit=2)
        second = store.list_members(conn, slug="all", limit=2, after=first[-1].customer_id)
        assert [m.customer_id for m in first + second] == ["c0", "c1", "c2", "c3"]
        assert first[0].since == NOW
        followed = store.list_transitions(conn, slug="all", limit=3)
        rest = store.list_transitions(conn, slug="all", limit=10, after_id=followed[-1].id)
        assert [t.customer_id for t in followed + rest] == ["c0", "c1", "c2", "c3", "c4"]
        assert (
            store.list_transitions(
                conn, slug="all", limit=10, since_time=NOW + timedelta(seconds=1)
            )
            == []
        )
        assert len(store.list_transitions(conn, slug="all", limit=10, since_time=NOW)) == 5


def load_example(name):
    return json.loads((EXAMPLES / name).read_text())


def test_seed_segments_work_as_written(store_engine):
    add_label_segment(store_engine, "default:champions", ["big", "small"])
    add_label_segment(store_engine, "default:promising", ["new", "old"])
    add_customer(store_engine, "big", {"total_spent": 820.5})
    add_customer(store_engine, "small", {"total_spent": 120})
    add_customer(store_engine, "rich-not-champion", {"total_spent": 9000})
    add_customer(store_engine, "new", {"signed_up_at": (NOW - timedelta(days=12)).isoformat()})
    add_customer(store_engine, "old", {"signed_up_at": "2026-01-05T08:00:00+01:00"})
    add_customer(store_engine, "gone", {"engagement_score": 12})
    add_customer(store_engine, "gone-but-engaged", {"engagement_score": 75})
    add_customer(store_engine, "active", {"engagement_score": 10})
    add_customer(store_engine, "never-seen", {"engagement_score": 5})
    add_event(store_engine, "gone", "Visit", days_ago=45)
    add_event(store_engine, "gone-but-engaged", "Purchase", days_ago=60)
    add_event(store_engine, "active", "Visit", days_ago=45)
    add_event(store_engine, "active", "email_clicked", days_ago=3)

    expected = {
        "high-value-champions.json": ["big"],
        "new-promising-customers.json": ["new"],
        "churning-users.json": ["gone"],
    }
    for filename, who in expected.items():
        example = load_example(filename)
        create(store_engine, example["slug"], example["condition"])
        diff = evaluate(store_engine, example["slug"])
        assert diff.entries == len(who)
        assert members(store_engine, example["slug"]) == who
