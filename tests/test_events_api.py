"""Events in: single and bulk, idempotent, and every kind of bad input answered 4xx."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import orjson
import pytest
from sqlalchemy import text

from tests.utils.api import api_harness

EVENT = {
    "event_id": "e-1",
    "customer_id": "c-1",
    "name": "Purchase",
    "occurred_at": "2026-11-20T10:00:00Z",
    "properties": {"total_price": 42.5},
}


def count(engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


@pytest.fixture
def api(store_engine):
    with api_harness(store_engine, max_body_bytes=200_000) as harness:
        yield harness


def test_single_event_is_stored_once_and_creates_the_customer(api):
    first = api.post("/v1/events", role="ingest", json=EVENT)
    again = api.post("/v1/events", role="ingest", json=EVENT)
    assert first.status_code == 201 and first.json() == {"event_id": "e-1", "duplicate": False}
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert count(api.engine, "SELECT count(*) FROM events") == 1
    assert count(api.engine, "SELECT count(*) FROM customers WHERE id = 'c-1'") == 1
    with api.engine.connect() as conn:
        stored = conn.execute(text("SELECT properties FROM events")).scalar_one()
    stored = orjson.loads(stored) if isinstance(stored, str) else stored
    assert stored == {"total_price": 42.5}


def test_racing_repeats_store_one_event(api):
    results: list[int] = []

    def send() -> None:
        results.append(api.post("/v1/events", role="ingest", json=EVENT).status_code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results).count(201) == 1 and len(results) == 8
    assert all(code in (200, 201) for code in results)
    assert count(api.engine, "SELECT count(*) FROM events") == 1


def ndjson(*items: object) -> bytes:
    return b"\n".join(i if isinstance(i, bytes) else orjson.dumps(i) for i in items)


def test_bulk_ndjson_keeps_valid_lines_and_names_each_bad_one(api):
    good = [{**EVENT, "event_id": f"b-{i}", "customer_id": f"c-{i % 3}"} for i in range(5)]
    body = ndjson(
        good[0],
        good[1],
        b'{"event_id": "broken",',
        {**EVENT, "event_id": "no-zone", "occurred_at": "2026-11-20T10:00:00"},
        {**EVENT, "event_id": "bad-type", "properties": "not an object"},
        good[2],
        good[0],
        {k: v for k, v in EVENT.items() if k != "name"} | {"event_id": "no-name"},
        good[3],
        good[4],
    )
    response = api.post(
        "/v1/events/bulk",
        role="ingest",
        content=body,
        headers={"content-type": "application/x-ndjson"},
    )
    assert response.status_code == 422
    payload = response.json()
    assert payload["accepted"] == 5 and payload["duplicates"] == 1
    assert [(r["line"], r["field"]) for r in payload["rejected"]] == [
        (3, None),
        (4, "occurred_at"),
        (5, "properties"),
        (8, "name"),
    ]
    assert payload["error"]["code"] == "invalid_lines"
    assert count(api.engine, "SELECT count(*) FROM events") == 5
    assert (
        count(
            api.engine,
            "SELECT count(*) FROM events WHERE event_id IN ('no-zone', 'bad-type', 'no-name')",
        )
        == 0
    )


def test_bulk_json_array_all_valid_answers_200(api):
    items = [{**EVENT, "event_id": f"a-{i}"} for i in range(3)]
    response = api.post("/v1/events/bulk", role="ingest", json=items)
    assert response.status_code == 200
    assert response.json() == {"accepted": 3, "duplicates": 0, "rejected": []}
    repeat = api.post("/v1/events/bulk", role="ingest", json=items)
    assert repeat.json() == {"accepted": 0, "duplicates": 3, "rejected": []}


def as_utc(value: object) -> datetime:
    """A stored time as the store's raw row gives it (text on SQLite) in UTC."""
    moment = datetime.fromisoformat(str(value))
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


@pytest.mark.parametrize("how", ["bulk", "single"])
def test_events_store_each_field_as_sent_with_times_in_utc(api, how):
    properties = {"title": "Crème brûlée ☕", "items": [{"sku": 'a"b', "qty": 2}], "big": 2**62}
    items = [
        {**EVENT, "event_id": "t-1", "occurred_at": "2026-11-20T12:30:00.250000+02:00"},
        {**EVENT, "event_id": "t-2", "customer_id": "c-new", "properties": properties},
        {k: v for k, v in EVENT.items() if k != "properties"} | {"event_id": "t-3"},
    ]
    if how == "bulk":
        assert api.post("/v1/events/bulk", role="ingest", json=items).status_code == 200
    else:
        for item in items:
            assert api.post("/v1/events", role="ingest", json=item).status_code == 201
    with api.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT event_id, customer_id, name, occurred_at, properties FROM events"
                " ORDER BY event_id"
            )
        ).all()
    stored = [
        (r[0], r[1], r[2], as_utc(r[3]), orjson.loads(r[4]) if isinstance(r[4], str) else r[4])
        for r in rows
    ]
    assert stored == [
        (
            "t-1",
            "c-1",
            "Purchase",
            datetime(2026, 11, 20, 10, 30, 0, 250000, UTC),
            EVENT["properties"],
        ),
        ("t-2", "c-new", "Purchase", datetime(2026, 11, 20, 10, 0, tzinfo=UTC), properties),
        ("t-3", "c-1", "Purchase", datetime(2026, 11, 20, 10, 0, tzinfo=UTC), {}),
    ]
    assert count(api.engine, "SELECT count(*) FROM customers WHERE id IN ('c-1', 'c-new')") == 2


def test_bulk_history_import_is_not_processed_in_real_time(api):
    items = [{**EVENT, "event_id": f"h-{i}"} for i in range(2)]
    api.post("/v1/events/bulk?realtime=false", role="ingest", json=items)
    assert count(api.engine, "SELECT count(*) FROM events WHERE realtime_pending") == 0


@pytest.mark.parametrize(
    ("body", "content_type", "status", "field"),
    [
        (b'{"event_id": "e-1", ', "application/json", 400, "body"),
        (orjson.dumps({**EVENT, "properties": [1, 2]}), "application/json", 422, "properties"),
        (orjson.dumps({**EVENT, "event_id": 17}), "application/json", 422, "event_id"),
        (
            orjson.dumps({k: v for k, v in EVENT.items() if k != "customer_id"}),
            "application/json",
            422,
            "customer_id",
        ),
        (
            orjson.dumps({**EVENT, "occurred_at": "2026-11-20T10:00:00"}),
            "application/json",
            422,
            "occurred_at",
        ),
        (
            orjson.dumps({**EVENT, "occurred_at": "yesterday"}),
            "application/json",
            422,
            "occurred_at",
        ),
        (orjson.dumps({**EVENT, "colour": "red"}), "application/json", 422, "colour"),
        (
            orjson.dumps({**EVENT, "properties": {"x": "y" * 300_000}}),
            "application/json",
            413,
            "body",
        ),
    ],
    ids=[
        "malformed",
        "wrong-type",
        "id-not-string",
        "missing",
        "no-zone",
        "not-a-time",
        "unknown-field",
        "too-large",
    ],
)
def test_bad_single_events_answer_4xx_naming_the_field_and_store_nothing(
    api, body, content_type, status, field
):
    response = api.post(
        "/v1/events", role="ingest", content=body, headers={"content-type": content_type}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"] and error["code"]
    assert "Traceback" not in response.text
    assert count(api.engine, "SELECT count(*) FROM events") == 0


def test_bulk_over_the_size_limit_is_refused_whole(api):
    lines = [
        {**EVENT, "event_id": f"big-{i}", "properties": {"pad": "x" * 1000}} for i in range(400)
    ]
    response = api.post(
        "/v1/events/bulk",
        role="ingest",
        content=ndjson(*lines),
        headers={"content-type": "application/x-ndjson"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["field"] == "body"
    assert count(api.engine, "SELECT count(*) FROM events") == 0


def test_bulk_over_the_line_limit_is_refused_whole(store_engine):
    with api_harness(store_engine, max_bulk_lines=3) as api:
        items = [{**EVENT, "event_id": f"n-{i}"} for i in range(4)]
        response = api.post("/v1/events/bulk", role="ingest", json=items)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "too_many_records"
        assert count(api.engine, "SELECT count(*) FROM events") == 0


def test_bulk_needs_a_json_content_type(api):
    response = api.post(
        "/v1/events/bulk", role="ingest", content=b"a,b\n1,2", headers={"content-type": "text/csv"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "content-type"
