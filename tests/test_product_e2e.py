"""The whole product on a real Temporal dev server, driven only through the API.

Set-up calls (an RFM model with a schedule, the Champions journey activated), then
nothing but events: the scheduled pass scores the customers, the top one enters
Champions, the dispatcher starts their journey and the welcome email lands in the
outbox. A later purchase of another customer moves them into Champions in real time.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from httpx import ASGITransport, AsyncClient
from sqlalchemy import text
from sqlmodel import Session

from api.app import create_app
from store.keys import create_key
from tests.utils.api import settings_for_tests
from tests.utils.rfm import model_body
from worker import build_worker, connect_client, ensure_background_workflows

ROOT = Path(__file__).resolve().parent.parent
WELCOME_SUBJECT = "You're First in Line: Exclusive Preview Just for Our Top Shoppers!"


def purchases(customer: str, count: int, price: float, last: datetime) -> list[dict]:
    return [
        {
            "event_id": f"{customer}-p{i}",
            "customer_id": customer,
            "name": "Purchase",
            "occurred_at": (last - timedelta(days=3 * i)).isoformat(),
            "properties": {"total_price": price},
        }
        for i in range(count)
    ]


async def wait_for(check, what: str, seconds: float = 90):  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


async def test_events_alone_bring_a_champion_their_welcome_email(dev_server_env, sqlite_engine):
    queue = f"e2e-{uuid.uuid4().hex[:8]}"
    target = dev_server_env.client.service_client.config.target_host
    settings = settings_for_tests(
        temporal_address=target,
        task_queue=queue,
        realtime_poll_seconds=0.1,
        dispatch_poll_seconds=0.1,
        worker_workflow_pollers=4,
        worker_activity_pollers=4,
    )
    with Session(sqlite_engine) as session:
        _, admin = create_key(session, role="admin", name="e2e")
        session.commit()
    headers = {"Authorization": f"Bearer {admin}"}
    client = await connect_client(settings)
    app = create_app(settings, sqlite_engine)
    now = datetime.now(UTC).replace(microsecond=0)

    async with (
        build_worker(client, settings, sqlite_engine),
        app.router.lifespan_context(app),
        AsyncClient(
            transport=ASGITransport(app=app), base_url="http://api", headers=headers
        ) as api,
    ):
        await ensure_background_workflows(client, settings)
        customers = [f"c{i}" for i in range(10)]
        profiles = "\n".join(
            json.dumps(
                {
                    "customer_id": c,
                    "email": f"{c}@example.com",
                    "attributes": {"first_name": c.upper()},
                }
            )
            for c in customers
        )
        response = await api.post(
            "/v1/customers/bulk", content=profiles, headers={"content-type": "application/x-ndjson"}
        )
        assert response.status_code == 200, response.text

        model = model_body(schedule="PT1M", realtime=True)
        response = await api.post("/v1/rfm-models", json=model)
        assert response.status_code == 201, response.text
        champions = json.loads((ROOT / "templates/journeys/champions.json").read_text())
        response = await api.post("/v1/journeys", json=champions)
        assert response.status_code == 201, response.text
        response = await api.post(f"/v1/journeys/{champions['slug']}/activate")
        assert response.status_code == 200, response.text

        # Only events from here on: c9 buys most, most recently, for the most money.
        events = []
        for i, customer in enumerate(customers[:-1]):
            events += purchases(
                customer, count=1, price=10.0 + i, last=now - timedelta(days=60 + i)
            )
        events += purchases("c9", count=6, price=200.0, last=now - timedelta(hours=1))
        response = await api.post("/v1/events/bulk", json=events)
        assert response.status_code == 200, response.text

        async def welcome_for(customer: str):
            outbox = (await api.get("/v1/outbox", params={"customer_id": customer})).json()["data"]
            return [m for m in outbox if m["subject"] == WELCOME_SUBJECT]

        sent = await wait_for(lambda: welcome_for("c9"), "c9's welcome email", seconds=150)
        assert len(sent) == 1
        message = sent[0]
        assert message["to"] == "c9@example.com" and message["channel"] == "email"
        assert message["journey"] == champions["slug"] and message["step"] == "welcome"
        assert "C9" in message["body"]
        profile = (await api.get("/v1/customers/c9")).json()
        assert profile["scores"][0]["label"] == "Champions"
        assert any(s["segment"] == "default:champions" for s in profile["segments"])
        assert profile["journeys"][0]["journey"] == champions["slug"]
        assert profile["journeys"][0]["journey_slug"] == champions["slug"]  # older clients
        assert await welcome_for("c8") == []

        # Real time: c8 buys big now and becomes a Champion without waiting for a pass.
        more = purchases("c8", count=6, price=300.0, last=now)
        for event in more:
            event["event_id"] = f"late-{event['event_id']}"
        response = await api.post("/v1/events/bulk", json=more)
        assert response.status_code == 200, response.text
        await wait_for(lambda: welcome_for("c8"), "c8's welcome email after real-time rescoring")
        with sqlite_engine.connect() as conn:
            sources = (
                conn.execute(
                    text(
                        "SELECT source FROM segment_transitions WHERE customer_id = 'c8'"
                        " AND segment_slug = 'default:champions' AND kind = 'entered'"
                    )
                )
                .scalars()
                .all()
            )
        assert len(sources) == 1 and sources[0].startswith("rfm-realtime:"), sources
        # A model whose segment triggers a journey that is not archived is in use (409).
        response = await api.post(
            f"/v1/journeys/{champions['slug']}/archive", json={"runs": "finish"}
        )
        assert response.status_code == 200, response.text
        response = await api.delete("/v1/rfm-models/default")
        assert response.status_code == 200, response.text
