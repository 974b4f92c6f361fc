"""The whole product in one test: the API (with its lifespan) and a real worker (real-time
processor, dispatcher, journeys, evaluations) on a real Temporal dev server."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from httpx import ASGITransport, AsyncClient
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.client import Client
from temporalio.service import RPCError

from api.app import create_app
from core.observability import temporal_tracing_interceptors
from core.predictions import PREDICTION_TRAINING_WORKFLOW
from core.rfm import RFM_SCORING_WORKFLOW
from core.segments import SEGMENT_WORKFLOW
from store.keys import create_key
from tests.utils.api import settings_for_tests
from worker import build_worker, connect_client, ensure_background_workflows


async def terminate_saves(client: Client) -> None:
    """End every running evaluation or scoring run on the shared dev server: a test that
    saved without a worker leaves them waiting, under ids a later test's saves reuse."""
    running = (
        "ExecutionStatus = 'Running' AND WorkflowType IN"
        f" ('{SEGMENT_WORKFLOW}', '{RFM_SCORING_WORKFLOW}', '{PREDICTION_TRAINING_WORKFLOW}')"
    )
    async for execution in client.list_workflows(running):
        with contextlib.suppress(RPCError):
            await client.get_workflow_handle(execution.id, run_id=execution.run_id).terminate(
                reason="test teardown"
            )


def terminate_saves_at(address: str) -> None:
    """`terminate_saves` from synchronous code (a fixture outside the event loop)."""

    async def run() -> None:
        await terminate_saves(await Client.connect(address))

    asyncio.run(run())


@asynccontextmanager
async def running_product(
    engine: Engine,
    dev_server_env: Any,
    *,
    tracer_provider: Any = None,
    runtime: Any = None,
    **overrides: Any,
) -> AsyncIterator[AsyncClient]:
    """An admin API client on `engine`, with a worker on its own task queue polling fast
    (both tracing to `tracer_provider`, the worker's client on `runtime`, when given)."""
    settings = settings_for_tests(
        temporal_address=dev_server_env.client.service_client.config.target_host,
        task_queue=f"product-{uuid.uuid4().hex[:8]}",
        realtime_poll_seconds=0.05,
        dispatch_poll_seconds=0.05,
        worker_workflow_pollers=4,
        worker_activity_pollers=4,
        **overrides,
    )
    with Session(engine) as session:
        _, admin = create_key(session, role="admin", name=f"product-{uuid.uuid4().hex[:6]}")
        session.commit()
    client = await connect_client(
        settings, runtime=runtime, interceptors=temporal_tracing_interceptors(tracer_provider)
    )
    await terminate_saves(client)
    app = create_app(settings, engine, tracer_provider)
    async with (
        build_worker(client, settings, engine),
        app.router.lifespan_context(app),
        AsyncClient(
            transport=ASGITransport(app=app),
            base_url="http://api",
            headers={"Authorization": f"Bearer {admin}"},
            timeout=120,
        ) as api,
    ):
        await ensure_background_workflows(client, settings)
        yield api
