"""Poison is quarantined, not contagious: records that the input bounds now refuse (but an
older version stored, or that slip past them) are planted straight into the store beside
a healthy customer, whose purchase still reaches its segment; each poison is set aside
with its error, shown to admins and on the item, and retried with backoff."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from core.tables import Segment, utcnow
from store.failures import failures_of
from tests.utils.api import ApiHarness, api_harness
from tests.utils.segments import (
    create_rule_segment,
    drain_realtime,
    realtime_processor,
    segment_members,
)

BUYERS = {"event": "Purchase", "count": {"gte": 1}, "within": "P30D"}
RECENT_SIGNUPS = {"attribute": "signed_up_at", "op": "after", "value": "P30D"}


def _nested_not(depth: int) -> dict[str, Any]:
    condition: dict[str, Any] = {"attribute": "plan", "op": "eq", "value": "pro"}
    for _ in range(depth):
        condition = {"not": condition}
    return condition


POISON_SEGMENTS = {
    "poison-within": {"event": "Purchase", "count": {"gte": 1}, "within": "P1000000D"},
    "poison-big-value": {"attribute": "plan", "op": "gt", "value": 2**64},
    "poison-deep-not": _nested_not(50),
    "poison-last": {"event": "Purchase", "last": {"more_than": "P999999999D"}},
}


@pytest.fixture
def api(store_engine: Engine) -> Iterator[ApiHarness]:
    with api_harness(store_engine) as harness:
        yield harness


def _plant_segment(engine: Engine, slug: str, condition: dict[str, Any]) -> None:
    """A rule segment as an older version stored it, past today's validation."""
    with Session(engine) as session:
        session.add(Segment(slug=slug, name=slug, kind="rule", condition=condition))
        session.commit()


def _purchase(api: ApiHarness, customer_id: str, event_id: str) -> None:
    at = (utcnow() - timedelta(hours=1)).isoformat()
    body = {
        "event_id": event_id,
        "customer_id": customer_id,
        "name": "Purchase",
        "occurred_at": at,
        "properties": {"total_price": 10},
    }
    response = api.post("/v1/events", "ingest", json=body)
    assert response.status_code == 201, response.text


def test_poisoned_segments_and_customers_never_hold_up_a_healthy_purchase(
    api: ApiHarness,
) -> None:
    engine = api.engine
    postgres = engine.dialect.name == "postgresql"
    create_rule_segment(engine, "buyers", BUYERS)
    create_rule_segment(engine, "recent-signups", RECENT_SIGNUPS)
    for slug, condition in POISON_SEGMENTS.items():
        _plant_segment(engine, slug, condition)
    if not postgres:  # PostgreSQL cannot hold a NUL in jsonb at all
        _plant_segment(engine, "poison-nul", {"attribute": "pl\x00an", "op": "eq", "value": 1})

    # Customers whose stored data an older version let in.
    _purchase(api, "bad-date", "e-bad-date")
    _purchase(api, "bad-json", "e-bad-json")
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE customers SET attributes = :a WHERE id = 'bad-date'"),
            {"a": '{"signed_up_at": "2026-02-30T00:00:00Z"}'},
        )
        if not postgres:  # SQLite kept NaN as JSON text no JSON reader accepts
            conn.execute(
                text("""UPDATE customers SET attributes = '{"k": NaN}' WHERE id = 'bad-json'""")
            )
    _purchase(api, "healthy", "e-healthy")

    drain_realtime(engine)

    assert "healthy" in segment_members(engine, "buyers")
    assert "bad-date" in segment_members(engine, "buyers")  # an impossible date only fails to match
    assert "bad-date" not in segment_members(engine, "recent-signups")
    listed = api.get("/v1/health/failures", "support")
    assert listed.status_code == 200, listed.text
    failing = {(f["kind"], f["key"]) for f in listed.json()["data"]}
    expected = {("segment", slug) for slug in POISON_SEGMENTS}
    if not postgres:
        expected |= {("segment", "poison-nul"), ("customer", "bad-json")}
    assert failing == expected
    shown = api.get("/v1/segments/poison-deep-not", "support").json()
    assert shown["status"] == "failing" and "10 deep" in shown["error"]
    assert api.get("/v1/segments/buyers", "support").json()["status"] == "ok"

    # Everyone keeps flowing after the poison is set aside: a later purchase too.
    _purchase(api, "later", "e-later")
    drain_realtime(engine)
    assert "later" in segment_members(engine, "buyers")


def test_a_set_aside_customer_is_retried_with_backoff_and_cleared_once_mended(
    sqlite_engine: Engine,
) -> None:
    # SQLite only: its poison (NaN in stored JSON text) cannot be stored on PostgreSQL.
    with api_harness(sqlite_engine) as api:
        _retried_with_backoff_then_cleared(api)


def _retried_with_backoff_then_cleared(api: ApiHarness) -> None:
    engine = api.engine
    create_rule_segment(engine, "rich", {"attribute": "k", "op": "gt", "value": 1})
    _purchase(api, "bad-json", "e-1")
    with engine.begin() as conn:
        conn.execute(
            text("""UPDATE customers SET attributes = '{"k": NaN}' WHERE id = 'bad-json'""")
        )
    drain_realtime(engine)
    with engine.connect() as conn:
        [first] = failures_of(conn, kind="customer", key="bad-json")
    assert first.attempts == 1
    assert first.next_attempt_at - first.last_failed_at == timedelta(seconds=1)

    def retry_now() -> None:
        with engine.begin() as conn:
            conn.execute(text("UPDATE failures SET next_attempt_at = first_failed_at"))

    retry_now()
    realtime_processor(engine).process_batch(500)
    with engine.connect() as conn:
        [second] = failures_of(conn, kind="customer", key="bad-json")
    assert second.attempts == 2
    assert second.next_attempt_at - second.last_failed_at == timedelta(seconds=2)

    with engine.begin() as conn:
        conn.execute(text("""UPDATE customers SET attributes = '{"k": 5}' WHERE id = 'bad-json'"""))
    retry_now()
    realtime_processor(engine).process_batch(500)
    with engine.connect() as conn:
        assert failures_of(conn, kind="customer", key="bad-json") == []
    assert segment_members(engine, "rich") == ["bad-json"]


def test_a_scheduled_pass_sets_a_failing_dependent_aside_and_evaluates_the_rest(
    api: ApiHarness,
) -> None:
    engine = api.engine
    create_rule_segment(engine, "buyers", BUYERS)
    create_rule_segment(engine, "buyers-too", {"segment": "buyers"})
    _plant_segment(engine, "poison-dependent", {"all": [{"segment": "buyers"}, _nested_not(50)]})
    _purchase(api, "healthy", "e-1")
    response = api.post("/v1/segments/buyers/evaluate", "marketer")
    assert response.status_code == 200, response.text
    dependents = {d["slug"]: d for d in response.json()["dependents"]}
    assert dependents["buyers-too"]["error"] is None
    assert "10 deep" in dependents["poison-dependent"]["error"]
    assert segment_members(engine, "buyers-too") == ["healthy"]
    refused = api.post("/v1/segments/poison-dependent/evaluate", "marketer")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "evaluation_failed"
    with engine.connect() as conn:
        [failure] = failures_of(conn, kind="segment", key="poison-dependent")
    assert failure.stage == "segment_pass" and failure.attempts == 2


async def test_an_unreadable_journey_is_set_aside_and_the_others_start(
    time_skipping_env: Any, store_engine: Engine
) -> None:
    from activities.dispatch import TransitionDispatcher
    from tests.test_journey_dispatch import SEGMENT, SHORT, _install, _transition, _undispatched
    from tests.utils.journey_runtime import (
        FakeMessenger,
        add_customers,
        add_segment,
        client_for,
        journey_worker,
    )

    client = client_for(time_skipping_env)
    customers = ["q-1", "q-2"]
    add_segment(store_engine, SEGMENT)
    add_customers(store_engine, customers)
    _install(store_engine, SHORT)
    _install(store_engine, {**SHORT, "slug": "unreadable"})
    with store_engine.begin() as conn:  # as an older version (or a hand edit) left it
        conn.execute(
            text("UPDATE journey_versions SET definition = :d WHERE journey_slug = 'unreadable'"),
            {
                "d": '{"slug": "unreadable", "steps": {"x": {"type": "delay", "duration": "P1000000000D"}}}'
            },
        )
    _transition(store_engine, customers)
    async with journey_worker(client, store_engine, FakeMessenger(store_engine)) as queue:
        counts = await TransitionDispatcher(store_engine, client, task_queue=queue).dispatch_once()
    assert (counts.transitions, counts.entries) == (2, 2)
    assert counts.failed == 1
    assert _undispatched(store_engine) == 0
    with store_engine.connect() as conn:
        [failure] = failures_of(conn, kind="journey", key="unreadable")
    assert failure.stage == "dispatch" and "duration" in failure.error


async def test_beside_every_poison_a_purchase_reaches_its_segment_and_journey(
    dev_server_env: Any, store_engine: Engine
) -> None:
    """The whole pipeline (API, real-time processor, dispatcher, JourneyWorkflow, outbox)
    on a real Temporal dev server, with every poison planted: the healthy customer's
    purchase becomes a membership, a run and a welcome email. The time it takes is
    printed; bench/fuzz.py holds it to 2 s on a quiet machine."""
    import asyncio
    import json
    import time
    from pathlib import Path

    from tests.utils.pipeline import running_product

    engine = store_engine
    welcome = json.loads(
        (Path(__file__).resolve().parent.parent / "templates/journeys/champions.json").read_text()
    )
    journey = {
        **welcome,
        "slug": "buyers-welcome",
        "trigger": {"segment": "buyers"},
        "goal": None,
        "start": "welcome",
        "steps": {"welcome": {**welcome["steps"]["welcome"], "next": None}},
    }
    postgres = engine.dialect.name == "postgresql"
    async with running_product(engine, dev_server_env) as api:
        create_rule_segment(engine, "buyers", BUYERS)
        for slug, condition in POISON_SEGMENTS.items():
            _plant_segment(engine, slug, condition)
        for raw in (journey, {**journey, "slug": "unreadable"}):
            assert (await api.post("/v1/journeys", json=raw)).status_code == 201
            assert (await api.post(f"/v1/journeys/{raw['slug']}/activate")).status_code == 200
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE journey_versions SET definition = :d WHERE journey_slug = 'unreadable'"
                ),
                {"d": '{"slug": "unreadable", "steps": {}}'},
            )
        for customer in ("bad-date", "bad-json"):
            body = {
                "event_id": f"e-{customer}",
                "customer_id": customer,
                "name": "Signup",
                "occurred_at": utcnow().isoformat(),
            }
            assert (await api.post("/v1/events", json=body)).status_code == 201
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE customers SET attributes = :a, realtime_pending = TRUE WHERE id = 'bad-date'"
                ),
                {"a": '{"signed_up_at": "2026-02-30T00:00:00Z"}'},
            )
            if not postgres:
                conn.execute(
                    text(
                        """UPDATE customers SET attributes = '{"k": NaN}', realtime_pending = 1"""
                        " WHERE id = 'bad-json'"
                    )
                )

        profile = {"email": "healthy@example.com", "attributes": {"first_name": "Ada"}}
        assert (await api.put("/v1/customers/healthy", json=profile)).status_code == 201
        await asyncio.sleep(0.5)  # the profile's own real-time pass, before the clock starts
        started = time.monotonic()
        body = {
            "event_id": "e-healthy",
            "customer_id": "healthy",
            "name": "Purchase",
            "occurred_at": utcnow().isoformat(),
            "properties": {"total_price": 10},
        }
        assert (await api.post("/v1/events", json=body)).status_code == 201
        reached: dict[str, float] = {}
        while len(reached) < 2 and time.monotonic() - started < 60:
            profile = (await api.get("/v1/customers/healthy")).json()
            if "segment" not in reached and any(
                s["segment"] == "buyers" for s in profile["segments"]
            ):
                reached["segment"] = time.monotonic() - started
            outbox = (await api.get("/v1/outbox", params={"customer_id": "healthy"})).json()
            if "email" not in reached and outbox["data"]:
                reached["email"] = time.monotonic() - started
            await asyncio.sleep(0.05)
        print(f"\nbeside the poison ({engine.dialect.name}): {reached}")
        assert set(reached) == {"segment", "email"}, reached
        failing = {
            (f["kind"], f["key"]) for f in (await api.get("/v1/health/failures")).json()["data"]
        }
        assert {("segment", slug) for slug in POISON_SEGMENTS} <= failing
        assert ("journey", "unreadable") in failing
