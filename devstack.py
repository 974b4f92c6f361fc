"""`journeys dev`: the Temporal dev server, one worker and the API as one process tree."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from core.db import make_engine
from core.migrate import migrate
from core.settings import find_executable

_PR_SET_PDEATHSIG = 1


class PortBusy(Exception):
    pass


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def refuse_busy_ports(ports: dict[str, int]) -> None:
    busy = [f"{what} port {port}" for what, port in ports.items() if not port_is_free(port)]
    if busy:
        raise PortBusy(
            f"{', '.join(busy)} already in use (another `journeys dev`?); "
            "stop it or choose other ports with --port / --temporal-port / --ui-port"
        )


def _die_with_parent() -> None:
    # If `journeys dev` itself is killed (even SIGKILL), the kernel stops its children:
    # no orphan temporal server keeps the ports and the SQLite file.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def admin_key(data_dir: Path) -> str:
    """The bootstrap admin key: the environment's, else DIR/admin-key (made on first start)."""
    configured = os.environ.get("JOURNEYS_BOOTSTRAP_ADMIN_KEY", "")
    if configured:
        return configured
    path = data_dir / "admin-key"
    if path.exists():
        return path.read_text().strip()
    key = f"jk_admin_{secrets.token_urlsafe(32)}"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class DevStack:
    data_dir: Path
    port: int
    temporal_port: int
    ui_port: int
    children: list[Child] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    def environment(self, key: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            JOURNEYS_DATA_DIR=str(self.data_dir),
            JOURNEYS_DATABASE_URL=os.environ.get("JOURNEYS_DATABASE_URL")
            or f"sqlite:///{(self.data_dir / 'journeys.db').resolve()}",
            JOURNEYS_TEMPORAL_ADDRESS=f"127.0.0.1:{self.temporal_port}",
            JOURNEYS_TEMPORAL_UI_URL=self.ui_url,
            JOURNEYS_PUBLIC_URL=os.environ.get("JOURNEYS_PUBLIC_URL") or self.api_url,
            JOURNEYS_BOOTSTRAP_ADMIN_KEY=key,
            JOURNEYS_WORKER_READY_FILE=str(self.data_dir / "run" / "worker.ready"),
        )
        return env

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        log = self.data_dir / "logs" / f"{name}.log"
        handle = log.open("ab")
        process = subprocess.Popen(
            argv, env=env, stdout=handle, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def start(self) -> None:
        refuse_busy_ports(
            {"API": self.port, "Temporal": self.temporal_port, "Temporal UI": self.ui_port}
        )
        for folder in ("logs", "run"):
            (self.data_dir / folder).mkdir(parents=True, exist_ok=True)
        ready_file = self.data_dir / "run" / "worker.ready"
        ready_file.unlink(missing_ok=True)
        key = admin_key(self.data_dir)
        env = self.environment(key)
        self.spawn(
            "temporal",
            [
                find_executable("temporal", os.environ.get("JOURNEYS_TEMPORAL_CLI_PATH", "")),
                "server",
                "start-dev",
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.temporal_port),
                "--ui-port",
                str(self.ui_port),
                "--db-filename",
                str(self.data_dir / "temporal.db"),
                # docs/architecture.md: WAL more than doubled the dev server's throughput here.
                "--sqlite-pragma",
                "journal_mode=wal",
                "--sqlite-pragma",
                "synchronous=normal",
                "--log-level",
                "warn",
            ],
            env,
        )
        migrate(make_engine(env["JOURNEYS_DATABASE_URL"]))
        self.wait_for(lambda: not port_is_free(self.temporal_port), "Temporal", 90)
        journeys = [sys.executable, "-m", "cli"]
        self.spawn("worker", [*journeys, "worker"], env)
        self.spawn("api", [*journeys, "api", "--port", str(self.port)], env)
        self.wait_for(ready_file.exists, "the worker", 90)
        self.wait_for(self._api_ready, "the API", 90)

    def _api_ready(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_for(self, check, what: str, seconds: float) -> None:  # noqa: ANN001
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.raise_if_a_child_died()
            if check():
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"{what} did not answer within {seconds:.0f} s; see {self.data_dir / 'logs'}"
        )

    def raise_if_a_child_died(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                tail = child.log.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(
                    f"{child.name} exited with code {code}; last lines of {child.log}:\n"
                    + "\n".join(tail)
                )

    def stop(self, grace_seconds: float = 15) -> None:
        """SIGTERM every child (API and worker first, Temporal last), SIGKILL stragglers."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.terminate()
            try:
                child.process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
