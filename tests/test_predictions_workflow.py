"""Predictive models on Temporal and in real time: the training workflow with its
heartbeating activity and a real worker, the model's Schedule through the API on the dev
server, and a customer's new event rescoring them through the real-time processor."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from temporalio.client import Client, ScheduleOverlapPolicy, WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.predictions import PredictionActivities
from core.predictions import (
    PredictionTrainingInput,
    PredictiveModelCreate,
    prediction_save_workflow_id,
    prediction_schedule_id,
)
from store import predictions as prediction_store
from store.prediction_features import read_features
from store.prediction_training import train_and_score
from tests.utils.api import api_harness, settings_for_tests
from tests.utils.predictions import T, load_known, model_body
from tests.utils.rfm import EventRow, load
from tests.utils.segments import create_rule_segment, drain_realtime, segment_members
from worker import build_worker
from workflows.predictions import PredictionTrainingWorkflow


def pydantic_client(env) -> Client:
    config = env.client.config()
    config["data_converter"] = pydantic_data_converter
    return Client(**config)


def worker_for(client: Client, engine, queue: str, **options):
    return build_worker(
        client,
        settings_for_tests(),
        engine,
        task_queue=queue,
        workflows=[PredictionTrainingWorkflow],
        activities=[PredictionActivities(engine, **options).train_prediction_model],
    )


def _create(engine, **changes) -> None:
    with engine.begin() as conn:
        prediction_store.create_model(
            conn, model=PredictiveModelCreate.model_validate(model_body(**changes)), now=T
        )


async def test_the_workflow_trains_and_scores(sqlite_engine, time_skipping_env):
    load_known(sqlite_engine, customers=300, seed=8)
    _create(sqlite_engine)
    queue = f"predict-{uuid.uuid4()}"
    client = pydantic_client(time_skipping_env)
    async with worker_for(client, sqlite_engine, queue, heartbeat_seconds=0.001):
        result = await client.execute_workflow(
            PredictionTrainingWorkflow.run,
            PredictionTrainingInput(model_slug="buy-30d", as_of=T),
            id=f"predict-test-{uuid.uuid4()}",
            task_queue=queue,
        )
        assert result.as_of == T and result.scored == 300
        assert result.status in ("ok", "worse_than_rfm")
        assert result.auc is not None and result.rfm_heuristic_auc is not None
        with pytest.raises(WorkflowFailureError) as info:
            await client.execute_workflow(
                PredictionTrainingWorkflow.run,
                PredictionTrainingInput(model_slug="missing"),
                id=f"predict-test-{uuid.uuid4()}",
                task_queue=queue,
            )
        assert "no predictive model 'missing'" in str(info.value.cause.cause)
        # Too little history is said, and not retried.
        with pytest.raises(WorkflowFailureError) as info:
            await client.execute_workflow(
                PredictionTrainingWorkflow.run,
                PredictionTrainingInput(model_slug="buy-30d", as_of=T - timedelta(days=3000)),
                id=f"predict-test-{uuid.uuid4()}",
                task_queue=queue,
            )
        assert "needs customers with events before" in str(info.value.cause.cause)
    with sqlite_engine.connect() as conn:
        statuses = (
            conn.execute(text("SELECT status FROM prediction_trainings ORDER BY id"))
            .scalars()
            .all()
        )
    assert statuses[0] == result.status and statuses[1:] == ["failed"]


async def test_a_model_with_a_schedule_gets_a_temporal_schedule(sqlite_engine, dev_server_env):
    load_known(sqlite_engine, customers=200, seed=9, as_of=datetime.now(UTC))
    client = pydantic_client(dev_server_env)
    target = client.service_client.config.target_host
    queue = f"predict-{uuid.uuid4()}"
    slug = f"sched{uuid.uuid4().hex[:8]}"
    with api_harness(sqlite_engine, temporal_address=target, task_queue=queue) as api:
        created = api.post(
            "/v1/predictive-models", role="marketer", json=model_body(slug=slug, schedule="PT6H")
        )
        assert created.status_code == 201, created.text
        handle = client.get_schedule_handle(prediction_schedule_id(slug))
        schedule = (await handle.describe()).schedule
        assert schedule.spec.intervals[0].every == timedelta(hours=6)
        assert schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        assert schedule.action.workflow == "PredictionTrainingWorkflow"

        async with worker_for(client, sqlite_engine, queue):
            # The save's own first training, then a scheduled one.
            first = client.get_workflow_handle(prediction_save_workflow_id(slug, 1))
            assert (await first.result())["scored"] == 200
            await handle.trigger()
            for _ in range(600):  # the triggered run is asynchronous: poll its effect
                with sqlite_engine.connect() as conn:
                    trained = conn.execute(
                        text(
                            "SELECT COUNT(*) FROM prediction_trainings"
                            " WHERE model_slug = :s AND status <> 'training'"
                        ),
                        {"s": slug},
                    ).scalar_one()
                if trained == 2:
                    break
                await asyncio.sleep(0.1)
        assert trained == 2

        body = {k: v for k, v in model_body(schedule=None).items() if k != "slug"}
        updated = api.client.put(f"/v1/predictive-models/{slug}", headers=api.headers(), json=body)
        assert updated.status_code == 200, updated.text
        listed = [s.id async for s in await client.list_schedules()]
        assert prediction_schedule_id(slug) not in listed
        deleted = api.client.delete(f"/v1/predictive-models/{slug}", headers=api.headers())
        assert deleted.status_code == 204


def test_a_new_event_rescores_the_customer_and_segments_follow(store_engine):
    as_of = datetime.now(UTC) - timedelta(minutes=5)
    load_known(store_engine, customers=400, seed=6, as_of=as_of)
    _create(store_engine)
    train_and_score(store_engine, slug="buy-30d", as_of=as_of)
    likely = {
        "any": [
            {"prediction": "buy-30d", "level": "medium"},
            {"prediction": "buy-30d", "level": "high"},
        ]
    }
    create_rule_segment(store_engine, "likely", likely)
    with store_engine.begin() as conn:  # the history came in as an import without real time
        conn.execute(text("UPDATE events SET realtime_pending = FALSE"))
    with store_engine.begin() as conn:
        from store.segments import evaluate_segment

        evaluate_segment(conn, slug="likely", now=datetime.now(UTC))
    with store_engine.connect() as conn:
        before = {
            r.customer_id: r for r in prediction_store.page_scores(conn, slug="buy-30d", limit=1000)
        }
    # A type-0 customer (5% chance) starts behaving like a type-4 one (90%).
    quiet = "k00000-0"
    assert before[quiet].level == "low" and quiet not in segment_members(store_engine, "likely")
    members = set(segment_members(store_engine, "likely"))
    assert members == {c for c, r in before.items() if r.level != "low"}
    now = datetime.now(UTC)
    burst = [EventRow(quiet, "Visit", now - timedelta(minutes=m)) for m in range(1, 6)]
    burst += [
        EventRow(quiet, "Purchase", now - timedelta(days=d, seconds=30), {"total_price": 60})
        for d in range(4)
    ]
    burst.append(EventRow("newcomer", "Visit", now - timedelta(seconds=10)))
    load(store_engine, burst)
    drain_realtime(store_engine)
    with store_engine.connect() as conn:
        after = {
            r.customer_id: r for r in prediction_store.page_scores(conn, slug="buy-30d", limit=1000)
        }
        [quiet_detail] = [p for p in prediction_store.customer_predictions(conn, customer_id=quiet)]
    # The stored score is the estimator's answer for the customer's features at the
    # instant of the rescoring, under the model's thresholds.
    with store_engine.connect() as conn:
        training = prediction_store.latest_training(conn, slug="buy-30d")
        fitted = prediction_store.estimators.get(conn, training.id)
        frame = read_features(
            conn, training.definition, cutoff=quiet_detail.scored_at, customer_ids=[quiet]
        )
    assert after[quiet].probability == pytest.approx(fitted.predict(frame)[0], abs=1e-12)
    assert quiet_detail.training_id == training.id and quiet_detail.scored_at > as_of
    assert after[quiet].probability > before[quiet].probability + 0.1
    assert after[quiet].level in ("medium", "high")
    assert "newcomer" in after  # a first event gives a first score
    assert quiet in segment_members(store_engine, "likely")
    # Nobody else was touched.
    untouched = {c: r for c, r in after.items() if c not in (quiet, "newcomer")}
    assert untouched == {c: r for c, r in before.items() if c != quiet}
