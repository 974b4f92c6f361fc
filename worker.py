"""Builds the Temporal worker: one task queue, every workflow and activity of the product."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import PollerBehaviorSimpleMaximum, Worker

from core.settings import Settings


async def connect_client(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )


def workflow_classes() -> list[type]:
    """Every workflow the product runs."""
    workflows: list[type] = []
    # --- workflows of each room register here ---
    return workflows


def activity_functions(settings: Settings, engine: Engine, client: Client) -> list[Callable[..., Any]]:
    """Every activity, bound to the store, the settings and the client it needs."""
    activities: list[Callable[..., Any]] = []
    # --- activities of each room register here ---
    return activities


def build_worker(
    client: Client,
    settings: Settings,
    engine: Engine,
    *,
    task_queue: str | None = None,
    workflows: Sequence[type] | None = None,
    activities: Sequence[Callable[..., Any]] | None = None,
) -> Worker:
    """A worker with the tuning DESIGN.md measured (pollers, slots, sticky cache)."""
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
