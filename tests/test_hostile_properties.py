"""Property tests: hostile JSON into events, bulk, customers, segments, journeys, RFM
models and personalisation campaigns, on both databases. Whatever arrives: no 5xx, a 4xx is in the error shape and
stores nothing, a bulk request keeps exactly its valid lines, and afterwards a healthy
customer's purchase still reaches its segment."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.utils.api import ApiHarness, api_harness, assert_error_shape
from tests.utils.hostile import (
    CAMPAIGN,
    CONDITION,
    CUSTOMER,
    JOURNEY,
    MODEL,
    SEGMENT,
    dumps,
    hostile_bodies,
    purchase,
)
from tests.utils.segments import create_rule_segment, drain_realtime, segment_members

EXAMPLES = 60
TABLES = (
    "events",
    "customers",
    "segments",
    "rfm_models",
    "journeys",
    "templates",
    "personalizations",
)
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture
def api(store_engine: Engine, temporal_address: str) -> Iterator[ApiHarness]:
    with api_harness(store_engine, temporal_address=temporal_address) as harness:
        create_rule_segment(
            store_engine, "buyers", {"event": "Purchase", "count": {"gte": 1}, "within": "P30D"}
        )
        yield harness
        # After everything accepted: real time still flows for a healthy customer.
        after = harness.post("/v1/events", "ingest", json=purchase("e-after", "healthy-after"))
        assert after.status_code == 201, after.text
        drain_realtime(store_engine, rounds=50)
        assert "healthy-after" in segment_members(store_engine, "buyers")


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in TABLES}


def _send(api: ApiHarness, method: str, path: str, body: Any, role: str) -> Any:
    return api.client.request(
        method,
        path,
        content=dumps(body),
        headers=api.headers(role, **{"Content-Type": "application/json"}),
    )


def _check(api: ApiHarness, response: Any, before: dict[str, int], what: Any) -> None:
    assert response.status_code < 500, (what, response.text[:500])
    if response.status_code >= 400:
        assert_error_shape(response.json())
        assert _counts(api.engine) == before, (what, response.text[:300])


@pytest.mark.parametrize(
    ("method", "path", "valid", "role"),
    [
        ("POST", "/v1/events", purchase(), "ingest"),
        ("PUT", "/v1/customers/c-hostile", CUSTOMER, "ingest"),
        ("PATCH", "/v1/customers/c-hostile", CUSTOMER, "ingest"),
        ("POST", "/v1/segments", SEGMENT, "marketer"),
        ("POST", "/v1/segments/preview", {"condition": CONDITION}, "marketer"),
        ("POST", "/v1/rfm-models", MODEL, "marketer"),
        ("POST", "/v1/journeys", JOURNEY, "marketer"),
        ("POST", "/v1/journeys/validate", JOURNEY, "marketer"),
        ("POST", "/v1/personalizations", CAMPAIGN, "marketer"),
        ("POST", "/v1/personalizations/validate", CAMPAIGN, "marketer"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_hostile_json_is_refused_or_stored_safely(
    api: ApiHarness, method: str, path: str, valid: Any, role: str
) -> None:
    @given(case=hostile_bodies(valid))
    @PROPERTY_SETTINGS
    def one(case: Any) -> None:
        body, what, where = case
        before = _counts(api.engine)
        _check(api, _send(api, method, path, body, role), before, (what, where))
        _forget_created(api)

    one()


def _forget_created(api: ApiHarness) -> None:
    """Each example starts from the same store: what an accepted example made is dropped."""
    for path in ("/v1/segments/hostile-seg", "/v1/rfm-models/hostile-model"):
        api.client.delete(path, headers=api.headers("marketer"))
    with api.engine.begin() as conn:
        conn.execute(text("DELETE FROM journey_versions WHERE journey_slug = 'hostile-journey'"))
        conn.execute(text("DELETE FROM journeys WHERE slug = 'hostile-journey'"))
        for table, column in (
            ("personalization_versions", "campaign_slug"),
            ("personalizations", "slug"),
        ):
            conn.execute(text(f"DELETE FROM {table} WHERE {column} = 'hostile-campaign'"))


def test_a_hostile_bulk_line_is_rejected_alone(api: ApiHarness) -> None:
    counter = iter(range(10**9))

    @given(case=hostile_bodies(purchase()))
    @PROPERTY_SETTINGS
    def one(case: Any) -> None:
        body, what, where = case
        n = next(counter)
        first, last = purchase(f"ok-a-{n}", f"c-a-{n}"), purchase(f"ok-b-{n}", f"c-b-{n}")
        if isinstance(body, dict) and body.get("event_id") == "e-ok":
            body = {**body, "event_id": f"h-{n}"}
        lines = [json.dumps(first).encode(), dumps(body), json.dumps(last).encode()]
        before = _counts(api.engine)["events"]
        response = api.post(
            "/v1/events/bulk",
            "ingest",
            content=b"\n".join(lines),
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert response.status_code in (200, 422), (what, where, response.text[:300])
        result = response.json()
        assert _counts(api.engine)["events"] - before == result["accepted"], (what, where)
        assert result["accepted"] + len(result["rejected"]) + result.get("duplicates", 0) == 3
        assert [r["line"] for r in result["rejected"]] in ([], [2]), result
        with api.engine.connect() as conn:
            stored = set(conn.execute(text("SELECT event_id FROM events")).scalars())
        assert {first["event_id"], last["event_id"]} <= stored
        if response.status_code == 422:
            assert_error_shape(result)

    one()
