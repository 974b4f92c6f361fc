"""Building an API client on a test store, with a key per role."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from api.app import create_app
from core.settings import Settings
from store.keys import ROLES, create_key


@dataclass
class ApiHarness:
    client: TestClient
    engine: Engine
    keys: dict[str, str]

    def headers(self, role: str = "admin", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}", **extra}

    def post(self, path: str, role: str = "admin", **kwargs: Any) -> Any:
        return self.client.post(
            path, headers=self.headers(role, **kwargs.pop("headers", {})), **kwargs
        )

    def get(self, path: str, role: str = "admin", **kwargs: Any) -> Any:
        return self.client.get(
            path, headers=self.headers(role, **kwargs.pop("headers", {})), **kwargs
        )


def settings_for_tests(**overrides: Any) -> Settings:
    defaults: dict[str, Any] = {
        "environment": "test",
        "temporal_address": "127.0.0.1:1",
        "secret_key": "test-secret",
    }
    return Settings(**{**defaults, **overrides})


@contextmanager
def api_harness(engine: Engine, **overrides: Any) -> Iterator[ApiHarness]:
    """A TestClient on `engine` with one key of each role."""
    app = create_app(settings_for_tests(**overrides), engine)
    keys = {}
    with Session(engine) as session:
        for role in ROLES:
            _, keys[role] = create_key(session, role=role, name=f"test-{role}")
        session.commit()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield ApiHarness(client, engine, keys)


def assert_error_shape(body: Any) -> None:
    """The contract's error body: {"error": {"code", "message", "field"}} (+ "errors")."""
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert isinstance(error.get("code"), str) and error["code"], body
    assert isinstance(error.get("message"), str) and error["message"], body
    assert "field" in error and (error["field"] is None or isinstance(error["field"], str)), body
    for item in body.get("errors", []):
        assert isinstance(item.get("code"), str) and isinstance(item.get("message"), str), body
    assert "Traceback" not in str(body)
