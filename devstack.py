"""`journeys dev`: the Temporal dev server, a worker and the API as one process tree that
heals: a child that dies is started again, after a delay that grows while it keeps dying,
on the same data. Only the supervisor's own end (Ctrl-C, SIGTERM) stops them all."""

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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from core.db import make_engine
from core.migrate import migrate
from core.settings import find_executable
from core.stack import ProcessState, ProcessStatus, StackState

_PR_SET_PDEATHSIG = 1

# The first restart comes after FIRST_DELAY; a child that dies again before it ran
# STABLE_SECONDS waits twice as long as the last time, up to MAX_DELAY, so a child that
# cannot start (a bad setting, a port taken) is not restarted in a tight loop.
FIRST_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 30.0
STABLE_SECONDS = 30.0


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


def temporal_dev_server_argv(port: int, ui_port: int, db_file: Path) -> list[str]:
    """The Temporal dev server on 127.0.0.1:`port`, its state in the SQLite `db_file`."""
    return [
        find_executable("temporal", os.environ.get("JOURNEYS_TEMPORAL_CLI_PATH", "")),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--db-filename",
        str(db_file),
        # docs/architecture.md: WAL more than doubled the dev server's throughput here.
        "--sqlite-pragma",
        "journal_mode=wal",
        "--sqlite-pragma",
        "synchronous=normal",
        "--log-level",
        "warn",
    ]


def describe_exit(code: int) -> str:
    """`killed by SIGKILL` / `exited with code 1`."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _always() -> None:
    return None


@dataclass
class Child:
    """One supervised process: how to start it, how to tell it is ready, how it ended."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    ready: Callable[[], bool]
    before_start: Callable[[], None] = _always
    process: subprocess.Popen[bytes] | None = None
    status: ProcessStatus = "starting"
    restarts: int = 0
    last_exit: str | None = None
    started_at: float = 0.0
    delay: float = 0.0
    restart_at: float = 0.0

    def spawn(self) -> None:
        self.before_start()
        with self.log.open("ab") as handle:
            stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
            handle.write(f"--- journeys dev: {self.name} starts at {stamp} UTC ---\n".encode())
            handle.flush()
            # Its own process group: Ctrl-C reaches the supervisor alone, which then stops
            # the children in order instead of seeing them die and restarting them.
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                process_group=0,
            )
        self.status = "starting"
        self.started_at = time.monotonic()

    def exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def supervise(self, now: float, say: Callable[[str], None]) -> bool:
        """One look at the child: restart it when due, note its death or its return.
        True when its state changed."""
        if self.status == "restarting":
            if now < self.restart_at:
                return False
            self.spawn()
            pid = self.process.pid if self.process else None
            say(f"{self.name} started again (pid {pid}, restart {self.restarts})")
            return True
        code = self.exit_code()
        if code is not None:
            ran = now - self.started_at
            self.last_exit = describe_exit(code)
            self.restarts += 1
            if ran >= STABLE_SECONDS or not self.delay:
                self.delay = FIRST_DELAY_SECONDS
            else:
                self.delay = min(self.delay * 2, MAX_DELAY_SECONDS)
            self.restart_at = now + self.delay
            self.status = "restarting"
            say(
                f"{self.name} {self.last_exit} after {ran:.0f} s; restarting in "
                f"{self.delay:.0f} s (restart {self.restarts}; its log: {self.log})"
            )
            return True
        if self.status == "starting" and self.ready():
            self.status = "up"
            if self.restarts:
                say(f"{self.name} is up again")
            return True
        return False

    def state(self, now: float) -> ProcessState:
        restart_at = None
        if self.status == "restarting":
            restart_at = datetime.now(UTC) + timedelta(seconds=max(0.0, self.restart_at - now))
        return ProcessState(
            name=self.name,
            status=self.status,
            pid=self.process.pid
            if self.process is not None and self.status != "restarting"
            else None,
            restarts=self.restarts,
            last_exit=self.last_exit,
            restart_at=restart_at,
        )


@dataclass
class DevStack:
    data_dir: Path
    port: int
    temporal_port: int
    ui_port: int
    workers: int = 1
    say: Callable[[str], None] = print
    children: list[Child] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "run" / "stack.json"

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
            JOURNEYS_DEV_STATE_FILE=str(self.state_file.resolve()),
        )
        return env

    def temporal_argv(self) -> list[str]:
        return temporal_dev_server_argv(
            self.temporal_port, self.ui_port, self.data_dir / "temporal.db"
        )

    def add(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        ready: Callable[[], bool],
        before_start: Callable[[], None] = _always,
    ) -> Child:
        child = Child(name, argv, env, self.data_dir / "logs" / f"{name}.log", ready, before_start)
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def start(self) -> None:
        refuse_busy_ports(
            {"API": self.port, "Temporal": self.temporal_port, "Temporal UI": self.ui_port}
        )
        for folder in ("logs", "run"):
            (self.data_dir / folder).mkdir(parents=True, exist_ok=True)
        env = self.environment(admin_key(self.data_dir))
        temporal = self.add(
            "temporal", self.temporal_argv(), env, lambda: not port_is_free(self.temporal_port)
        )
        temporal.spawn()
        self.write_state()
        migrate(make_engine(env["JOURNEYS_DATABASE_URL"]))
        self.wait_for(temporal.ready, "Temporal", 90)
        journeys = [sys.executable, "-m", "cli"]
        for number in range(1, self.workers + 1):
            name = "worker" if self.workers == 1 else f"worker-{number}"
            ready_file = self.data_dir / "run" / f"{name}.ready"
            self.add(
                name,
                [*journeys, "worker"],
                {**env, "JOURNEYS_WORKER_READY_FILE": str(ready_file)},
                ready_file.exists,
                lambda path=ready_file: path.unlink(missing_ok=True),
            ).spawn()
        self.add("api", [*journeys, "api", "--port", str(self.port)], env, self._api_up).spawn()
        for child in self.children:
            self.wait_for(child.ready, f"the {child.name}", 90)
            child.status = "up"
        self.write_state()

    def _api_up(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_for(self, check: Callable[[], bool], what: str, seconds: float) -> None:
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
        """While starting: a child that dies then is a problem to report, not to heal."""
        for child in self.children:
            code = child.exit_code()
            if code is not None:
                tail = child.log.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(
                    f"{child.name} {describe_exit(code)}; last lines of {child.log}:\n"
                    + "\n".join(tail)
                )

    def heal(self) -> None:
        """One round of supervision (the caller repeats it until it stops the stack)."""
        now = time.monotonic()
        changed = False
        for child in self.children:
            changed = child.supervise(now, self.say) or changed
        if changed:
            self.write_state()

    def write_state(self) -> None:
        """The children's states for the API's /readyz (written whole, then renamed)."""
        now = time.monotonic()
        state = StackState(
            processes=[child.state(now) for child in self.children],
            written_at=datetime.now(UTC),
        )
        partial = self.state_file.with_suffix(".tmp")
        partial.write_text(state.model_dump_json())
        partial.replace(self.state_file)

    def stop(self, grace_seconds: float = 15) -> None:
        """SIGTERM every child (API and workers first, Temporal last), SIGKILL stragglers."""
        for child in reversed(self.children):
            process = child.process
            if process is None:
                continue
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.state_file.unlink(missing_ok=True)
