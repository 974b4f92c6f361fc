"""Customer profiles: create or replace, merge, bulk upsert, read."""

from __future__ import annotations

import orjson
import pytest

from tests.utils.api import api_harness


@pytest.fixture
def api(store_engine):
    with api_harness(store_engine) as harness:
        yield harness


def put(api, cid, body, role="ingest"):
    return api.client.put(f"/v1/customers/{cid}", json=body, headers=api.headers(role))


def patch(api, cid, body):
    return api.client.patch(f"/v1/customers/{cid}", json=body, headers=api.headers("ingest"))


def test_put_creates_then_replaces(api):
    created = put(
        api, "c-1", {"email": "ada@example.com", "attributes": {"first_name": "Ada", "plan": "pro"}}
    )
    assert created.status_code == 201
    replaced = put(api, "c-1", {"attributes": {"first_name": "Ada L."}})
    assert replaced.status_code == 200
    body = api.get("/v1/customers/c-1", role="support").json()
    assert body["attributes"] == {"first_name": "Ada L."}
    assert body["email"] is None
    assert body["subscription"] == {
        "email": True,
        "sms": True,
        "email_unsubscribed_at": None,
        "sms_unsubscribed_at": None,
    }


def test_patch_merges_and_null_removes(api):
    put(api, "c-2", {"email": "b@example.com", "attributes": {"a": 1, "b": 2}})
    response = patch(api, "c-2", {"attributes": {"b": None, "c": 3}})
    assert response.status_code == 200
    assert response.json()["attributes"] == {"a": 1, "c": 3}
    assert response.json()["email"] == "b@example.com"


def test_get_unknown_customer_is_404_naming_it(api):
    response = api.get("/v1/customers/nobody", role="support")
    assert response.status_code == 404
    assert response.json()["error"]["field"] == "customer_id"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"phone": "call me"}, "phone"),
        ({"attributes": [1]}, "attributes"),
        ({"nickname": "x"}, "nickname"),
    ],
)
def test_bad_profiles_name_the_field(api, body, field):
    response = put(api, "c-3", body)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field
    assert api.get("/v1/customers/c-3", role="support").status_code == 404


def test_bulk_upsert_merges_attributes_and_reports_bad_lines(api):
    put(api, "c-4", {"email": "d@example.com", "attributes": {"tier": "gold", "age": 40}})
    lines = [
        {"customer_id": "c-4", "attributes": {"age": 41}},
        {"customer_id": "c-5", "email": "e@example.com", "attributes": {"tier": "silver"}},
        {"customer_id": "c-6", "email": "broken"},
        {"customer_id": "c-5", "attributes": {"vip": True}},
    ]
    body = b"\n".join(orjson.dumps(line) for line in lines)
    response = api.post(
        "/v1/customers/bulk",
        role="ingest",
        content=body,
        headers={"content-type": "application/x-ndjson"},
    )
    assert response.status_code == 422
    payload = response.json()
    assert payload["accepted"] == 2
    assert payload["rejected"] == [
        {"line": 3, "field": "email", "message": payload["rejected"][0]["message"]}
    ]
    four = api.get("/v1/customers/c-4", role="support").json()
    assert four["attributes"] == {"tier": "gold", "age": 41} and four["email"] == "d@example.com"
    five = api.get("/v1/customers/c-5", role="support").json()
    assert (
        five["attributes"] == {"tier": "silver", "vip": True} and five["email"] == "e@example.com"
    )
    assert api.get("/v1/customers/c-6", role="support").status_code == 404
