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
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)
from temporalio.worker import PollerBehaviorSimpleMaximum, Worker

from core import metrics
from core.db import make_engine
from core.migrate import migrate
from core.observability import (
    configure_logging,
    temporal_tracing_interceptors,
    tracer_provider_for,
)
from core.settings import Settings


async def connect_client(
    settings: Settings, *, runtime: Runtime | None = None, interceptors: Sequence[Any] = ()
) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        runtime=runtime,
        interceptors=list(interceptors),
    )


def worker_runtime(settings: Settings) -> Runtime | None:
    """The SDK runtime of a worker process: its Prometheus endpoint serves the SDK's
    metrics and ours (core/metrics.py), and with JSON logs the SDK core's own log lines
    go through Python logging too. None: the default runtime will do."""
    json_logs = settings.log_format == "json"
    if not settings.worker_metrics_address and not json_logs:
        return None
    prometheus = None
    if settings.worker_metrics_address:
        prometheus = PrometheusConfig(
            bind_address=settings.worker_metrics_address,
            counters_total_suffix=True,
            durations_as_seconds=True,
            histogram_bucket_overrides=metrics.histogram_buckets(),
        )
    core_logs = LoggingConfig.default
    if json_logs:
        core_logs = LoggingConfig(
            filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
            forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
        )
    runtime = Runtime(telemetry=TelemetryConfig(metrics=prometheus, logging=core_logs))
    if prometheus is not None:
        metrics.install(metrics.TemporalMeterSink(runtime.metric_meter))
    return runtime


def activity_metrics() -> metrics.ActivityMetrics:
    """Counts each send's outcome and times each pass, around the activities."""
    from activities.segments import EVALUATE_SEGMENTS_ACTIVITY
    from core.messages import SEND_MESSAGE_ACTIVITY
    from core.rfm import RUN_RFM_PASS_ACTIVITY

    return metrics.ActivityMetrics(
        send_activity=SEND_MESSAGE_ACTIVITY,
        passes={RUN_RFM_PASS_ACTIVITY: "rfm", EVALUATE_SEGMENTS_ACTIVITY: "segment"},
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
        interceptors=[activity_metrics()],
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


async def connect_with_retry(
    settings: Settings,
    seconds: float = 60,
    *,
    runtime: Runtime | None = None,
    interceptors: Sequence[Any] = (),
) -> Client:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            return await connect_client(settings, runtime=runtime, interceptors=interceptors)
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def run_worker(settings: Settings) -> None:
    """Migrate, connect, start the singletons and poll until SIGTERM / SIGINT."""
    configure_logging(settings)
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    runtime = worker_runtime(settings)
    tracer_provider = tracer_provider_for(settings, "worker")
    client = await connect_with_retry(
        settings, runtime=runtime, interceptors=temporal_tracing_interceptors(tracer_provider)
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with build_worker(client, settings, engine):
        await ensure_background_workflows(client, settings)
        ready_file = os.environ.get("JOURNEYS_WORKER_READY_FILE")
        if ready_file:
            Path(ready_file).write_text(str(os.getpid()))
        logging.getLogger("journeys.worker").info(
            "worker polling %s%s",
            settings.task_queue,
            f"; metrics on {settings.worker_metrics_address}"
            if settings.worker_metrics_address
            else "",
        )
        await stop.wait()
    if tracer_provider is not None:
        tracer_provider.shutdown()  # flush the spans still batched
