"""A purchase that becomes a thank-you email, driven through the API, for the
observability tests: a rule segment of buyers (evaluated in real time), a one-step journey
it triggers, one customer, one Purchase event."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

from httpx import AsyncClient
from prometheus_client.parser import text_string_to_metric_families

from core.tables import utcnow

ROOT = Path(__file__).resolve().parent.parent.parent
BUYERS = {"event": "Purchase", "count": {"gte": 1}, "within": "P30D"}


def thanks_journey(slug: str, segment: str) -> dict[str, Any]:
    welcome = json.loads((ROOT / "templates/journeys/champions.json").read_text())
    return {
        **welcome,
        "slug": slug,
        "trigger": {"segment": segment},
        "goal": None,
        "start": "welcome",
        "steps": {"welcome": {**welcome["steps"]["welcome"], "next": None}},
    }


async def set_up_buyers_journey(api: AsyncClient, *, segment: str, journey: str) -> None:
    body = {"slug": segment, "name": "Buyers", "condition": BUYERS}
    created = await api.post("/v1/segments", json=body, params={"wait": "true"})
    assert created.status_code == 201, created.text
    assert (
        await api.post("/v1/journeys", json=thanks_journey(journey, segment))
    ).status_code == 201
    assert (await api.post(f"/v1/journeys/{journey}/activate")).status_code == 200


async def add_customer(api: AsyncClient, customer: str) -> None:
    profile = {"email": f"{customer}@example.com", "attributes": {"first_name": "Ada"}}
    assert (await api.put(f"/v1/customers/{customer}", json=profile)).status_code == 201


async def purchase(api: AsyncClient, customer: str, event_id: str) -> None:
    body = {
        "event_id": event_id,
        "customer_id": customer,
        "name": "Purchase",
        "occurred_at": utcnow().isoformat(),
        "properties": {"total_price": 42.0},
    }
    response = await api.post("/v1/events", json=body)
    assert response.status_code == 201, response.text


async def outbox_of(api: AsyncClient, customer: str, seconds: float = 90) -> list[dict[str, Any]]:
    """The customer's outbox once it holds a message (fails the test after `seconds`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        found = (await api.get("/v1/outbox", params={"customer_id": customer})).json()["data"]
        if found:
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"no message for {customer} within {seconds} s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str):
    """The sum of `name` over the series whose labels include `labels`."""
    return sum(
        value
        for (sample, series), value in found.items()
        if sample == name and set(labels.items()) <= set(series)
    )
