"""The logs of the real processes (`journeys api --workers 2` and `journeys worker`) with
secret settings and JSON logs: a purchase becomes an email through a provider that fails
once, and then every captured line is JSON, the send's lines carry the workflow and the
customer, and no secret appears anywhere."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import text
from temporalio.service import RPCError

from core.db import make_engine
from core.observability import JsonFormatter, customer_of_workflow, mask_secrets
from core.runs import DISPATCHER_WORKFLOW_ID
from tests.utils.messaging import ProviderStub
from tests.utils.observability import BUYERS, free_port, samples, thanks_journey, total
from workflows.realtime import REALTIME_WORKFLOW_ID

ROOT = Path(__file__).resolve().parent.parent


def _first_attempt_fails() -> ProviderStub:
    seen: set[bytes] = set()

    def decide(request) -> int:  # noqa: ANN001
        if request.body in seen:
            return 202
        seen.add(request.body)
        return 503

    return ProviderStub(decide=decide).start()


def _wait(check, what: str, seconds: float = 90) -> None:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _api_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def test_json_logs_carry_the_run_and_never_a_secret(dev_server_env, tmp_path: Path) -> None:
    secret_values = {
        "JOURNEYS_SECRET_KEY": f"sk-{secrets.token_urlsafe(24)}",
        "JOURNEYS_BOOTSTRAP_ADMIN_KEY": f"jk_admin_{secrets.token_urlsafe(24)}",
        "JOURNEYS_SENDGRID_API_KEY": f"SG.{secrets.token_urlsafe(24)}",
        "JOURNEYS_TWILIO_AUTH_TOKEN": secrets.token_hex(16),
    }
    stub = _first_attempt_fails()
    queue = f"logs-{uuid.uuid4().hex[:8]}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **secret_values,
        "PYTHONPATH": str(ROOT),
        "JOURNEYS_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "JOURNEYS_TEMPORAL_ADDRESS": dev_server_env.client.service_client.config.target_host,
        "JOURNEYS_TASK_QUEUE": queue,
        "JOURNEYS_LOG_FORMAT": "json",
        "JOURNEYS_LOG_LEVEL": "debug",
        "JOURNEYS_SENDGRID_BASE_URL": stub.url,
        "JOURNEYS_TWILIO_ACCOUNT_SID": "AC" + "1" * 32,
        "JOURNEYS_REALTIME_POLL_SECONDS": "0.05",
        "JOURNEYS_DISPATCH_POLL_SECONDS": "0.05",
        "JOURNEYS_WORKER_WORKFLOW_POLLERS": "4",
        "JOURNEYS_WORKER_ACTIVITY_POLLERS": "4",
        "JOURNEYS_WORKER_READY_FILE": str(tmp_path / "worker.ready"),
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("api", "worker")}
    journeys = [sys.executable, "-m", "cli"]
    processes = [
        subprocess.Popen(
            [*journeys, *argv],
            cwd=tmp_path,
            env=env,
            stdout=logs[name].open("wb"),
            stderr=subprocess.STDOUT,
        )
        for name, argv in (
            ("worker", ["worker"]),
            ("api", ["api", "--port", str(port), "--workers", "2"]),
        )
    ]
    customer = f"ada-{uuid.uuid4().hex[:6]}"
    journey = f"thanks-{customer}"
    try:
        _wait(lambda: (tmp_path / "worker.ready").exists(), "the worker")
        _wait(lambda: _api_up(url), "the API")
        admin = {"Authorization": f"Bearer {secret_values['JOURNEYS_BOOTSTRAP_ADMIN_KEY']}"}
        with httpx.Client(base_url=url, headers=admin, timeout=60) as api:
            segment = {"slug": "buyers", "name": "Buyers", "condition": BUYERS}
            assert (
                api.post("/v1/segments", json=segment, params={"wait": "true"}).status_code == 201
            )
            assert api.post("/v1/journeys", json=thanks_journey(journey, "buyers")).is_success
            assert api.post(f"/v1/journeys/{journey}/activate").status_code == 200
            profile = {"email": f"{customer}@example.com", "attributes": {"first_name": "Ada"}}
            assert api.put(f"/v1/customers/{customer}", json=profile).status_code == 201
            event = {
                "event_id": f"{customer}-1",
                "customer_id": customer,
                "name": "Purchase",
                "occurred_at": "2026-12-01T10:00:00Z",
            }
            assert api.post("/v1/events", json=event).status_code == 201
            # What the API process itself records shows on its /metrics (both processes').
            vips = {"slug": "vips", "name": "VIPs", "owner": "external"}
            assert api.post("/v1/segments", json=vips).status_code == 201
            entered = api.post("/v1/segments/vips/entries", json={"customer_ids": ["v1", "v2"]})
            assert entered.json()["entries"] == 2
            scraped = samples(api.get("/metrics").text)
            assert total(scraped, "journeys_segment_entries_total", source="external") == 2
            wrong = {"Authorization": "Bearer jk_admin_wrong"}
            assert api.get(f"/v1/customers/{customer}", headers=wrong).status_code == 401

            store = make_engine(env["JOURNEYS_DATABASE_URL"])

            def sent() -> bool:
                with store.connect() as conn:
                    return bool(
                        conn.execute(
                            text(
                                "SELECT 1 FROM messages WHERE customer_id = :c AND status = 'sent'"
                            ),
                            {"c": customer},
                        ).first()
                    )

            _wait(sent, "the email, sent on its second attempt")
            store.dispose()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)
        stub.stop()
        for workflow_id in (DISPATCHER_WORKFLOW_ID, REALTIME_WORKFLOW_ID):
            handle = dev_server_env.client.get_workflow_handle(f"{workflow_id}:{queue}")
            with contextlib.suppress(RPCError):
                await handle.terminate("test over")

    assert len(stub.requests) == 2  # the failed attempt, then the one that went through
    captured = {name: path.read_text() for name, path in logs.items()}
    for name, content in captured.items():
        for setting, value in secret_values.items():
            assert value not in content, f"{setting} in the {name} log"
    lines = [json.loads(line) for line in captured["worker"].splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    retried = [line for line in lines if line.get("activity") == "send_message"]
    assert retried, "the failed send attempt was not logged"
    assert {line["workflow_id"] for line in retried} == {f"journey:{journey}:{customer}"}
    assert {line["customer_id"] for line in retried} == {customer}
    assert all(line.get("run_id") for line in retried)
    assert all(json.loads(line) for line in captured["api"].splitlines() if line.strip())


def test_a_secret_in_a_message_or_a_traceback_is_masked() -> None:
    import logging

    secret = "sk-" + "z" * 20
    formatter = JsonFormatter([secret])
    try:
        raise ValueError(f"bad key {secret}")
    except ValueError:
        record = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "key=%s", (secret,), exc_info=sys.exc_info()
        )
    line = json.loads(formatter.format(record))
    assert secret not in json.dumps(line)
    assert line["message"] == "key=***" and "bad key ***" in line["exception"]
    assert mask_secrets("a b", []) == "a b"
    assert customer_of_workflow("journey:thanks:cust:with:colons") == "cust:with:colons"
    assert customer_of_workflow("dispatcher:journeys") is None
