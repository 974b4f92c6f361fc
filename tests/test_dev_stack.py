"""`journeys dev` end to end: real Temporal dev server, worker and API as one process tree."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dev(data_dir: Path, port: int, temporal_port: int, ui_port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "JOURNEYS_BOOTSTRAP_ADMIN_KEY"}
    env.pop("JOURNEYS_DATABASE_URL", None)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "dev",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--temporal-port",
            str(temporal_port),
            "--ui-port",
            str(ui_port),
        ],
        cwd=ROOT,
        env={**env, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


class Output:
    """Everything the process prints, read by one thread for the process's whole life."""

    def __init__(self, process: subprocess.Popen[str]):
        self.process = process
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, seconds: float) -> str:
        """The output once `needle` appeared, the process ended, or time ran out."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and needle not in self.text:
            if self.process.poll() is not None:
                self.reader.join(timeout=5)
                break
            time.sleep(0.1)
        return self.text


def read_until(process: subprocess.Popen[str], needle: str, seconds: float) -> str:
    return Output(process).wait_for(needle, seconds)


@pytest.fixture
def dev_stack(tmp_path):
    ports = [free_port() for _ in range(3)]
    process = start_dev(tmp_path / "data", *ports)
    output = Output(process)
    output.wait_for("ready api=", 120)
    yield process, output, ports, tmp_path / "data"
    if process.poll() is None:
        process.kill()


def test_dev_starts_everything_and_sigterm_stops_everything(dev_stack):
    process, printed, (port, temporal_port, ui_port), data_dir = dev_stack
    output = printed.text
    assert f"ready api=http://127.0.0.1:{port} ui=http://127.0.0.1:{ui_port}" in output, output
    children = psutil.Process(process.pid).children(recursive=True)
    names = " ".join(" ".join(c.cmdline()) for c in children)
    assert "server start-dev" in names and " worker" in names and " api" in names

    key = (data_dir / "admin-key").read_text().strip()
    ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    assert ready.json() == {
        "status": "ready",
        "database": "ok",
        "temporal": "ok",
        "processes": {"temporal": "up", "worker": "up", "api": "up"},
    }
    event = {
        "event_id": "e1",
        "customer_id": "c1",
        "name": "Purchase",
        "occurred_at": "2026-11-01T00:00:00Z",
    }
    posted = httpx.post(
        f"http://127.0.0.1:{port}/v1/events",
        json=event,
        headers={"Authorization": f"Bearer {key}"},
        timeout=5,
    )
    assert posted.status_code == 201
    assert httpx.get(f"http://127.0.0.1:{ui_port}/", timeout=5).status_code == 200

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_dev_refuses_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        process = start_dev(tmp_path / "data", taken, free_port(), free_port())
        output = read_until(process, "already in use", 60)
        assert process.wait(timeout=30) == 2
    assert f"API port {taken} already in use" in output


def _pid(data_dir: Path, name: str) -> int:
    state = json.loads((data_dir / "run" / "stack.json").read_text())
    return next(p["pid"] for p in state["processes"] if p["name"] == name)


def _readyz(port: int) -> tuple[int, dict]:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    except httpx.HTTPError:
        return 0, {}
    return response.status_code, response.json()


def _poll(check, what: str, seconds: float = 60):  # noqa: ANN001
    # A bound on waiting for the stack to heal, not a timed assertion.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def _outbox(api: httpx.Client, customer: str) -> list[str]:
    data = api.get("/v1/outbox", params={"customer_id": customer}).json()["data"]
    return [message["step"] for message in data]


def test_dev_restarts_each_child_that_dies_on_the_same_data(dev_stack):
    process, output, (port, _temporal_port, _ui_port), data_dir = dev_stack
    key = (data_dir / "admin-key").read_text().strip()
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    # A run that sends, then waits for a purchase: it must outlive every kill below.
    assert api.post(
        "/v1/segments", json={"slug": "crm", "name": "CRM", "owner": "external"}
    ).is_success
    journey = {
        "slug": "heal",
        "name": "Heal",
        "trigger": {"segment": "crm"},
        "start": "hello",
        "steps": {
            "hello": {"type": "email", "template": "champions/welcome.html", "next": "wait"},
            "wait": {
                "type": "wait_for_event",
                "event": "Purchase",
                "timeout": "PT1H",
                "on_event": "thanks",
                "on_timeout": None,
            },
            "thanks": {"type": "email", "template": "champions/reminder.html", "next": None},
        },
    }
    assert api.post("/v1/journeys", json=journey).is_success
    assert api.post("/v1/journeys/heal/activate").is_success
    assert api.put("/v1/customers/c1", json={"email": "c1@example.com"}).is_success
    assert api.post("/v1/segments/crm/entries", json={"customer_ids": ["c1"]}).is_success
    _poll(lambda: _outbox(api, "c1") == ["hello"], "the first email")

    for name in ("worker", "temporal", "api"):
        before = _pid(data_dir, name)
        os.kill(before, signal.SIGKILL)
        if name != "api":
            # While it is away, /readyz says so and names it.
            status, body = _poll(
                lambda name=name: (
                    (seen := _readyz(port))[0] == 503
                    and seen[1]["processes"][name] != "up"
                    and seen
                ),
                f"/readyz to report the {name} down",
            )
            assert body["status"] == "not ready"
            assert body["processes"][name].startswith(("restarting", "starting"))
        assert f"{name} killed by SIGKILL" in output.wait_for(f"{name} killed by SIGKILL", 30)
        status, body = _poll(
            lambda: (seen := _readyz(port))[0] == 200 and seen, f"the {name} to come back"
        )
        assert body["processes"] == {"temporal": "up", "worker": "up", "api": "up"}
        assert _pid(data_dir, name) != before
        assert f"{name} is up again" in output.text

    # The same store and the same Temporal data: the run waiting since before the kills
    # takes the purchase and sends its second email.
    event = {
        "event_id": "p1",
        "customer_id": "c1",
        "name": "Purchase",
        "occurred_at": "2026-11-01T00:00:00Z",
    }
    assert api.post("/v1/events", json=event).status_code == 201
    _poll(lambda: _outbox(api, "c1") == ["hello", "thanks"] or None, "the second email", 90)
    runs = api.get("/v1/customers/c1").json()["journeys"]
    assert [run["status"] for run in runs] == ["completed"]

    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
