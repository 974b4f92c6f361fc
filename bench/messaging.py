"""Messaging throughput and exactly-once under provider failures (run by hand).

Sends N emails through the real SendGrid client to a stub HTTP server on 127.0.0.1, on
one worker against a local Temporal dev server (in memory), each email one
`send_message` activity of a small batch workflow. Then again with the stub answering
503 to a share of requests. Lost and duplicate sends are counted at the stub: every
idempotency key must have been accepted exactly once.

    .venv/bin/python -m bench.messaging                 # 10,000 emails, then 20% 503s
    .venv/bin/python -m bench.messaging --count 500     # a quick run
    .venv/bin/python -m bench.messaging --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import random
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import text
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from core.db import make_engine
from core.messages import SEND_MESSAGE_ACTIVITY, SendMessageInput, SendMessageResult
from core.migrate import migrate
from core.settings import Settings, find_executable


class _StubServer(ThreadingHTTPServer):
    # The listen backlog must hold a burst from 200 activity threads, or connections
    # are reset and those sends end in doubt.
    request_queue_size = 1024
    daemon_threads = True


def _serve_stub(port_queue: Any, fail_rate: float, seed: int) -> None:
    """The stub server's process: answers mail sends, and `GET /stats` with its counts."""
    rng = random.Random(seed)
    lock = threading.Lock()
    accepted: Counter[str] = Counter()
    totals = {"requests": 0, "refused": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            with lock:
                stats = {**totals, "accepted": dict(accepted)}
            self._reply(200, json.dumps(stats).encode(), {"Content-Type": "application/json"})

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            key = json.loads(body)["custom_args"]["idempotency_key"]
            with lock:
                totals["requests"] += 1
                refuse = rng.random() < fail_rate
                if refuse:
                    totals["refused"] += 1
                else:
                    accepted[key] += 1
            if refuse:
                error = b'{"errors":[{"message":"stub unavailable"}]}'
                self._reply(503, error, {"Content-Type": "application/json"})
            else:
                self._reply(202, b"", {"X-Message-Id": uuid.uuid4().hex[:20]})

    server = _StubServer(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    server.serve_forever()


class CountingStub:
    """SendGrid's `POST /v3/mail/send` in its own process (so it does not share the
    worker's GIL), answering 503 to `fail_rate` of requests and counting, per
    idempotency key, the requests it accepted."""

    def __init__(self, fail_rate: float, seed: int = 11) -> None:
        context = multiprocessing.get_context("spawn")
        port_queue = context.Queue()
        self.process = context.Process(
            target=_serve_stub, args=(port_queue, fail_rate, seed), daemon=True
        )
        self.process.start()
        self.url = f"http://127.0.0.1:{port_queue.get(timeout=30)}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        self.process.join()


@dataclass
class BatchRequest:
    customer_ids: list[str]


@workflow.defn(sandboxed=False)
class SendBatchWorkflow:
    """Sends one email to each customer, all at once, each its own activity."""

    @workflow.run
    async def run(self, request: BatchRequest) -> list[str]:
        info = workflow.info()
        sends = [
            workflow.execute_activity(
                SEND_MESSAGE_ACTIVITY,
                SendMessageInput(
                    workflow_id=info.workflow_id,
                    run_id=info.run_id,
                    step_id=f"welcome-{index}",
                    journey_slug="bench",
                    version=1,
                    customer_id=customer_id,
                    channel="email",
                    template="champions/welcome.html",
                    seq=index,
                ),
                result_type=SendMessageResult,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(milliseconds=100),
                    backoff_coefficient=2.0,
                    maximum_interval=timedelta(seconds=2),
                ),
            )
            for index, customer_id in enumerate(request.customer_ids)
        ]
        results = await asyncio.gather(*sends)
        return [result.status for result in results]


def _add_customers(engine: Any, prefix: str, count: int) -> list[str]:
    ids = [f"{prefix}-{index}" for index in range(count)]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO customers (id, email, phone, attributes, created_at, updated_at)"
                " VALUES (:id, :email, NULL, :attributes, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            [
                {"id": cid, "email": f"{cid}@example.com", "attributes": '{"first_name": "Bench"}'}
                for cid in ids
            ],
        )
    return ids


async def run_phase(
    *, client: Client, engine: Any, settings: Settings, count: int, batch: int, fail_rate: float
) -> dict[str, Any]:
    from activities.messaging import MessagingActivities
    from worker import build_worker

    stub = CountingStub(fail_rate)
    phase_settings = settings.model_copy(update={"sendgrid_base_url": stub.url})
    prefix = f"b{uuid.uuid4().hex[:6]}"
    customer_ids = _add_customers(engine, prefix, count)
    task_queue = f"bench-{prefix}"
    messaging = MessagingActivities(engine=engine, settings=phase_settings)
    worker = build_worker(
        client,
        phase_settings,
        engine,
        task_queue=task_queue,
        workflows=[SendBatchWorkflow],
        activities=messaging.all(),
    )
    started = time.perf_counter()
    async with worker:
        handles = [
            await client.start_workflow(
                SendBatchWorkflow.run,
                BatchRequest(customer_ids=customer_ids[start : start + batch]),
                id=f"bench:{prefix}:{start}",
                task_queue=task_queue,
            )
            for start in range(0, count, batch)
        ]
        statuses: Counter[str] = Counter()
        for handle in handles:
            statuses.update(await handle.result())
    elapsed = time.perf_counter() - started
    counts = stub.stats()
    stub.stop()
    accepted: dict[str, int] = counts["accepted"]
    with engine.connect() as conn:
        stored = dict(
            conn.execute(
                text(
                    "SELECT status, count(*) FROM messages WHERE journey_slug = 'bench'"
                    " AND customer_id LIKE :prefix GROUP BY status"
                ),
                {"prefix": f"{prefix}-%"},
            ).all()
        )
    expected_keys = {f"bench:{prefix}:{(i // batch) * batch}" for i in range(count)}
    distinct = len(accepted)
    return {
        "count": count,
        "fail_rate": fail_rate,
        "seconds": elapsed,
        "sends_per_second": count / elapsed,
        "stub_requests": counts["requests"],
        "stub_refused_503": counts["refused"],
        "accepted_keys": distinct,
        "lost": count - distinct,
        "duplicates": sum(accepted.values()) - distinct,
        "activity_results": dict(statuses),
        "stored_statuses": stored,
        "workflows": len(expected_keys),
    }


def _print(result: dict[str, Any]) -> None:
    print(
        f"{result['count']} emails, stub failing {result['fail_rate']:.0%} with 503:"
        f" {result['seconds']:.1f} s, {result['sends_per_second']:.0f} sends/s;"
        f" stub saw {result['stub_requests']} requests ({result['stub_refused_503']} refused),"
        f" accepted {result['accepted_keys']} distinct keys:"
        f" lost={result['lost']} duplicates={result['duplicates']};"
        f" results={result['activity_results']} stored={result['stored_statuses']}",
        flush=True,
    )


async def main() -> None:
    # Each 503 is logged by the worker with a traceback; thousands of them are noise here.
    logging.getLogger("temporalio").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=10_000, help="emails per phase")
    parser.add_argument("--batch", type=int, default=100, help="emails per workflow")
    parser.add_argument("--fail-rate", type=float, default=0.2, help="share of 503s in phase two")
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="journeys-bench-"))
    database_url = args.database_url or f"sqlite:///{workdir / 'bench.db'}"
    schema = None
    if database_url.startswith(("postgres://", "postgresql")):
        # A schema of its own, dropped at the end: the bench never touches existing tables.
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        with make_engine(database_url).begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        separator = "&" if "?" in database_url else "?"
        database_url = f"{database_url}{separator}options=-csearch_path%3D{schema}"
    engine = make_engine(database_url)
    migrate(engine)
    settings = Settings(
        environment="test",
        database_url=database_url,
        sendgrid_api_key="SG.bench",
        sendgrid_base_url="http://127.0.0.1:9",
        public_url="https://journeys.example.com",
        secret_key="bench-secret",
    )
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_executable("temporal"),
        ui=False,
        data_converter=pydantic_data_converter,
    )
    print(
        f"store={engine.dialect.name} worker pollers={settings.worker_activity_pollers}"
        f" activity slots={settings.worker_max_activities}",
        flush=True,
    )
    try:
        for fail_rate in (0.0, args.fail_rate):
            result = await run_phase(
                client=env.client,
                engine=engine,
                settings=settings,
                count=args.count,
                batch=args.batch,
                fail_rate=fail_rate,
            )
            _print(result)
    finally:
        await env.shutdown()
        engine.dispose()
        if schema:
            with make_engine(args.database_url).begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


if __name__ == "__main__":
    asyncio.run(main())
    # docs/architecture.md: the SDK's threads can crash the interpreter while it finalizes.
    os._exit(0)
