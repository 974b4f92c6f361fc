"""Scheduled segment evaluation: the workflow and its activity with a real worker, on the
time-skipping server; a schedule firing on the dev server."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from sqlalchemy import text
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.segments import SegmentActivities
from api.schedules import delete_segment_schedule, upsert_segment_schedule
from core.segments import SegmentEvaluationInput
from core.segments import segment_schedule_id as schedule_id
from store import segments as store
from tests.utils.api import settings_for_tests
from tests.utils.segments import NOW, add_customer, add_event
from worker import build_worker
from workflows.segments import SegmentEvaluationWorkflow

BUYERS = {"event": "Purchase", "count": {"gte": 1}}


def seed(engine):
    for cid in ("a", "b"):
        add_customer(engine, cid, {"plan": "pro"})
    add_event(engine, "a", "Purchase", days_ago=2)
    with engine.begin() as conn:
        store.create_segment(
            conn, slug="buyers", name="Buyers", kind="rule", condition=BUYERS, now=NOW
        )
        store.create_segment(
            conn,
            slug="pro-buyers",
            name="Pro buyers",
            kind="rule",
            condition={
                "all": [{"segment": "buyers"}, {"attribute": "plan", "op": "eq", "value": "pro"}]
            },
            now=NOW,
        )


def pydantic_client(env):
    """The environment's client with the data converter the product uses."""
    config = env.client.config()
    config["data_converter"] = pydantic_data_converter
    return Client(**config)


def worker_for(client, engine, queue):
    return build_worker(
        client,
        settings_for_tests(),
        engine,
        task_queue=queue,
        workflows=[SegmentEvaluationWorkflow],
        activities=[SegmentActivities(engine).evaluate_segments],
    )


def member_ids(engine, slug):
    with engine.connect() as conn:
        return [m.customer_id for m in store.iter_members(conn, slug=slug)]


async def test_workflow_evaluates_a_segment_then_its_dependents(store_engine, time_skipping_env):
    seed(store_engine)
    queue = f"segments-{uuid.uuid4()}"
    client = pydantic_client(time_skipping_env)
    async with worker_for(client, store_engine, queue):
        result = await client.execute_workflow(
            SegmentEvaluationWorkflow.run,
            SegmentEvaluationInput(slug="buyers"),
            id=f"segment-eval-test-{uuid.uuid4()}",
            task_queue=queue,
        )
        assert [(p.slug, p.entries, p.exits) for p in result.passes] == [
            ("buyers", 1, 0),
            ("pro-buyers", 1, 0),
        ]
        assert member_ids(store_engine, "pro-buyers") == ["a"]

        # Every due segment (the test server may have skipped time, so either may be due):
        # whatever reruns finds nothing changed.
        due = await client.execute_workflow(
            SegmentEvaluationWorkflow.run,
            SegmentEvaluationInput(slug=None),
            id=f"segment-eval-test-{uuid.uuid4()}",
            task_queue=queue,
        )
        assert all((p.entries, p.exits) == (0, 0) for p in due.passes)
        missing = await client.execute_workflow(
            SegmentEvaluationWorkflow.run,
            SegmentEvaluationInput(slug="deleted-meanwhile"),
            id=f"segment-eval-test-{uuid.uuid4()}",
            task_queue=queue,
        )
        assert missing.passes == []
    with store_engine.connect() as conn:
        count = conn.execute(text("SELECT COUNT(*) FROM segment_transitions")).scalar_one()
    assert count == 2


async def test_a_schedule_runs_the_evaluation(sqlite_engine, dev_server_env):
    seed(sqlite_engine)
    queue = f"segments-{uuid.uuid4()}"
    client = pydantic_client(dev_server_env)
    async with worker_for(client, sqlite_engine, queue):
        await upsert_segment_schedule(
            client, slug="buyers", every=timedelta(hours=1), task_queue=queue
        )
        try:
            await client.get_schedule_handle(schedule_id("buyers")).trigger()
            for _ in range(200):  # the triggered run is asynchronous: poll its effect
                if member_ids(sqlite_engine, "pro-buyers"):
                    break
                await asyncio.sleep(0.1)
        finally:
            await delete_segment_schedule(client, slug="buyers")
    assert member_ids(sqlite_engine, "buyers") == ["a"]
    assert member_ids(sqlite_engine, "pro-buyers") == ["a"]
