"""Real processes on loopback for the fault and scale-out tests.

A Temporal dev server on a SQLite file (killed and started again on the same file), as
many `journeys worker` and `journeys api` processes as a test asks for on one store, and
a stub SendGrid (the real `sendgrid` client pointed at it) that takes, refuses or stalls
messages and, like SendGrid, reports each message it took to the signed event webhook.
Nothing is mocked: the processes are the product's own commands.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import Engine

from devstack import _die_with_parent, port_is_free, temporal_dev_server_argv
from tests.utils.live_api import free_port
from tests.utils.messaging import SENDGRID_KEY, ProviderStub, SendGridSigner, StubRequest

REPO = Path(__file__).resolve().parents[2]
SEND_PATH = "/v3/mail/send"


# --- the stub SendGrid --------------------------------------------------------------------


@dataclass
class ProviderFaults:
    """Answer 503 to `fail_rate` of the requests and stall `stall_rate` of them past the
    client's timeout (the provider took those: it answers late), seeded."""

    fail_rate: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 0.0
    seed: int = 17
    _rng: random.Random = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stalled: set[int] = field(default_factory=set)
    failed: int = 0
    stalled: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def decide(self, request: StubRequest) -> int:
        with self._lock:
            draw = self._rng.random()
            if draw < self.fail_rate:
                self.failed += 1
                return 503
            if draw < self.fail_rate + self.stall_rate:
                self.stalled += 1
                self._stalled.add(id(request))
        return 202

    def delay_for(self, request: StubRequest) -> float:
        with self._lock:
            if id(request) in self._stalled:
                self._stalled.discard(id(request))
                return self.stall_seconds
        return 0.0


class SendGridWebhook:
    """What SendGrid does once it took a message: a signed `processed` event (with the
    message's custom_args) posted to the event webhook in small batches, and posted again
    until the API answers 2xx."""

    def __init__(self, signer: SendGridSigner, *, delay_seconds: float = 0.0) -> None:
        self.signer = signer
        # SendGrid posts its events seconds (or minutes) after it took the message.
        self.delay_seconds = delay_seconds
        self.url = ""
        self._events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sendgrid-webhook", daemon=True)
        self.posted = 0
        self.refused = 0

    def start(self, url: str) -> None:
        self.url = url
        self._thread.start()

    def report(self, request: StubRequest, key: str) -> None:
        body = request.json()
        event = {
            "due": time.monotonic() + self.delay_seconds,
            "event": "processed",
            "email": body["personalizations"][0]["to"][0]["email"],
            "timestamp": int(time.time()),
            "sg_event_id": uuid.uuid4().hex,
            **body.get("custom_args", {}),
            "idempotency_key": key,
        }
        with self._lock:
            self._pending += 1
        self._events.put(event)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                batch = self._take(100)
                if not batch:
                    continue
                wait = max(event.pop("due") for event in batch) - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                payload = json.dumps(batch).encode()
                while not self._stop.is_set():
                    try:
                        response = client.post(
                            self.url, content=payload, headers=self.signer.headers(payload)
                        )
                        if response.is_success:
                            break
                    except httpx.HTTPError:
                        pass
                    self.refused += 1
                    time.sleep(0.5)
                    payload = json.dumps(batch).encode()
                with self._lock:
                    self._pending -= len(batch)
                    self.posted += len(batch)

    def _take(self, most: int) -> list[dict[str, Any]]:
        try:
            batch = [self._events.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(batch) < most:
            try:
                batch.append(self._events.get_nowait())
            except queue.Empty:
                break
        return batch

    @property
    def pending(self) -> int:
        """Events reported and not yet taken by the webhook."""
        with self._lock:
            return self._pending

    async def drained(self, seconds: float = 60) -> None:
        await until(lambda: self.pending == 0, "the SendGrid events to be posted", seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


# --- processes -----------------------------------------------------------------------------


@dataclass
class Member:
    """One process of the cluster, started again under the same name after a kill."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        with self.log.open("ab") as handle:
            handle.write(f"--- start {self.starts + 1} ---\n".encode())
            handle.flush()
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self.starts += 1
        self.pids.append(self.process.pid)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, grace: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Cluster:
    workdir: Path
    database_url: str
    stub: ProviderStub
    webhook: SendGridWebhook
    task_queue: str
    admin_key: str
    temporal_port: int
    own_temporal: bool
    settings: dict[str, str]
    members: dict[str, Member] = field(default_factory=dict)
    api_ports: dict[str, int] = field(default_factory=dict)

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"

    def api_url(self, name: str = "api") -> str:
        return f"http://127.0.0.1:{self.api_ports[name]}"

    def environment(self) -> dict[str, str]:
        # Nothing of the test run's own JOURNEYS_ settings leaks into the processes.
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOURNEYS_")}
        env.update(
            PYTHONPATH=str(REPO),
            JOURNEYS_ENVIRONMENT="test",
            JOURNEYS_DATA_DIR=str(self.workdir),
            JOURNEYS_DATABASE_URL=self.database_url,
            JOURNEYS_TEMPORAL_ADDRESS=self.temporal_address,
            JOURNEYS_TASK_QUEUE=self.task_queue,
            JOURNEYS_SECRET_KEY="fault-test-secret",
            JOURNEYS_BOOTSTRAP_ADMIN_KEY=self.admin_key,
            JOURNEYS_PUBLIC_URL="https://journeys.example.com",
            JOURNEYS_SENDGRID_API_KEY=SENDGRID_KEY,
            JOURNEYS_SENDGRID_BASE_URL=self.stub.url,
            JOURNEYS_SENDGRID_WEBHOOK_PUBLIC_KEY=self.webhook.signer.public_key_base64,
            JOURNEYS_EMAIL_FROM="hello@shop.example.com",
            JOURNEYS_REALTIME_POLL_SECONDS="0.05",
            JOURNEYS_DISPATCH_POLL_SECONDS="0.05",
            # Small workers: several share two cores with the server and the test.
            JOURNEYS_WORKER_WORKFLOW_POLLERS="8",
            JOURNEYS_WORKER_ACTIVITY_POLLERS="8",
            JOURNEYS_WORKER_MAX_ACTIVITIES="50",
        )
        env.update(self.settings)
        return env

    def _member(self, name: str, argv: list[str], env: dict[str, str]) -> Member:
        member = Member(name, argv, env, self.workdir / f"{name}.log", self.workdir)
        self.members[name] = member
        return member

    # --- Temporal ----------------------------------------------------------------------

    def start_temporal(self) -> None:
        """The cluster's own dev server, on the same port and SQLite file every time."""
        member = self.members.get("temporal") or self._member(
            "temporal",
            temporal_dev_server_argv(self.temporal_port, free_port(), self.workdir / "temporal.db"),
            self.environment(),
        )
        member.start()

    async def temporal_up(self, seconds: float = 60) -> None:
        await until(
            lambda: not port_is_free(self.temporal_port), "the Temporal dev server", seconds
        )

    # --- workers and API processes -----------------------------------------------------

    def start_worker(self, name: str) -> Member:
        member = self.members.get(name)
        if member is None:
            ready = self.workdir / f"{name}.ready"
            env = {**self.environment(), "JOURNEYS_WORKER_READY_FILE": str(ready)}
            member = self._member(name, [sys.executable, "-m", "cli", "worker"], env)
        (self.workdir / f"{name}.ready").unlink(missing_ok=True)
        member.start()
        return member

    def start_api(self, name: str = "api") -> Member:
        member = self.members.get(name)
        if member is None:
            port = self.api_ports.setdefault(name, free_port())
            argv = [sys.executable, "-m", "cli", "api", "--port", str(port)]
            member = self._member(name, argv, self.environment())
        member.start()
        return member

    def _ready(self, name: str) -> bool:
        member = self.members[name]
        if not member.alive():
            raise AssertionError(f"{name} exited:\n{member.tail()}")
        if name in self.api_ports:
            try:
                return httpx.get(f"{self.api_url(name)}/healthz", timeout=1).is_success
            except httpx.HTTPError:
                return False
        return (self.workdir / f"{name}.ready").exists()

    async def ready(self, *names: str, seconds: float = 90) -> None:
        for name in names:
            await until(lambda name=name: self._ready(name), f"{name} to be ready", seconds)

    def kill(self, name: str) -> None:
        self.members[name].kill()

    def stop(self) -> None:
        self.webhook.stop()
        for member in reversed(list(self.members.values())):
            member.stop()
        self.stub.stop()

    def client(self, name: str = "api") -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.api_url(name),
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=60,
        )

    def worker_pids(self) -> dict[int, str]:
        """Every pid each worker had, to its name (one killed and started again had
        several)."""
        return {
            pid: name
            for name, member in self.members.items()
            if name.startswith("worker")
            for pid in member.pids
        }


@asynccontextmanager
async def cluster(
    workdir: Path,
    database_url: str,
    *,
    temporal_address: str | None = None,
    faults: ProviderFaults | None = None,
    settings: dict[str, str] | None = None,
    webhook_delay_seconds: float = 0.0,
) -> AsyncIterator[Cluster]:
    """A cluster on `database_url` (migrated), with its own Temporal dev server unless
    `temporal_address` names one; every process is stopped when the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    signer = SendGridSigner.generate()
    webhook = SendGridWebhook(signer, delay_seconds=webhook_delay_seconds)
    stub = ProviderStub(keep_requests=False, on_accept=webhook.report)
    if faults is not None:
        stub.decide = faults.decide
        stub.delay_for = faults.delay_for
    stub.start()
    port = int(temporal_address.rsplit(":", 1)[1]) if temporal_address else free_port()
    built = Cluster(
        workdir=workdir,
        database_url=database_url,
        stub=stub,
        webhook=webhook,
        task_queue=f"fault-{uuid.uuid4().hex[:8]}",
        admin_key=f"jk_admin_{uuid.uuid4().hex}",
        temporal_port=port,
        own_temporal=temporal_address is None,
        settings=settings or {},
    )
    try:
        if built.own_temporal:
            built.start_temporal()
            await built.temporal_up()
        yield built
    finally:
        built.stop()


# --- driving a journey through the API -------------------------------------------------------

# Each customer: an email, a wait of seconds, a second email.
TWO_EMAILS = ("hello", "bye")


def two_email_journey(slug: str, segment: str, *, pause: str = "PT2S", **changes: Any) -> dict:
    return {
        "slug": slug,
        "name": f"Fault test {slug}",
        "trigger": {"segment": segment},
        "start": "hello",
        "steps": {
            "hello": {"type": "email", "template": "champions/welcome.html", "next": "pause"},
            "pause": {"type": "delay", "duration": pause, "next": "bye"},
            "bye": {"type": "email", "template": "champions/reminder.html", "next": None},
        },
        **changes,
    }


@dataclass
class Answers:
    """Every status the API answered a client that retries 503s and lost connections."""

    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: Counter[str] = field(default_factory=Counter)
    connection_errors: int = 0

    def note(self, response: httpx.Response) -> None:
        self.statuses[response.status_code] += 1
        if response.status_code == 503:
            self.retry_after[response.headers.get("retry-after", "")] += 1


async def call(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    answers: Answers | None = None,
    *,
    seconds: float = 120,
    **kwargs: Any,
) -> httpx.Response:
    """The request, sent again (the same body) after a 503 or a lost connection, as a
    client that honours Retry-After does."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TransportError:
            if answers is not None:
                answers.connection_errors += 1
            response = None
        else:
            if answers is not None:
                answers.note(response)
            if response.status_code != 503:
                return response
        if time.monotonic() > deadline:
            raise AssertionError(f"{method} {path} kept failing: {response}")
        wait = float(response.headers.get("retry-after", "1")) if response is not None else 0.5
        await asyncio.sleep(wait)


async def set_up_journey(
    client: httpx.AsyncClient, journey: dict[str, Any], answers: Answers | None = None
) -> None:
    segment = journey["trigger"]["segment"]
    body = {"slug": segment, "name": segment, "owner": "external"}
    for method, path, payload in (
        ("POST", "/v1/segments", body),
        ("POST", "/v1/journeys", journey),
        ("POST", f"/v1/journeys/{journey['slug']}/activate", None),
    ):
        response = await call(client, method, path, answers, json=payload)
        assert response.is_success, response.text


async def add_customers(
    client: httpx.AsyncClient, ids: Sequence[str], answers: Answers | None = None
) -> None:
    for start in range(0, len(ids), 1000):
        lines = "\n".join(
            json.dumps({"customer_id": c, "email": f"{c}@example.com"})
            for c in ids[start : start + 1000]
        )
        response = await call(
            client,
            "POST",
            "/v1/customers/bulk",
            answers,
            content=lines,
            headers={"content-type": "application/x-ndjson"},
        )
        assert response.is_success, response.text


async def enter(
    client: httpx.AsyncClient, segment: str, ids: Sequence[str], answers: Answers | None = None
) -> None:
    response = await call(
        client, "POST", f"/v1/segments/{segment}/entries", answers, json={"customer_ids": ids}
    )
    assert response.is_success, response.text


def chunks(ids: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    return (ids[i : i + size] for i in range(0, len(ids), size))


# --- what happened --------------------------------------------------------------------------


async def until(check: Callable[[], Any], what: str, seconds: float, poll: float = 0.1) -> Any:
    """Poll `check` until it is truthy. A bound on waiting, never a timed assertion."""
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(poll)


def run_statuses(engine: Engine, journey: str) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT status, COUNT(*) FROM journey_runs WHERE journey_slug = :j GROUP BY 1"),
            {"j": journey},
        ).all()
    return Counter({status: count for status, count in rows})


async def all_runs_ended(engine: Engine, journey: str, count: int, seconds: float) -> None:
    def ended() -> bool:
        statuses = run_statuses(engine, journey)
        return sum(statuses.values()) >= count and statuses.get("running", 0) == 0

    await until(ended, f"{count} runs of {journey} to end", seconds, poll=0.5)


@dataclass
class SendCount:
    """Messages per (customer, step): as the stub took them, and as the store has them."""

    at_provider: Counter[tuple[str, str]]
    in_store: Counter[tuple[str, str]]
    store_statuses: Counter[str]
    runs: Counter[str]

    def problems(self, customers: Sequence[str], steps: Sequence[str]) -> dict[str, Any]:
        """What differs from every customer getting every step's message exactly once:
        empty when nothing was lost, sent twice or sent that the path does not call for."""
        expected = Counter({(c, s): 1 for c in customers for s in steps})
        found: dict[str, Any] = {}
        for where, counts in (("provider", self.at_provider), ("store", self.in_store)):
            lost = sorted(set(expected) - set(counts))
            twice = sorted(k for k, n in counts.items() if n > 1)
            unexpected = sorted(set(counts) - set(expected))
            if lost:
                found[f"lost at the {where}"] = (len(lost), lost[:5])
            if twice:
                found[f"twice at the {where}"] = (len(twice), twice[:5])
            if unexpected:
                found[f"unexpected at the {where}"] = (len(unexpected), unexpected[:5])
        settled = {"sent", "delivered"}
        if set(self.store_statuses) - settled:
            found["store statuses"] = dict(self.store_statuses)
        if self.runs != Counter({"completed": len(customers)}):
            found["runs"] = dict(self.runs)
        return found


def _customer_and_step(key: str) -> tuple[str, str]:
    # {workflow id = journey:{slug}:{customer}}:{run id}:{step}
    workflow_id, _run_id, step = key.rsplit(":", 2)
    return workflow_id.split(":", 2)[2], step


def count_sends(stub: ProviderStub, engine: Engine, journey: str) -> SendCount:
    at_provider: Counter[tuple[str, str]] = Counter()
    with stub.lock:
        for key, times in stub.accepted.items():
            if f":{journey}:" in key:
                at_provider[_customer_and_step(key)] += times
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT customer_id, step, status FROM messages WHERE journey_slug = :j"),
            {"j": journey},
        ).all()
    return SendCount(
        at_provider=at_provider,
        in_store=Counter((customer, step) for customer, step, _ in rows),
        store_statuses=Counter(status for _, _, status in rows),
        runs=run_statuses(engine, journey),
    )


@dataclass
class Histories:
    """What Temporal recorded of the journeys run on a task queue."""

    executions: Counter[str] = field(default_factory=Counter)  # workflow id -> runs
    statuses: Counter[str] = field(default_factory=Counter)
    # How each send's attempts before the last ended: `first` for sends done at their
    # first attempt, else `heartbeat timeout`, `ProviderUnavailable`, ...
    attempts: Counter[str] = field(default_factory=Counter)
    # The worker (Temporal identity `pid@host`) that ran each send's last attempt.
    send_workers: Counter[str] = field(default_factory=Counter)


async def all_executions_closed(address: str, task_queue: str, seconds: float) -> None:
    """Wait until Temporal has closed every journey execution on `task_queue`: the store
    marks a run ended in its last activity, a moment before its workflow completes."""
    from temporalio.client import Client

    client = await Client.connect(address)
    query = (
        f"TaskQueue = '{task_queue}' AND WorkflowType = 'JourneyWorkflow'"
        " AND ExecutionStatus = 'Running'"
    )
    deadline = time.monotonic() + seconds
    while (await client.count_workflows(query)).count:
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for the executions on {task_queue} to close")
        await asyncio.sleep(0.5)


async def journey_histories(address: str, task_queue: str) -> Histories:
    from temporalio.api.enums.v1 import EventType, TimeoutType
    from temporalio.client import Client

    client = await Client.connect(address)
    found = Histories()
    query = f"TaskQueue = '{task_queue}' AND WorkflowType = 'JourneyWorkflow'"
    executions = [w async for w in client.list_workflows(query)]
    semaphore = asyncio.Semaphore(20)

    async def one(execution: Any) -> None:
        found.executions[execution.id] += 1
        found.statuses[execution.status.name if execution.status else "UNKNOWN"] += 1
        async with semaphore:
            handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
            history = await handle.fetch_history()
        for event in history.events:
            if event.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                continue
            started = event.activity_task_started_event_attributes
            found.send_workers[started.identity] += 1
            if started.attempt <= 1:
                found.attempts["first"] += 1
                continue
            failure = started.last_failure
            if failure.HasField("timeout_failure_info"):
                kind = TimeoutType.Name(failure.timeout_failure_info.timeout_type)
                found.attempts[kind.removeprefix("TIMEOUT_TYPE_").lower() + " timeout"] += 1
            else:
                found.attempts[failure.application_failure_info.type or failure.message[:40]] += 1

    await asyncio.gather(*(one(execution) for execution in executions))
    return found
