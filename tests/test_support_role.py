"""The `support` role reads customers, runs, histories and the outbox, and changes nothing.

Every write route of the app (POST / PUT / PATCH / DELETE under /v1), including routes
added after this test was written, must answer 403 to support before it looks at the
body; the reads support needs answer 200 and leave the store as it was.
"""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from fastapi.routing import iter_route_contexts
from sqlalchemy import func, select
from sqlmodel import SQLModel

from tests.utils.api import api_harness
from tests.utils.inspection import HandRun, add_champions_entry, add_journey
from tests.utils.journey_runtime import CHAMPIONS, add_customers

CHAMPIONS_ENTRY = datetime.fromisoformat("2026-03-01T09:00:00+00:00")
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_PLACEHOLDER = re.compile(r"\{[^}]+\}")


def write_routes(app) -> list[tuple[str, str]]:  # noqa: ANN001
    """(method, path) of every write route under /v1, however the routers were included."""
    found = set()
    for route in iter_route_contexts(app.routes):
        path = route.path or ""
        if not path.startswith("/v1/"):
            continue
        for method in (route.methods or set()) & WRITE_METHODS:
            found.add((method, path))
    return sorted(found)


@pytest.fixture
def api(store_engine):
    with api_harness(store_engine) as harness:
        yield harness


def test_support_gets_403_on_every_write_route(api) -> None:
    routes = write_routes(api.client.app)
    # The known write surface at the time of writing; later routes are covered anyway.
    assert {("POST", "/v1/keys"), ("PUT", "/v1/customers/{customer_id}")} <= set(routes)
    assert len(routes) >= 20
    refused = {}
    for method, path in routes:
        concrete = _PLACEHOLDER.sub("x", path)
        # No body at all: a route that validated the body before the role would say 422.
        response = api.client.request(method, concrete, headers=api.headers("support"))
        refused[(method, path)] = response.status_code
    assert {route: code for route, code in refused.items() if code != 403} == {}


def _row_counts(engine) -> dict[str, int]:  # noqa: ANN001
    with engine.connect() as conn:
        return {
            name: conn.execute(select(func.count()).select_from(table)).scalar_one()
            for name, table in SQLModel.metadata.tables.items()
        }


def test_support_reads_customers_runs_analytics_and_outbox(api) -> None:
    slug = CHAMPIONS["slug"]
    add_customers(api.engine, ["carol"])
    with api.engine.begin() as conn:
        add_journey(conn)
        transition = add_champions_entry(conn, customer_id="carol", at=CHAMPIONS_ENTRY, pass_id=42)
        run = HandRun(conn, slug, "carol", CHAMPIONS_ENTRY, transition_id=transition)
        run.send("welcome", days=0)
        run.position(step="wait_click", since_days=0, waiting_for="click on welcome")
    before = _row_counts(api.engine)
    reads = [
        "/v1/customers/carol",
        "/v1/customers/carol/journeys",
        f"/v1/journeys/{slug}/runs",
        f"/v1/journeys/{slug}/runs?step=wait_click&status=running",
        f"/v1/journeys/{slug}/analytics",
        "/v1/outbox",
    ]
    for path in reads:
        response = api.get(path, role="support")
        assert response.status_code == 200, (path, response.text)
    assert _row_counts(api.engine) == before
