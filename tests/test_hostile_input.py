"""Hostile input: every case answers 4xx naming the field and stores nothing, on both
databases (each case here answered 5xx, or was stored, before the input bounds)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.utils.api import ApiHarness, api_harness

EVENT = {
    "event_id": "e-1",
    "customer_id": "c-1",
    "name": "Purchase",
    "occurred_at": "2026-11-20T10:00:00Z",
    "properties": {"total_price": 42.5},
}
LEAF = {"attribute": "plan", "op": "eq", "value": "pro"}


@pytest.fixture
def api(store_engine: Engine, temporal_address: str) -> Iterator[ApiHarness]:
    with api_harness(store_engine, temporal_address=temporal_address) as harness:
        yield harness


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


def _post_raw(api: ApiHarness, path: str, body: str, role: str = "admin") -> Any:
    return api.post(
        path,
        role,
        content=body.encode("utf-8", "surrogatepass"),
        headers={"Content-Type": "application/json"},
    )


def _assert_refused(response: Any, field: str) -> None:
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    fields = [body["error"]["field"], *(e["field"] for e in body.get("errors", []))]
    assert any(f is not None and field in f for f in fields), (field, body)


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


# --- events ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"event_id": "e\x00"}, "event_id"),
        ({"customer_id": "c\x00"}, "customer_id"),
        ({"name": "Pur\x00chase"}, "name"),
        ({"properties": {"note": "a\x00b"}}, "properties.note"),
        ({"properties": {"a\x00": 1}}, "properties"),
        ({"properties": {"big": 2**64}}, "properties.big"),
        ({"properties": {"small": -(2**63) - 1}}, "properties.small"),
        ({"properties": {"deep": _nested(300)}}, "properties"),
        ({"properties": {"deep": _nested(20)}}, "properties.deep"),
        ({"properties": {"long": "x" * 40_000}}, "properties.long"),
        ({"occurred_at": 0}, "occurred_at"),
        ({"occurred_at": 1700000000.5}, "occurred_at"),
        ({"occurred_at": "1700000000"}, "occurred_at"),
        ({"occurred_at": "2026-02-30T00:00:00Z"}, "occurred_at"),
        ({"occurred_at": "2026-11-20T10:00:00"}, "occurred_at"),
        ({"occurred_at": "9999-12-31T00:00:00Z"}, "occurred_at"),
        ({"occurred_at": "1066-10-14T09:00:00Z"}, "occurred_at"),
    ],
)
def test_a_hostile_event_is_refused_naming_its_field_and_stores_nothing(
    api: ApiHarness, changes: dict[str, Any], field: str
) -> None:
    import json

    body = json.dumps({**EVENT, **changes})
    response = _post_raw(api, "/v1/events", body, "ingest")
    _assert_refused(response, field)
    assert _count(api.engine, "events") == 0
    assert _count(api.engine, "customers") == 0


@pytest.mark.parametrize(
    ("raw_properties", "field"),
    [
        ('{"k": "\\udfff"}', "properties.k"),
        ('{"k": NaN}', "properties.k"),
        ('{"k": Infinity}', "properties.k"),
        ('{"k": 1e400}', "properties.k"),
        ('{"k": ' + "1" * 400 + "}", "properties.k"),
    ],
)
def test_json_that_python_would_take_but_no_store_keeps_is_refused(
    api: ApiHarness, raw_properties: str, field: str
) -> None:
    body = (
        '{"event_id": "e-1", "customer_id": "c-1", "name": "Purchase",'
        f' "occurred_at": "2026-11-20T10:00:00Z", "properties": {raw_properties}}}'
    )
    _assert_refused(_post_raw(api, "/v1/events", body, "ingest"), field)
    assert _count(api.engine, "events") == 0


def test_a_bulk_request_keeps_its_valid_lines_beside_hostile_ones(api: ApiHarness) -> None:
    import json

    lines = [
        json.dumps({**EVENT, "event_id": "ok-1"}),
        json.dumps({**EVENT, "event_id": "bad\x00"}),
        '{"event_id": "bad-2", "customer_id": "c-1", "name": "Purchase",'
        ' "occurred_at": "2026-11-20T10:00:00Z", "properties": {"k": "\\udfff"}}',
        json.dumps({**EVENT, "event_id": "bad-3", "properties": {"n": 2**70}}),
        json.dumps({**EVENT, "event_id": "bad-4", "occurred_at": 1700000000}),
        json.dumps({**EVENT, "event_id": "bad-5", "properties": _nested(40)}),
        json.dumps({**EVENT, "event_id": "ok-2", "customer_id": "c-2"}),
    ]
    response = api.post(
        "/v1/events/bulk",
        "ingest",
        content="\n".join(lines).encode(),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["accepted"] == 2
    assert [r["line"] for r in body["rejected"]] == [2, 3, 4, 5, 6]
    assert body["rejected"][0]["field"] == "event_id"
    assert body["rejected"][2]["field"] == "properties.n"
    assert body["rejected"][3]["field"] == "occurred_at"
    with api.engine.connect() as conn:
        stored = conn.execute(text("SELECT event_id FROM events ORDER BY event_id")).scalars()
        assert list(stored) == ["ok-1", "ok-2"]


# --- customers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_attributes", "field"),
    [
        ('{"k": "\\udfff"}', "attributes.k"),
        ('{"k": NaN}', "attributes.k"),
        ('{"k": "a\\u0000"}', "attributes.k"),
        ('{"k": 18446744073709551616}', "attributes.k"),
    ],
)
@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_a_hostile_profile_is_refused_and_the_customer_not_created(
    api: ApiHarness, raw_attributes: str, field: str, method: str
) -> None:
    response = api.client.request(
        method,
        "/v1/customers/x",
        content=f'{{"attributes": {raw_attributes}}}'.encode("utf-8", "surrogatepass"),
        headers=api.headers("ingest", **{"Content-Type": "application/json"}),
    )
    _assert_refused(response, field)
    assert api.get("/v1/customers/x", "support").status_code == 404
    assert _count(api.engine, "customers") == 0


def test_a_nul_in_a_path_or_query_parameter_is_refused(api: ApiHarness) -> None:
    _assert_refused(api.get("/v1/customers/a%00b", "support"), "customer_id")
    _assert_refused(api.get("/v1/outbox?customer_id=a%00b", "support"), "customer_id")


# --- segments -------------------------------------------------------------------------------


def _nested_not(depth: int) -> Any:
    condition: Any = LEAF
    for _ in range(depth):
        condition = {"not": condition}
    return condition


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        ({"attribute": "pl\x00an", "op": "eq", "value": 1}, "condition.attribute"),
        ({"attribute": "plan", "op": "eq", "value": "p\x00"}, "condition.value"),
        ({"attribute": "plan", "op": "gt", "value": 2**64}, "condition.value"),
        (
            {"event": "Purchase", "count": {"gte": 1}, "within": "P1000000D"},
            "condition.within",
        ),
        (
            {"event": "Purchase", "last": {"more_than": "P999999999D"}},
            "condition.last.more_than",
        ),
        ({"event": "Purchase", "count": {"gte": 2**70}}, "condition.count"),
        (_nested_not(50), "condition"),
        (_nested_not(200), "condition"),
        ({"all": [LEAF] * 500}, "condition"),
    ],
)
def test_a_hostile_segment_is_refused_and_not_stored(
    api: ApiHarness, condition: Any, field: str
) -> None:
    body = {"slug": "hostile", "name": "Hostile", "condition": condition}
    _assert_refused(api.post("/v1/segments", "marketer", json=body), field)
    preview = api.post("/v1/segments/preview", "marketer", json={"condition": condition})
    _assert_refused(preview, field)
    assert api.get("/v1/segments/hostile", "support").status_code == 404


def test_a_segment_value_beyond_any_double_is_refused(api: ApiHarness) -> None:
    body = (
        '{"slug": "hostile", "name": "H", "condition":'
        ' {"attribute": "plan", "op": "gt", "value": 1e400}}'
    )
    _assert_refused(_post_raw(api, "/v1/segments", body, "marketer"), "condition.value")


def test_a_segment_schedule_beyond_the_maximum_is_a_422_not_a_503(api: ApiHarness) -> None:
    body = {"slug": "s", "name": "S", "condition": LEAF, "schedule": "P999999999D"}
    _assert_refused(api.post("/v1/segments", "marketer", json=body), "schedule")


@pytest.mark.parametrize("cursor", ["%C3%A9t%C3%A9", "a", "AA", "AAAA", "_w"])
def test_a_cursor_we_never_gave_is_a_422(api: ApiHarness, cursor: str) -> None:
    created = api.post(
        "/v1/segments", "marketer", json={"slug": "ext", "name": "E", "owner": "external"}
    )
    assert created.status_code == 201, created.text
    _assert_refused(api.get(f"/v1/segments/ext/members?cursor={cursor}", "support"), "cursor")


def test_transitions_since_a_huge_id_or_a_foreign_digit_is_not_a_5xx(api: ApiHarness) -> None:
    api.post("/v1/segments", "marketer", json={"slug": "ext", "name": "E", "owner": "external"})
    huge = api.get("/v1/segments/ext/transitions?since=" + "9" * 40, "support")
    assert huge.status_code == 200, huge.text
    _assert_refused(api.get("/v1/segments/ext/transitions?since=%C2%B2", "support"), "since")


# --- RFM models and journeys ----------------------------------------------------------------


def _model(**changes: Any) -> dict[str, Any]:
    return {
        "slug": "m",
        "name": "M",
        "recency_event": "Purchase",
        "frequency_event": "Purchase",
        "monetary_event": "Purchase",
        "monetary_property": "total_price",
        "timeframe": "P90D",
        "segment_map": "seed5",
        **changes,
    }


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"timeframe": "P999999999D"}, "timeframe"),
        ({"realtime": "yes"}, "realtime"),
        ({"realtime": 0}, "realtime"),
        ({"monetary_property": "total\x00price"}, "monetary_property"),
    ],
)
def test_a_hostile_rfm_model_is_refused_and_not_stored(
    api: ApiHarness, changes: dict[str, Any], field: str
) -> None:
    _assert_refused(api.post("/v1/rfm-models", "marketer", json=_model(**changes)), field)
    assert api.get("/v1/rfm-models/m", "marketer").status_code == 404


@pytest.mark.parametrize("as_of", [0, "1700000000", "2026-02-30T00:00:00Z", "2026-01-01"])
def test_a_score_as_of_a_number_or_an_impossible_day_is_refused(
    api: ApiHarness, as_of: Any
) -> None:
    assert api.post("/v1/rfm-models", "marketer", json=_model()).status_code == 201
    _assert_refused(api.post("/v1/rfm-models/m/score", "marketer", json={"as_of": as_of}), "as_of")
    assert _count(api.engine, "rfm_passes") == 0


def test_a_journey_delay_beyond_the_maximum_is_named(api: ApiHarness) -> None:
    journey = {
        "slug": "j",
        "name": "J",
        "trigger": {"segment": "default:champions"},
        "start": "wait",
        "steps": {"wait": {"type": "delay", "duration": "P1000000000D", "next": None}},
    }
    response = api.post("/v1/journeys/validate", "marketer", json=journey)
    body = response.json()
    if response.status_code == 200:
        fields = [e["field"] for e in body["errors"]]
        assert any("steps.wait.duration" in (f or "") for f in fields), body
    else:
        _assert_refused(response, "steps.wait.duration")
    _assert_refused(api.post("/v1/journeys", "marketer", json=journey), "steps.wait.duration")
    assert _count(api.engine, "journeys") == 0


def test_analytics_of_a_version_beyond_32_bits_is_a_422(api: ApiHarness) -> None:
    response = api.get("/v1/journeys/j/analytics?version=99999999999999999999", "marketer")
    _assert_refused(response, "version")


# --- the same body, the same answer on both databases ---------------------------------------

SAME_ANSWER_CASES = [
    ("/v1/events", "ingest", json.dumps({**EVENT, "event_id": "e\x00"})),
    ("/v1/events", "ingest", json.dumps({**EVENT, "properties": {"n": 2**64}})),
    ("/v1/events", "ingest", json.dumps({**EVENT, "occurred_at": "2026-02-30T00:00:00Z"})),
    ("/v1/events", "ingest", json.dumps({**EVENT, "properties": _nested(40)})),
    (
        "/v1/events",
        "ingest",
        '{"event_id": "e", "customer_id": "c", "name": "n",'
        ' "occurred_at": "2026-11-20T10:00:00Z", "properties": {"k": NaN}}',
    ),
    (
        "/v1/segments",
        "marketer",
        json.dumps({"slug": "s", "name": "S", "condition": _nested_not(50)}),
    ),
    (
        "/v1/segments/preview",
        "marketer",
        json.dumps({"condition": {"attribute": "a\x00", "op": "eq", "value": 1}}),
    ),
    (
        "/v1/rfm-models",
        "marketer",
        json.dumps({"slug": "m", "name": "M", "timeframe": "P999999999D"}),
    ),
]


def test_sqlite_and_postgresql_answer_the_same_body_the_same_way(
    sqlite_engine: Engine, postgres_engine: Engine, temporal_address: str
) -> None:
    answers: dict[str, list[tuple[int, str, str | None]]] = {}
    for name, engine in (("sqlite", sqlite_engine), ("postgres", postgres_engine)):
        with api_harness(engine, temporal_address=temporal_address) as api:
            answers[name] = []
            for path, role, body in SAME_ANSWER_CASES:
                response = _post_raw(api, path, body, role)
                error = response.json()["error"]
                answers[name].append((response.status_code, error["code"], error["field"]))
    assert answers["sqlite"] == answers["postgres"]
    assert all(400 <= status < 500 for status, _, _ in answers["sqlite"])
