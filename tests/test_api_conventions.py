"""Conventions every route keeps, read from the OpenAPI document the app serves."""

from __future__ import annotations

from typing import Any

import pytest

from api.app import create_app
from core.bounds import MAX_PAGE_SIZE
from tests.utils.api import settings_for_tests


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return create_app(settings_for_tests()).openapi()


def test_every_list_pages_up_to_the_same_size(spec: dict[str, Any]):
    limits = {
        f"{method.upper()} {path}": parameter["schema"]
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        for parameter in operation.get("parameters", [])
        if parameter["name"] == "limit"
    }
    assert len(limits) >= 9
    assert {route: (s["minimum"], s["maximum"]) for route, s in limits.items()} == {
        route: (1, MAX_PAGE_SIZE) for route in limits
    }


def test_a_journey_is_named_journey_in_every_response(spec: dict[str, Any]):
    schemas = spec["components"]["schemas"]
    slugs = {
        name: schema["properties"]["journey_slug"]
        for name, schema in schemas.items()
        if "journey_slug" in schema.get("properties", {})
    }
    assert all("journey" in schemas[name]["properties"] for name in slugs)
    assert all(field.get("deprecated") for field in slugs.values())
