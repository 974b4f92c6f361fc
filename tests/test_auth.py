"""API keys: roles, 401 / 403, stored hashed, cached, revoked."""

from __future__ import annotations

import pytest
from sqlalchemy import event, text

from tests.utils.api import api_harness


@pytest.fixture
def api(store_engine):
    with api_harness(store_engine, bootstrap_admin_key="boot-admin-key") as harness:
        yield harness


def test_missing_and_unknown_keys_are_401(api):
    assert api.client.get("/v1/keys").status_code == 401
    response = api.client.get("/v1/keys", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json()["error"]["field"] == "authorization"


@pytest.mark.parametrize("role", ["marketer", "ingest", "support"])
def test_only_admin_manages_keys(api, role):
    response = api.post("/v1/keys", role=role, json={"role": "support", "name": "x"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


def test_support_cannot_ingest(api):
    response = api.post(
        "/v1/events",
        role="support",
        json={
            "event_id": "e",
            "customer_id": "c",
            "name": "n",
            "occurred_at": "2026-01-01T00:00:00Z",
        },
    )
    assert response.status_code == 403


def test_bootstrap_admin_key_exists(api):
    response = api.client.get("/v1/keys", headers={"Authorization": "Bearer boot-admin-key"})
    assert response.status_code == 200
    assert any(k["name"] == "bootstrap" and k["role"] == "admin" for k in response.json()["data"])


def test_created_key_is_shown_once_stored_hashed_and_revocable(api):
    created = api.post("/v1/keys", json={"role": "marketer", "name": "campaigns"})
    assert created.status_code == 201
    secret = created.json()["key"]
    with api.engine.connect() as conn:
        stored = [tuple(r) for r in conn.execute(text("SELECT key_hash, prefix FROM api_keys"))]
    assert all(secret not in row for row in stored)
    listed = api.get("/v1/keys").json()["data"]
    assert all("key" not in item for item in listed)
    headers = {"Authorization": f"Bearer {secret}"}
    assert api.client.get("/v1/rfm-models", headers=headers).status_code in (200, 404)
    revoked = api.client.delete(f"/v1/keys/{created.json()['id']}", headers=api.headers())
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert api.client.get("/v1/customers/x", headers=headers).status_code == 401


def test_verified_keys_cost_no_database_round_trip(api):
    statements: list[str] = []

    def record(conn, cursor, statement, *args):  # noqa: ANN001
        statements.append(statement)

    api.get("/v1/customers/none", role="support")  # warms the cache
    event.listen(api.engine, "before_cursor_execute", record)
    try:
        for _ in range(5):
            api.get("/healthz", role="support")
            api.get("/v1/customers/none", role="support")
    finally:
        event.remove(api.engine, "before_cursor_execute", record)
    assert not [s for s in statements if "api_keys" in s]
    assert len([s for s in statements if "customers" in s]) == 5


def test_bad_role_is_rejected_naming_the_field(api):
    response = api.post("/v1/keys", json={"role": "owner", "name": "x"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "role"
