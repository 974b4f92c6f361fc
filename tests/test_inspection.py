"""A customer's journeys with readable timelines; raw history and live state from Temporal.

First on rows built by hand (both stores), then end to end: the real JourneyWorkflow on
the time-skipping server with a fake send activity, read back through the store and the
API, and checked against the raw Temporal history.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path

import httpx
from sqlmodel import Session

from api.app import create_app
from api.deps import get_temporal
from core.db import make_engine
from core.migrate import migrate
from core.signals import journey_workflow_id
from store.inspection import customer_journeys
from store.keys import create_key
from tests.utils.api import api_harness, settings_for_tests
from tests.utils.inspection import WELCOME_SUBJECT, HandRun, add_champions_entry, add_journey
from tests.utils.journey_runtime import (
    CHAMPIONS,
    FakeMessenger,
    client_for,
    definition,
    eventually,
    journey_input,
    journey_worker,
)
from workflows.journey import JourneyWorkflow

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime.fromisoformat("2026-03-01T09:00:00+00:00")
SLUG = CHAMPIONS["slug"]
UI = "http://ui.example:8233"


def _non_clicker(engine, customer: str = "carol") -> HandRun:  # noqa: ANN001
    """Carol entered Champions on RFM pass 42, ignored the welcome email, got the
    reminder three days later, then the VIP email, and now pauses for two days."""
    with engine.begin() as conn:
        add_journey(conn)
        transition = add_champions_entry(conn, customer_id=customer, at=T0)
        run = HandRun(conn, SLUG, customer, T0, transition_id=transition)
        run.send("welcome", days=0)
        run.no_click(days=3)
        run.send("reminder", days=3)
        run.send("vip", days=3)
        run.position(step="pause", since_days=3, waiting_for="delay", waiting_until_days=5)
    return run


def test_timeline_says_why_the_non_clicker_got_the_reminder(store_engine) -> None:
    run = _non_clicker(store_engine)
    with store_engine.connect() as conn:
        (found,) = customer_journeys(conn, customer_id="carol", ui_base=UI, namespace="default")
    assert (found.journey, found.version, found.status, found.step) == (SLUG, 1, "running", "pause")
    assert (found.waiting_for, found.waiting_until) == ("delay", T0 + timedelta(days=5))
    assert found.ui_url == (
        f"{UI}/namespaces/default/workflows/journey%3Achampions-nurture%3Acarol/{run.run_id}/history"
    )
    assert found.history_url == (
        f"/v1/runs/journey:champions-nurture:carol/history?run_id={run.run_id}"
    )
    texts = [(line.at, line.text) for line in found.timeline]
    assert texts == [
        (T0, "entered Champions (RFM pass 42, R5 F4 M5)"),
        (T0, f"sent welcome email (subject “{WELCOME_SUBJECT}”)"),
        (T0, "waited for click on welcome, up to 3 days"),
        (T0 + timedelta(days=3), "no click on welcome"),
        (
            T0 + timedelta(days=3),
            "sent reminder email (subject “Still thinking it over? Your preview is waiting”)",
        ),
        (T0 + timedelta(days=3), "sent vip email (subject “Your VIP rewards are here”)"),
        (T0 + timedelta(days=3), "waiting for delay until 2026-03-06 09:00:00 UTC"),
    ]
    reasons = {line.text.split(" (")[0]: line.reason for line in found.timeline}
    assert reasons["entered Champions"].startswith("segment transition ")
    assert "rfm-pass:42" in reasons["entered Champions"]
    assert reasons["no click on welcome"] == (
        "timer fired after 3 days: no click on welcome -> reminder"
    )
    assert reasons["sent reminder email"].startswith(
        "after wait_click: no click on welcome within 3 days (timer fired 2026-03-04 09:00 UTC)"
    )
    # The VIP email came after the reminder, not after a decision: only the send's own reason.
    assert reasons["sent vip email"].startswith("Sent email")


def test_timeline_tells_a_failed_send_from_a_failed_run(store_engine) -> None:
    with store_engine.begin() as conn:
        add_journey(conn)
        run = HandRun(conn, SLUG, "dora", T0)
        run.send("welcome", days=0, status="failed")
        run.no_click(days=3)
        run.finish("failed", "reminder", "step reminder failed: activity timed out", days=3)
        run.position(status="failed", step="reminder", since_days=3, ended_days=3)
    with store_engine.connect() as conn:
        (found,) = customer_journeys(conn, customer_id="dora", ui_base=UI, namespace="default")
    lines = [(line.text, line.reason) for line in found.timeline]
    assert lines[1] == (
        "could not send welcome email",
        "Not sent: the provider refused the message for good (invalid address).",
    )
    assert lines[-1] == ("the run failed", "step reminder failed: activity timed out")
    assert found.status == "failed" and found.waiting_for is None


def test_customer_journeys_over_http(store_engine) -> None:
    _non_clicker(store_engine)
    with api_harness(store_engine, temporal_ui_url=UI) as api:
        response = api.get("/v1/customers/carol/journeys", role="support")
        assert response.status_code == 200, response.text
        (run,) = response.json()["data"]
        assert set(run) >= {
            "workflow_id",
            "run_id",
            "journey",
            "version",
            "status",
            "step",
            "since",
            "waiting_for",
            "waiting_until",
            "ui_url",
            "history_url",
            "timeline",
        }
        assert run["ui_url"].startswith(f"{UI}/namespaces/default/workflows/")
        assert [line["text"] for line in run["timeline"]][3] == "no click on welcome"
        assert set(run["timeline"][0]) >= {"at", "text", "reason", "kind", "step"}
        assert api.get("/v1/customers/carol/journeys", role="marketer").status_code == 200
        assert api.get("/v1/customers/carol/journeys", role="ingest").status_code == 403
        missing = api.get("/v1/customers/nobody/journeys", role="support")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# --- end to end on the time-skipping server ---------------------------------------------


@asynccontextmanager
async def _api_on(engine, client) -> AsyncIterator[httpx.AsyncClient]:  # noqa: ANN001
    """The app on `engine`, talking to `client`'s Temporal, called in this event loop."""
    app = create_app(settings_for_tests(temporal_ui_url=UI), engine)
    app.dependency_overrides[get_temporal] = lambda: client
    with Session(engine) as session:
        _, secret = create_key(session, role="support", name="support")
        session.commit()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://api",
        headers={"Authorization": f"Bearer {secret}"},
    ) as http:
        yield http


def _send_steps_scheduled(history: dict) -> list[tuple[int, str]]:
    """(event id, step id) of each `send_message` activity the workflow scheduled."""
    found = []
    for event in history["events"]:
        attributes = event.get("activityTaskScheduledEventAttributes")
        if not attributes or attributes["activityType"]["name"] != "send_message":
            continue
        payload = attributes["input"]["payloads"][0]["data"]
        found.append((int(event["eventId"]), json.loads(base64.b64decode(payload))["step_id"]))
    return found


def _events_of(history: dict, kind: str) -> list[dict]:
    return [e for e in history["events"] if e["eventType"] == kind]


async def test_non_clicker_end_to_end_timeline_history_and_state(
    time_skipping_env, sqlite_engine
) -> None:
    client = client_for(time_skipping_env)
    messenger = FakeMessenger(sqlite_engine)
    journey = definition()
    customer = f"c-{uuid.uuid4().hex[:10]}"
    workflow_id = journey_workflow_id(SLUG, customer)
    now = await time_skipping_env.get_current_time()
    with sqlite_engine.begin() as conn:
        add_journey(conn)
        transition = add_champions_entry(conn, customer_id=customer, at=now, pass_id=42)

    async with (
        journey_worker(client, sqlite_engine, messenger) as queue,
        _api_on(sqlite_engine, client) as http,
    ):
        handle = await client.start_workflow(
            JourneyWorkflow.run,
            journey_input(
                journey,
                customer,
                entered_at=now,
                transition_id=transition,
                context={"model": "default", "pass_id": 42, "r": 5, "f": 4, "m": 5},
            ),
            id=workflow_id,
            task_queue=queue,
        )

        async def waiting_at(step: str):  # noqa: ANN202
            response = await http.get(f"/v1/runs/{workflow_id}/state")
            body = response.json()
            ok = response.status_code == 200 and body["state"]["step"] == step
            return body if ok and body["state"]["waiting_until"] else None

        state = await eventually(lambda: waiting_at("wait_click"), what="waiting for the click")
        assert state["state"]["waiting_for"] == "click on welcome"
        assert state["status"] == "RUNNING"
        await time_skipping_env.sleep(timedelta(days=3, hours=1))
        state = await eventually(lambda: waiting_at("pause"), what="pausing after vip")
        assert state["state"]["waiting_for"] == "delay"

        history_response = await http.get(f"/v1/runs/{workflow_id}/history")
        assert history_response.status_code == 200, history_response.text
        history = history_response.json()["history"]
        await time_skipping_env.sleep(timedelta(days=2, hours=1))
        await handle.result()
        closed = await http.get(f"/v1/runs/{workflow_id}/state")
        assert closed.status_code == 409 and closed.json()["error"]["code"] == "run_closed"
        assert (await http.get("/v1/runs/journey:nope:nobody/state")).status_code == 404
        assert (await http.get("/v1/runs/journey:nope:nobody/history")).status_code == 404
        listed = (await http.get(f"/v1/customers/{customer}/journeys")).json()["data"]

    # The store's timeline says why the reminder went out ...
    with sqlite_engine.connect() as conn:
        (run,) = customer_journeys(conn, customer_id=customer, ui_base=UI, namespace="default")
    assert run.status == "completed"
    texts = [line.text for line in run.timeline]
    assert texts == [
        "entered Champions (RFM pass 42, R5 F4 M5)",
        "sent welcome email",
        "waited for click on welcome, up to 3 days",
        "no click on welcome",
        "sent reminder email",
        "sent vip email",
        "waited 2 days",
        "sent recs email",
        "completed the journey",
    ]
    by_text = {line.text: line for line in run.timeline}
    assert by_text["sent reminder email"].reason.startswith(
        "after wait_click: no click on welcome within 3 days (timer fired"
    )
    assert by_text["no click on welcome"].at - by_text["sent welcome email"].at >= timedelta(days=3)
    assert [line["text"] for line in listed[0]["timeline"]] == texts

    # ... and the raw history matches it: a 3-day timer fired, no click signal came,
    # and only then was the reminder scheduled.
    sends = _send_steps_scheduled(history)
    assert [step for _, step in sends] == ["welcome", "reminder", "vip"]
    three_day_timers = [
        e
        for e in _events_of(history, "EVENT_TYPE_TIMER_STARTED")
        # The wait's deadline is fixed when it starts; the timer runs for what is left of it.
        if abs(float(e["timerStartedEventAttributes"]["startToFireTimeout"].rstrip("s")) - 259_200)
        < 60
    ]
    assert len(three_day_timers) == 1
    timer_id = three_day_timers[0]["timerStartedEventAttributes"]["timerId"]
    (fired,) = [
        e
        for e in _events_of(history, "EVENT_TYPE_TIMER_FIRED")
        if e["timerFiredEventAttributes"]["timerId"] == timer_id
    ]
    assert sends[0][0] < int(fired["eventId"]) < sends[1][0]
    assert _events_of(history, "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED") == []


# --- the CLI ----------------------------------------------------------------------------


def _journeys_cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "240", "JOURNEYS_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_inspect_and_analytics(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    engine = make_engine(url)
    migrate(engine)
    _non_clicker(engine)
    engine.dispose()

    inspected = _journeys_cli("inspect", "carol", database_url=url)
    assert inspected.returncode == 0, inspected.stderr
    out = inspected.stdout
    assert "entered Champions (RFM pass 42, R5 F4 M5)" in out
    assert "no click on welcome" in out
    assert "after wait_click: no click on welcome within 3 days" in out
    assert out.index("sent welcome email") < out.index("no click") < out.index("sent reminder")
    assert "/namespaces/default/workflows/journey%3Achampions-nurture%3Acarol/" in out

    funnel = _journeys_cli("analytics", SLUG, database_url=url)
    assert funnel.returncode == 0, funnel.stderr
    assert "triggered 1, converted 0" in funnel.stdout
    assert "on_timeout→reminder 100%" in funnel.stdout
    assert "█" in funnel.stdout
    missing = _journeys_cli("analytics", "nope", database_url=url)
    assert missing.returncode == 1 and missing.stderr == "journeys: no journey 'nope'\n"
