"""A segment is whole from the moment it is saved: the save starts a full evaluation at
once (a workflow), the segment says `evaluating` then `ready`, and real-time processing,
the evaluation and scheduled passes may run in any order and still agree with a fresh
evaluation, customer by customer, with each customer's transitions in order."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from core.tables import utcnow
from store import segments as segment_store
from tests.utils.pipeline import running_product
from tests.utils.rfm import model_body

BUYERS = {"event": "Purchase", "count": {"gte": 1}, "within": "P30D"}
BIG_BUYERS = {
    "event": "Purchase",
    "count": {"gte": 1},
    "within": "P30D",
    "where": [{"property": "total_price", "op": "gte", "value": 50}],
}


def _purchase(customer: str, n: int, price: float, at: datetime) -> dict[str, Any]:
    return {
        "event_id": f"{customer}-{n}",
        "customer_id": customer,
        "name": "Purchase",
        "occurred_at": at.isoformat(),
        "properties": {"total_price": price},
    }


def _fresh_members(engine: Engine, slug: str, now: datetime) -> set[str]:
    """An independent full evaluation: the stored condition, compiled, run alone."""
    with engine.connect() as conn:
        segment = segment_store.get_segment(conn, slug=slug)
        return set(
            segment_store.preview(
                conn, condition=segment.condition or {}, now=now, sample=100_000
            ).sample
        )


def _stored_members(engine: Engine, slug: str) -> set[str]:
    with engine.connect() as conn:
        return {m.customer_id for m in segment_store.iter_members(conn, slug=slug)}


def _transitions(engine: Engine, slug: str) -> dict[str, list[str]]:
    by_customer: dict[str, list[str]] = defaultdict(list)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT customer_id, kind FROM segment_transitions WHERE segment_slug = :s"
                " ORDER BY id"
            ),
            {"s": slug},
        )
        for customer, kind in rows:
            by_customer[customer].append(kind)
    return by_customer


def _assert_transitions_alternate(engine: Engine, slug: str) -> None:
    members = _stored_members(engine, slug)
    for customer, kinds in _transitions(engine, slug).items():
        expected = ["entered", "exited"] * len(kinds)
        assert kinds == expected[: len(kinds)], (customer, kinds)
        assert (kinds[-1] == "entered") == (customer in members), (customer, kinds)


async def _quiet(engine: Engine, seconds: float = 60) -> None:
    """Until the real-time processor has nothing left to take."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        with engine.connect() as conn:
            pending = conn.execute(
                text(
                    "SELECT (SELECT COUNT(*) FROM events WHERE realtime_pending)"
                    " + (SELECT COUNT(*) FROM customers WHERE realtime_pending)"
                )
            ).scalar_one()
        if not pending:
            await asyncio.sleep(0.3)  # the batch that took the last ones commits
            return
        await asyncio.sleep(0.05)
    raise AssertionError("real-time work still pending")


async def test_a_saved_segment_is_evaluated_at_once_and_says_when_it_is_ready(
    store_engine: Engine, dev_server_env: Any
) -> None:
    now = utcnow()
    async with running_product(store_engine, dev_server_env) as api:
        events = [
            _purchase(f"c{i}", 0, price=10.0 * i, at=now - timedelta(days=i)) for i in range(1, 41)
        ]
        bulk = await api.post("/v1/events/bulk", json=events, params={"realtime": "false"})
        assert bulk.status_code == 200, bulk.text

        body = {"slug": "buyers", "name": "Buyers", "condition": BUYERS}
        created = await api.post("/v1/segments", json=body, params={"wait": "true"})
        assert created.status_code == 201, created.text
        segment = created.json()
        assert segment["state"] == "ready" and segment["evaluated_version"] == 1
        expected = _fresh_members(store_engine, "buyers", utcnow())
        assert len(expected) == 29  # purchases 1..29 days ago are within 30 days
        assert segment["member_count"] == 29
        assert _stored_members(store_engine, "buyers") == expected

        # A new definition: the change's entries and exits, once each, and ready again.
        changed = await api.put(
            "/v1/segments/buyers",
            json={"name": "Big buyers", "condition": BIG_BUYERS},
            params={"wait": "true"},
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["state"] == "ready" and changed.json()["evaluated_version"] == 2
        expected = _fresh_members(store_engine, "buyers", utcnow())
        assert _stored_members(store_engine, "buyers") == expected
        transitions = _transitions(store_engine, "buyers")
        exited = {c for c, kinds in transitions.items() if kinds == ["entered", "exited"]}
        assert exited == {f"c{i}" for i in range(1, 5)}  # under 50
        _assert_transitions_alternate(store_engine, "buyers")
        listed = (await api.get("/v1/segments")).json()["data"]
        assert [(s["slug"], s["state"], s["member_count"]) for s in listed] == [
            ("buyers", "ready", len(expected))
        ]

        # Without waiting, the answer says evaluating; it becomes ready by itself.
        other = {"slug": "all-buyers", "name": "All", "condition": BUYERS}
        saved = (await api.post("/v1/segments", json=other)).json()
        assert saved["evaluated_version"] is None
        assert saved["state"] == "evaluating"
        for _ in range(2400):  # waits at most 2 minutes on a loaded machine
            shown = (await api.get("/v1/segments/all-buyers")).json()
            if shown["state"] == "ready":
                break
            await asyncio.sleep(0.05)
        assert shown["state"] == "ready" and shown["member_count"] == 29

        # An RFM model's first pass starts at its save too.
        model = await api.post("/v1/rfm-models", json=model_body(realtime=True))
        assert model.status_code == 201, model.text
        for _ in range(2400):  # waits at most 2 minutes on a loaded machine
            summary = (await api.get("/v1/rfm-models/default/summary")).json()
            if summary.get("scored"):
                break
            await asyncio.sleep(0.05)
        assert summary["scored"] == 40


async def test_real_time_a_save_and_scheduled_passes_agree_with_a_fresh_evaluation(
    store_engine: Engine, dev_server_env: Any
) -> None:
    rng = random.Random(23)
    now = utcnow()
    customers = [f"k{i:03d}" for i in range(120)]
    async with running_product(store_engine, dev_server_env) as api:
        history = [
            _purchase(
                c, 0, price=rng.choice([5.0, 80.0]), at=now - timedelta(days=rng.randint(1, 60))
            )
            for c in customers
        ]
        assert (
            await api.post("/v1/events/bulk", json=history, params={"realtime": "false"})
        ).status_code == 200

        async def ingest() -> None:
            for n in range(1, 5):
                batch = [
                    _purchase(c, n, price=rng.choice([5.0, 80.0]), at=utcnow())
                    for c in rng.sample(customers, 30)
                ]
                for event in batch:
                    answer = await api.post("/v1/events", json=event)
                    assert answer.status_code == 201, answer.text
                await asyncio.sleep(0.05)

        async def save_and_pass() -> None:
            body = {"slug": "big", "name": "Big", "condition": BIG_BUYERS}
            assert (await api.post("/v1/segments", json=body)).status_code == 201
            for _ in range(3):
                await asyncio.sleep(0.1)
                answer = await api.post("/v1/segments/big/evaluate")
                assert answer.status_code == 200, answer.text
            change = {"name": "Big", "condition": {**BIG_BUYERS, "within": "P20D"}}
            assert (await api.put("/v1/segments/big", json=change)).status_code == 200
            answer = await api.post("/v1/segments/big/evaluate")
            assert answer.status_code == 200, answer.text

        await asyncio.gather(ingest(), save_and_pass())
        await _quiet(store_engine)
        for _ in range(
            2400
        ):  # waits at most 2 minutes on a loaded machine  # the save's own evaluation may still be on its way
            if (await api.get("/v1/segments/big")).json()["state"] == "ready":
                break
            await asyncio.sleep(0.05)
        await _quiet(store_engine)

    stored = _stored_members(store_engine, "big")
    fresh = _fresh_members(store_engine, "big", utcnow())
    assert stored == fresh, (sorted(stored - fresh), sorted(fresh - stored))
    _assert_transitions_alternate(store_engine, "big")


# --- the protocol between full passes and real time (PostgreSQL; SQLite's one write
# lock serializes them by itself) ---------------------------------------------------------


def _pg_store(postgres_engine: Engine) -> None:
    from tests.utils.segments import add_customer, create_rule_segment

    create_rule_segment(postgres_engine, "big", BIG_BUYERS)
    add_customer(postgres_engine, "x")


def test_real_time_leaves_a_segment_a_pass_holds_and_comes_back_after_it(
    postgres_engine: Engine,
) -> None:
    from store.membership_locks import hold_for_pass, segment_key
    from tests.utils.segments import drain_realtime, realtime_processor, segment_members

    _pg_store(postgres_engine)
    with postgres_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO events (event_id, customer_id, name, occurred_at, properties,"
                " received_at, realtime_pending) VALUES ('e1', 'x', 'Purchase', now(),"
                " '{\"total_price\": 80}', now(), TRUE)"
            )
        )
    with postgres_engine.connect() as pass_conn:
        transaction = pass_conn.begin()
        hold_for_pass(pass_conn, key=segment_key("big"))  # a pass is writing `big`
        realtime_processor(postgres_engine).process_batch(500)
        assert segment_members(postgres_engine, "big") == []
        with postgres_engine.connect() as conn:
            flagged = conn.execute(
                text("SELECT realtime_pending FROM customers WHERE id = 'x'")
            ).scalar_one()
        assert flagged  # x comes back to real time once the pass is done
        transaction.commit()
    drain_realtime(postgres_engine)
    assert segment_members(postgres_engine, "big") == ["x"]


def test_a_pass_waits_for_real_time_in_flight_and_reads_what_it_wrote(
    postgres_engine: Engine,
) -> None:
    import threading

    from store.membership_locks import keys_held_by_a_pass, segment_key

    _pg_store(postgres_engine)
    with postgres_engine.connect() as realtime_conn:
        transaction = realtime_conn.begin()
        assert keys_held_by_a_pass(realtime_conn, keys=[segment_key("big")]) == set()
        realtime_conn.execute(  # real time in flight: its batch has not committed yet
            text(
                "INSERT INTO events (event_id, customer_id, name, occurred_at, properties,"
                " received_at) VALUES ('e1', 'x', 'Purchase', now(), '{\"total_price\": 80}',"
                " now())"
            )
        )
        done = threading.Event()

        def full_pass() -> None:
            with postgres_engine.begin() as conn:
                segment_store.evaluate_segment(
                    conn, slug="big", now=utcnow() + timedelta(seconds=1)
                )
            done.set()

        runner = threading.Thread(target=full_pass)
        runner.start()
        assert not done.wait(0.5)  # the pass waits for the batch holding `big`
        transaction.commit()
        runner.join(10)
    assert done.is_set()
    assert _stored_members(postgres_engine, "big") == {"x"}


def test_transitions_follow_with_cursor_as_every_list_does(
    store_engine: Engine, temporal_address: str
) -> None:
    from tests.utils.api import api_harness

    with api_harness(store_engine, temporal_address=temporal_address) as api:
        body = {"slug": "ext", "name": "E", "owner": "external"}
        assert api.post("/v1/segments", "marketer", json=body).status_code == 201
        ids = {"customer_ids": [f"c{i}" for i in range(5)]}
        assert api.post("/v1/segments/ext/entries", "ingest", json=ids).status_code == 200
        first = api.get("/v1/segments/ext/transitions?limit=3", "support").json()
        rest = api.get(
            f"/v1/segments/ext/transitions?limit=3&cursor={first['next_cursor']}", "support"
        ).json()
        by_since = api.get(
            f"/v1/segments/ext/transitions?limit=3&since={first['next_cursor']}", "support"
        ).json()
        assert [t["customer_id"] for t in first["data"] + rest["data"]] == ids["customer_ids"]
        assert rest == by_since
        page = api.get("/v1/segments?limit=1", "support").json()
        assert [s["slug"] for s in page["data"]] == ["ext"] and page["next_cursor"] is None


def test_the_evaluated_version_migration_reverses(store_engine: Engine) -> None:
    from sqlalchemy import inspect

    from tests.test_store_smoke import _migrate

    def columns() -> set[str]:
        return {c["name"] for c in inspect(store_engine).get_columns("segments")}

    assert "evaluated_version" in columns()
    _migrate(store_engine, "0007")
    assert "evaluated_version" not in columns()
    _migrate(store_engine, "head")
    assert "evaluated_version" in columns()
