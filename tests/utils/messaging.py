"""Test helpers of the messaging room: a stub SendGrid / Twilio HTTP server on
127.0.0.1, settings pointing the real clients at it, customers, store rows, signed webhooks."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from sqlalchemy import text
from sqlalchemy.engine import Engine
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from core.messages import SendMessageInput
    from core.settings import Settings
    from core.signals import JOURNEY_EVENT_SIGNAL, CustomerEventSignal

TWILIO_SID = "AC" + "0" * 32
TWILIO_TOKEN = "twilio-test-token"
SENDGRID_KEY = "SG.test-key"


@dataclass
class StubRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}


class _StubServer(ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True


@dataclass
class ProviderStub:
    """A stub of SendGrid's `POST /v3/mail/send` and Twilio's Messages API.

    `decide(request)` returns the status to answer (default 202 / 201). Every request is
    kept; `accepted` counts, per idempotency key, the requests answered with success, as
    soon as they arrive: an answer delayed (`delay_seconds`, `delay_for(request)`) past
    the client's timeout is a message the provider took. `on_accept(request, key)` hears
    of each (the SendGrid event webhook of tests/utils/cluster.py).
    """

    decide: Callable[[StubRequest], int] | None = None
    delay_seconds: float = 0.0
    delay_for: Callable[[StubRequest], float] | None = None
    on_accept: Callable[[StubRequest, str], None] | None = None
    requests: list[StubRequest] = field(default_factory=list)
    accepted: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    keep_requests: bool = True

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ProviderStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                request = StubRequest(
                    method="POST",
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length),
                )
                stub.answer(self, request)

        self.server = _StubServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def answer(self, handler: BaseHTTPRequestHandler, request: StubRequest) -> None:
        with self.lock:
            if self.keep_requests:
                self.requests.append(request)
        twilio = "/Messages.json" in request.path
        status = self.decide(request) if self.decide else (201 if twilio else 202)
        key = _key_of(request, twilio)
        if 200 <= status < 300:
            with self.lock:
                self.accepted[key] += 1
            if self.on_accept is not None:
                self.on_accept(request, key)
        delay = self.delay_seconds + (self.delay_for(request) if self.delay_for else 0.0)
        if delay:
            time.sleep(delay)
        if twilio and 200 <= status < 300:
            sid = "SM" + uuid.uuid4().hex
            body = json.dumps(
                {"sid": sid, "status": "queued", "to": request.form().get("To"), "body": ""}
            ).encode()
            headers = {"Content-Type": "application/json"}
        elif 200 <= status < 300:
            body, headers = b"", {"X-Message-Id": "sgmsg" + uuid.uuid4().hex[:16]}
        else:
            body = json.dumps(
                {
                    "errors": [{"message": f"stub answered {status}"}],
                    "code": 20001,
                    "message": f"stub {status}",
                    "status": status,
                }
            ).encode()
            headers = {"Content-Type": "application/json"}
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def of_path(self, fragment: str) -> list[StubRequest]:
        with self.lock:
            return [r for r in self.requests if fragment in r.path]


def _key_of(request: StubRequest, twilio: bool) -> str:
    try:
        if twilio:
            callback = request.form().get("StatusCallback", "")
            return parse_qs(callback.split("?", 1)[1])["key"][0] if "?" in callback else ""
        return str(request.json().get("custom_args", {}).get("idempotency_key", ""))
    except (ValueError, KeyError, IndexError):
        return ""


def failing(rate: float, seed: int = 7, status: int = 503) -> Callable[[StubRequest], int]:
    """Answer `status` to a `rate` share of requests (seeded), success to the rest."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def decide(request: StubRequest) -> int:
        with lock:
            fail = rng.random() < rate
        if fail:
            return status
        return 201 if "/Messages.json" in request.path else 202

    return decide


def provider_settings(
    stub: ProviderStub | str, *, database_url: str = "", **overrides: Any
) -> Settings:
    """Settings pointing the real SendGrid and Twilio clients at the stub (or its URL)."""
    url = stub if isinstance(stub, str) else stub.url
    values: dict[str, Any] = {
        "environment": "test",
        "database_url": database_url,
        "secret_key": "test-secret",
        "public_url": "https://journeys.example.com",
        "sendgrid_api_key": SENDGRID_KEY,
        "sendgrid_base_url": url,
        "email_from": "hello@shop.example.com",
        "twilio_account_sid": TWILIO_SID,
        "twilio_auth_token": TWILIO_TOKEN,
        "twilio_base_url": url,
        "twilio_from": "+15550001111",
        "provider_timeout_seconds": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


def add_customer(
    engine: Engine,
    customer_id: str,
    *,
    email: str | None = "ada@example.com",
    phone: str | None = "+15555550123",
    attributes: dict[str, Any] | None = None,
) -> None:
    from sqlmodel import Session

    from core.tables import Customer

    with Session(engine) as session:
        session.add(
            Customer(
                id=customer_id,
                email=email,
                phone=phone,
                attributes=attributes or {"first_name": "Ada"},
            )
        )
        session.commit()


def send_input(customer_id: str = "c-1", **changes: Any) -> SendMessageInput:
    values: dict[str, Any] = {
        "workflow_id": f"journey:champions:{customer_id}",
        "run_id": "run-1",
        "step_id": "welcome",
        "journey_slug": "champions",
        "version": 1,
        "customer_id": customer_id,
        "channel": "email",
        "template": "champions/welcome.html",
        "seq": 1,
    }
    values.update(changes)
    return SendMessageInput(**values)


def message_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [
            dict(row._mapping)
            for row in conn.execute(
                text(
                    "SELECT id, idempotency_key, status, provider, provider_message_id, error FROM messages ORDER BY id"
                )
            )
        ]


def run_events(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [
            dict(row._mapping)
            for row in conn.execute(
                text("SELECT seq, step, kind, reason FROM run_events ORDER BY seq, id")
            )
        ]


# --- signing webhooks the way SendGrid and Twilio do -------------------------------------


@dataclass
class SendGridSigner:
    """An ECDSA P-256 key pair like SendGrid's signed event webhook uses."""

    private_key: Any
    public_key_base64: str

    @classmethod
    def generate(cls) -> SendGridSigner:
        import base64

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        private_key = ec.generate_private_key(ec.SECP256R1())
        der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(private_key=private_key, public_key_base64=base64.b64encode(der).decode())

    def headers(self, payload: bytes, timestamp: int | None = None) -> dict[str, str]:
        import base64

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = self.private_key.sign(stamp.encode() + payload, ec.ECDSA(hashes.SHA256()))
        return {
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
            "Content-Type": "application/json",
        }


def twilio_signature(url: str, form: dict[str, str], token: str = TWILIO_TOKEN) -> str:
    from twilio.request_validator import RequestValidator

    return RequestValidator(token).compute_signature(url, form)


@workflow.defn(sandboxed=False)
class ClickWaiterWorkflow:
    """Waits for one journey event signal and returns `name:step`."""

    def __init__(self) -> None:
        self.received: list[str] = []

    @workflow.signal(name=JOURNEY_EVENT_SIGNAL)
    def customer_event(self, signal: CustomerEventSignal) -> None:
        self.received.append(f"{signal.name}:{signal.step}")

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: bool(self.received))
        return self.received[0]
