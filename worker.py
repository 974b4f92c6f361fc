"""Builds the Temporal worker: one task queue, every workflow and activity of the product."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import PollerBehaviorSimpleMaximum, Worker

from core.db import make_engine
from core.migrate import migrate
from core.settings import Settings


async def connect_client(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )


def workflow_classes() -> list[type]:
    """Every workflow the product runs."""
    from workflows.dispatch import DispatcherWorkflow
    from workflows.journey import JourneyWorkflow
    from workflows.predictions import PredictionTrainingWorkflow
    from workflows.realtime import RealtimeWorkflow
    from workflows.scoring import RfmScoringWorkflow
    from workflows.segments import SegmentEvaluationWorkflow

    return [
        JourneyWorkflow,
        DispatcherWorkflow,
        RealtimeWorkflow,
        RfmScoringWorkflow,
        SegmentEvaluationWorkflow,
        PredictionTrainingWorkflow,
    ]


def activity_functions(
    settings: Settings, engine: Engine, client: Client
) -> list[Callable[..., Any]]:
    """Every activity, bound to the store, the settings and the client it needs."""
    from activities.dispatch import TransitionDispatcher, signal_customer_events
    from activities.messaging import MessagingActivities
    from activities.predictions import PredictionActivities
    from activities.realtime import RealtimeActivities
    from activities.runs import RunActivities
    from activities.scoring import ScoringActivities
    from activities.segments import SegmentActivities

    async def signal_events(events: Sequence[dict[str, Any]]) -> None:
        await signal_customer_events(client, engine, events)

    realtime = RealtimeActivities(
        engine, settings, customer_steps=realtime_customer_steps(), event_sink=signal_events
    )
    dispatcher = TransitionDispatcher(
        engine,
        client,
        task_queue=settings.task_queue,
        history_event_threshold=settings.history_event_threshold,
    )
    return [
        realtime.process_realtime,
        ScoringActivities(engine, settings).run_rfm_pass,
        SegmentActivities(engine).evaluate_segments,
        PredictionActivities(engine).train_prediction_model,
        *MessagingActivities(engine=engine, settings=settings).all(),
        *RunActivities(engine).all(),
        *dispatcher.activities(),
    ]


def build_worker(
    client: Client,
    settings: Settings,
    engine: Engine,
    *,
    task_queue: str | None = None,
    workflows: Sequence[type] | None = None,
    activities: Sequence[Callable[..., Any]] | None = None,
) -> Worker:
    """A worker with the measured tuning of docs/architecture.md (pollers, slots, sticky
    cache)."""
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=list(workflows if workflows is not None else workflow_classes()),
        activities=list(
            activities if activities is not None else activity_functions(settings, engine, client)
        ),
        activity_executor=ThreadPoolExecutor(max_workers=settings.worker_max_activities),
        workflow_task_poller_behavior=PollerBehaviorSimpleMaximum(settings.worker_workflow_pollers),
        activity_task_poller_behavior=PollerBehaviorSimpleMaximum(settings.worker_activity_pollers),
        max_concurrent_workflow_tasks=settings.worker_max_workflow_tasks,
        max_concurrent_activities=settings.worker_max_activities,
        max_cached_workflows=settings.worker_max_cached_workflows,
    )


def realtime_customer_steps() -> list[Any]:
    """What happens to a customer with a new event or changed attributes, in order:
    RFM labels and predictive scores first, so rule segments that name them see the new
    ones."""
    from activities.realtime import prediction_step, rescoring_step, segment_step

    return [rescoring_step(), prediction_step(), segment_step()]


async def ensure_background_workflows(client: Client, settings: Settings) -> None:
    """Start the singleton workflows (real-time processor, dispatcher) unless running."""
    from temporalio.common import WorkflowIDConflictPolicy

    from activities.dispatch import ensure_dispatcher
    from activities.realtime import RealtimeInput
    from core.runs import DISPATCHER_WORKFLOW_ID
    from workflows.realtime import REALTIME_WORKFLOW_ID, RealtimeWorkflow

    # One of each per task queue, so several stacks can share a Temporal namespace.
    await ensure_dispatcher(
        client, settings, workflow_id=f"{DISPATCHER_WORKFLOW_ID}:{settings.task_queue}"
    )
    await client.start_workflow(
        RealtimeWorkflow.run,
        RealtimeInput(),
        id=f"{REALTIME_WORKFLOW_ID}:{settings.task_queue}",
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )


async def connect_with_retry(settings: Settings, seconds: float = 60) -> Client:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            return await connect_client(settings)
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def run_worker(settings: Settings) -> None:
    """Migrate, connect, start the singletons and poll until SIGTERM / SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    client = await connect_with_retry(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with build_worker(client, settings, engine):
        await ensure_background_workflows(client, settings)
        ready_file = os.environ.get("JOURNEYS_WORKER_READY_FILE")
        if ready_file:
            Path(ready_file).write_text(str(os.getpid()))
        logging.getLogger("journeys.worker").info("worker polling %s", settings.task_queue)
        await stop.wait()
