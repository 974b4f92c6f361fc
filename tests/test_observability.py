"""Metrics and traces of the real product: the API and a worker on the real Temporal dev
server, a purchase that becomes a thank-you email, then what `/metrics`, the worker's
metrics port and the exported spans say about it."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

from core import metrics
from core.observability import tracer_provider_for
from tests.utils.api import settings_for_tests
from tests.utils.observability import (
    add_customer,
    free_port,
    outbox_of,
    purchase,
    samples,
    set_up_buyers_journey,
    thanks_journey,
    total,
)
from tests.utils.pipeline import running_product
from worker import worker_runtime


async def _scrape(url: str, until, seconds: float = 30):  # noqa: ANN001
    """The worker's metrics once `until(samples)` holds (the SDK exports them lazily)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    async with httpx.AsyncClient() as http:
        while True:
            found = samples((await http.get(url)).text)
            if until(found) or loop.time() > deadline:
                return found
            await asyncio.sleep(0.2)


async def test_the_worker_port_serves_the_sdk_metrics_and_the_products(
    dev_server_env, sqlite_engine
) -> None:
    address = f"127.0.0.1:{free_port()}"
    runtime = worker_runtime(settings_for_tests(worker_metrics_address=address))
    assert runtime is not None
    customer = f"m-{uuid.uuid4().hex[:8]}"
    segment, journey = f"buyers-{customer}", f"thanks-{customer}"
    try:
        async with running_product(sqlite_engine, dev_server_env, runtime=runtime) as api:
            await set_up_buyers_journey(api, segment=segment, journey=journey)
            # A second journey on the segment whose stored definition is broken: the
            # dispatcher sets it aside (the quarantine) and the first one still runs.
            broken = {**thanks_journey(f"broken-{customer}", segment)}
            assert (await api.post("/v1/journeys", json=broken)).status_code == 201
            assert (await api.post(f"/v1/journeys/{broken['slug']}/activate")).status_code == 200
            with sqlite_engine.begin() as conn:
                conn.execute(
                    text("UPDATE journey_versions SET definition = '{}' WHERE journey_slug = :s"),
                    {"s": broken["slug"]},
                )
            await add_customer(api, customer)
            await purchase(api, customer, f"{customer}-1")
            (message,) = await outbox_of(api, customer)
            assert message["journey"] == journey

            def sent(found) -> bool:  # noqa: ANN001
                return total(found, "journeys_sends_total", outcome="sent") >= 1

            found = await _scrape(f"http://{address}/metrics", sent)
    finally:
        metrics.install(None)

    assert total(found, "journeys_sends_total", channel="email", outcome="sent") == 1
    # The source label is the kind of source, never the segment or pass it names.
    assert total(found, "journeys_segment_entries_total", source="segment-realtime") == 1
    assert total(found, "journeys_quarantined_total", kind="journey", stage="dispatch") >= 1
    assert total(found, "journeys_realtime_lag_seconds_count") >= 1
    assert total(found, "journeys_pass_duration_seconds_count", kind="realtime") >= 1
    assert total(found, "journeys_pass_duration_seconds_count", kind="segment") >= 1
    # The SDK's own runtime metrics on the same port, durations in seconds.
    assert total(found, "temporal_activity_execution_latency_count", activity_type="send_message")
    assert total(found, "temporal_workflow_completed_total", workflow_type="JourneyWorkflow") >= 1


async def test_one_trace_follows_a_purchase_from_the_api_to_the_send(
    dev_server_env, sqlite_engine
) -> None:
    exporter = InMemorySpanExporter()
    provider = tracer_provider_for(settings_for_tests(), "test", exporter)
    customer = f"t-{uuid.uuid4().hex[:8]}"
    segment, journey = f"buyers-{customer}", f"thanks-{customer}"
    async with running_product(sqlite_engine, dev_server_env, tracer_provider=provider) as api:
        await set_up_buyers_journey(api, segment=segment, journey=journey)
        await add_customer(api, customer)
        exporter.clear()
        await purchase(api, customer, f"{customer}-1")
        await outbox_of(api, customer)
        await asyncio.sleep(0.5)  # the send activity's span ends just after its commit
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.name == "POST /v1/events"]
    trace = [s for s in spans if s.context.trace_id == request.context.trace_id]
    names = {s.name for s in trace}
    # The dispatcher's start of the run, inside the trace the API recorded.
    assert "StartWorkflow:JourneyWorkflow" in names, names
    assert "RunWorkflow:JourneyWorkflow" in names, names
    assert "RunActivity:send_message" in names, names
    # Every span of the trace hangs from the request: no orphan, no second root.
    by_id = {s.context.span_id: s for s in trace}
    (send,) = [s for s in trace if s.name == "RunActivity:send_message"]
    chain = [send]
    while chain[-1].parent is not None:
        chain.append(by_id[chain[-1].parent.span_id])
    assert chain[-1] is request
    assert request.attributes["http.route"] == "/v1/events"
