"""`journeys dev` end to end: real Temporal dev server, worker and API as one process tree."""

from __future__ import annotations

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


def read_until(process: subprocess.Popen[str], needle: str, seconds: float) -> str:
    """What the process printed until `needle` appeared, it exited, or time ran out."""
    lines: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if needle in "".join(lines):
            break
        time.sleep(0.2)
    reader.join(timeout=1 if process.poll() is None else 5)
    return "".join(lines)


@pytest.fixture
def dev_stack(tmp_path):
    ports = [free_port() for _ in range(3)]
    process = start_dev(tmp_path / "data", *ports)
    output = read_until(process, "ready api=", 120)
    yield process, output, ports, tmp_path / "data"
    if process.poll() is None:
        process.kill()


def test_dev_starts_everything_and_sigterm_stops_everything(dev_stack):
    process, output, (port, temporal_port, ui_port), data_dir = dev_stack
    assert f"ready api=http://127.0.0.1:{port} ui=http://127.0.0.1:{ui_port}" in output, output
    children = psutil.Process(process.pid).children(recursive=True)
    names = " ".join(" ".join(c.cmdline()) for c in children)
    assert "server start-dev" in names and " worker" in names and " api" in names

    key = (data_dir / "admin-key").read_text().strip()
    ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    assert ready.json() == {"status": "ready", "database": "ok", "temporal": "ok"}
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
