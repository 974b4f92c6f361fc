"""Scale-out without Docker: a Temporal dev server, PostgreSQL as the store, two workers
and two API processes (the product's own `journeys worker` and `journeys api`).

Segment entries go in through both APIs at once; every journey must run exactly once (one
Temporal execution and one stored run per customer, each message once at the stub
SendGrid and in the store), and the sends must have been spread over both workers, which
share the task queue.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from tests.utils.cluster import (
    TWO_EMAILS,
    Answers,
    add_customers,
    all_executions_closed,
    all_runs_ended,
    chunks,
    cluster,
    count_sends,
    enter,
    journey_histories,
    set_up_journey,
    two_email_journey,
)

FULL = [pytest.mark.slow, pytest.mark.timeout(1800)]


async def _push(api: Any, segment: str, ids: list[str], answers: Answers) -> None:
    for some in chunks(ids, 50):
        await enter(api, segment, some, answers)


@pytest.mark.parametrize(
    "entries", [pytest.param(100, id="short"), pytest.param(2000, id="full", marks=FULL)]
)
async def test_two_workers_and_two_api_processes_run_every_journey_once(
    postgres_engine: Engine, tmp_path: Path, entries: int
) -> None:
    engine = postgres_engine
    url = engine.url.render_as_string(hide_password=False)
    ids = [f"s{i:05d}" for i in range(entries)]
    journey = two_email_journey("scale", "scale-crm", pause="PT1S")
    answers = {"api-1": Answers(), "api-2": Answers()}
    async with cluster(tmp_path / "cluster", url) as c:
        for name in ("api-1", "api-2", "worker-1", "worker-2"):
            (c.start_api if name.startswith("api") else c.start_worker)(name)
        await c.ready("api-1", "api-2", "worker-1", "worker-2")
        c.webhook.start(f"{c.api_url('api-2')}/webhooks/sendgrid")
        async with c.client("api-1") as first, c.client("api-2") as second:
            await set_up_journey(first, journey)
            await add_customers(second, ids)
            # Half the entries through each API, at the same time.
            await asyncio.gather(
                _push(first, "scale-crm", ids[0::2], answers["api-1"]),
                _push(second, "scale-crm", ids[1::2], answers["api-2"]),
            )
            await all_runs_ended(engine, "scale", entries, seconds=120 + entries / 2)
            await all_executions_closed(c.temporal_address, c.task_queue, seconds=60)
        await c.webhook.drained()
        counted = count_sends(c.stub, engine, "scale")
        histories = await journey_histories(c.temporal_address, c.task_queue)
        workers = c.worker_pids()

    for name, seen in answers.items():
        assert seen.statuses == {200: entries // 2 // 50 + (entries // 2 % 50 > 0)}, name
    assert counted.problems(ids, TWO_EMAILS) == {}
    # One Temporal execution per customer, each completed.
    assert len(histories.executions) == entries
    assert set(histories.executions.values()) == {1}
    assert histories.statuses == {"COMPLETED": entries}
    # Both workers sent: Temporal's identity of a worker is `pid@host`.
    host = socket.gethostname()
    by_worker = {name: 0 for name in ("worker-1", "worker-2")}
    for identity, sends in histories.send_workers.items():
        pid, _, where = identity.partition("@")
        assert where == host and int(pid) in workers, identity
        by_worker[workers[int(pid)]] += sends
    assert sum(by_worker.values()) == 2 * entries
    assert min(by_worker.values()) >= 0.1 * 2 * entries, by_worker
