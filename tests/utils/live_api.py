"""The real API served by uvicorn on a free loopback port, in a thread, for fuzzing."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from sqlalchemy.engine import Engine
from sqlmodel import Session

from api.app import create_app
from store.keys import ROLES, create_key
from tests.utils.api import settings_for_tests


@dataclass
class LiveApi:
    url: str
    engine: Engine
    keys: dict[str, str]

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_api(engine: Engine, *, temporal_address: str = "127.0.0.1:1") -> Iterator[LiveApi]:
    """The app on `engine` (and Temporal at `temporal_address`), answering HTTP on
    127.0.0.1 until the block ends."""
    keys = {}
    with Session(engine) as session:
        for role in ROLES:
            _, keys[role] = create_key(session, role=role, name=f"live-{role}")
        session.commit()
    port = free_port()
    app = create_app(settings_for_tests(temporal_address=temporal_address), engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="live-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.02)
    try:
        yield LiveApi(f"http://127.0.0.1:{port}", engine, keys)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
