"""RFM scoring on Temporal: the workflow and its heartbeating activity with a real worker on
the time-skipping server; the model's Schedule through the API on the dev server."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text
from temporalio.client import Client, ScheduleOverlapPolicy, WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.scoring import ScoringActivities
from core.rfm import RfmScoringInput, rfm_schedule_id
from store.rfm_models import create_model
from tests.utils.api import api_harness, settings_for_tests
from tests.utils.rfm import T, load, make_model, model_body, purchase
from worker import build_worker
from workflows.scoring import RfmScoringWorkflow


def pydantic_client(env) -> Client:
    config = env.client.config()
    config["data_converter"] = pydantic_data_converter
    return Client(**config)


def worker_for(client: Client, engine, queue: str, **activity_options):
    return build_worker(
        client,
        settings_for_tests(),
        engine,
        task_queue=queue,
        workflows=[RfmScoringWorkflow],
        activities=[
            ScoringActivities(engine, settings_for_tests(), **activity_options).run_rfm_pass
        ],
    )


def seed(engine) -> None:
    with engine.begin() as conn:
        create_model(conn, model=make_model(), now=T)
    load(
        engine, [purchase("a", T - timedelta(days=1), 100), purchase("b", T - timedelta(days=9), 5)]
    )


async def test_the_workflow_runs_a_pass(sqlite_engine, time_skipping_env):
    seed(sqlite_engine)
    queue = f"rfm-{uuid.uuid4()}"
    client = pydantic_client(time_skipping_env)
    # A tiny heartbeat interval makes the activity heartbeat while the SQL runs.
    async with worker_for(client, sqlite_engine, queue, heartbeat_seconds=0.001):
        result = await client.execute_workflow(
            RfmScoringWorkflow.run,
            RfmScoringInput(model_slug="default", as_of=T),
            id=f"rfm-score-test-{uuid.uuid4()}",
            task_queue=queue,
        )
        assert (result.scored, result.entries, result.exits) == (2, 2, 0)
        assert result.as_of == T
        again = await client.execute_workflow(
            RfmScoringWorkflow.run,
            RfmScoringInput(model_slug="default", as_of=T),
            id=f"rfm-score-test-{uuid.uuid4()}",
            task_queue=queue,
        )
        assert (again.entries, again.exits) == (0, 0) and again.pass_id > result.pass_id

        with pytest.raises(WorkflowFailureError) as info:
            await client.execute_workflow(
                RfmScoringWorkflow.run,
                RfmScoringInput(model_slug="missing"),
                id=f"rfm-score-test-{uuid.uuid4()}",
                task_queue=queue,
            )
        assert "no RFM model 'missing'" in str(info.value.cause.cause)
    with sqlite_engine.connect() as conn:
        passes = conn.execute(text("SELECT COUNT(*) FROM rfm_passes")).scalar_one()
    assert passes == 2


async def test_a_model_with_a_schedule_gets_a_temporal_schedule(sqlite_engine, dev_server_env):
    load(sqlite_engine, [purchase("a", T - timedelta(days=1), 100)])
    client = pydantic_client(dev_server_env)
    target = client.service_client.config.target_host
    queue = f"rfm-{uuid.uuid4()}"
    slug = f"sched{uuid.uuid4().hex[:8]}"
    with api_harness(sqlite_engine, temporal_address=target, task_queue=queue) as api:
        created = api.post(
            "/v1/rfm-models",
            role="marketer",
            json=model_body(slug=slug, schedule="PT1H", timeframe="P3650D"),
        )
        assert created.status_code == 201, created.text
        handle = client.get_schedule_handle(rfm_schedule_id(slug))
        schedule = (await handle.describe()).schedule
        assert schedule.spec.intervals[0].every == timedelta(hours=1)
        assert schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        assert schedule.action.workflow == "RfmScoringWorkflow"

        async with worker_for(client, sqlite_engine, queue):
            await handle.trigger()
            for _ in range(200):  # the triggered run is asynchronous: poll its effect
                with sqlite_engine.connect() as conn:
                    scored = conn.execute(
                        text("SELECT COUNT(*) FROM rfm_scores WHERE model_slug = :s"), {"s": slug}
                    ).scalar_one()
                if scored:
                    break
                await asyncio.sleep(0.1)
        assert scored == 1

        body = {k: v for k, v in model_body(schedule="PT30M").items() if k != "slug"}
        updated = api.client.put(f"/v1/rfm-models/{slug}", headers=api.headers(), json=body)
        assert updated.status_code == 200, updated.text
        schedule = (await handle.describe()).schedule
        assert schedule.spec.intervals[0].every == timedelta(minutes=30)

        body["schedule"] = None
        assert (
            api.client.put(f"/v1/rfm-models/{slug}", headers=api.headers(), json=body).status_code
            == 200
        )
        listed = [s.id async for s in await client.list_schedules()]
        assert rfm_schedule_id(slug) not in listed

        body["schedule"] = "PT2H"
        assert (
            api.client.put(f"/v1/rfm-models/{slug}", headers=api.headers(), json=body).status_code
            == 200
        )
        assert api.client.delete(f"/v1/rfm-models/{slug}", headers=api.headers()).status_code == 200
        with pytest.raises(Exception):  # noqa: B017 (any RPC error: the schedule is gone)
            await handle.describe()
