"""The `journeys` command: help everywhere, keys, file imports with line numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text

from core.db import make_engine

ROOT = Path(__file__).resolve().parent.parent


def journeys(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def store_env(tmp_path: Path) -> dict[str, str]:
    return {"JOURNEYS_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["dev"],
        ["api"],
        ["worker"],
        ["keys", "create"],
        ["keys", "list"],
        ["events", "import"],
        ["customers", "import"],
    ],
)
def test_every_command_has_help(command):
    result = journeys(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_keys_create_prints_a_working_key(store_env):
    result = journeys("keys", "create", "--role", "support", "--name", "desk", env=store_env)
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip().splitlines()[-1]
    assert secret.startswith("jk_support_")
    from sqlmodel import Session

    from store.keys import verify_key

    engine = make_engine(store_env["JOURNEYS_DATABASE_URL"])
    with Session(engine) as session:
        key = verify_key(session, secret=secret)
    assert key is not None and key.role == "support"


def test_keys_create_refuses_an_unknown_role(store_env):
    result = journeys("keys", "create", "--role", "owner", env=store_env)
    assert result.returncode == 2
    assert "--role must be one of" in result.stdout


def test_events_import_ndjson_reports_line_numbers(tmp_path, store_env):
    path = tmp_path / "events.ndjson"
    good = {
        "event_id": "e1",
        "customer_id": "c1",
        "name": "Purchase",
        "occurred_at": "2026-11-01T00:00:00Z",
    }
    path.write_bytes(
        b"\n".join(
            [
                orjson.dumps(good),
                orjson.dumps({**good, "event_id": "e2", "occurred_at": "2026-11-01"}),
                orjson.dumps(good),
                b"{oops",
                orjson.dumps({**good, "event_id": "e3", "properties": {"total_price": 9}}),
            ]
        )
    )
    result = journeys("events", "import", str(path), env=store_env)
    assert result.returncode == 1
    assert "line 2: occurred_at:" in result.stdout and "line 4:" in result.stdout
    engine = make_engine(store_env["JOURNEYS_DATABASE_URL"])
    with engine.connect() as conn:
        ids = sorted(conn.execute(text("SELECT event_id FROM events")).scalars())
    assert ids == ["e1", "e3"]


def test_events_import_csv_puts_extra_columns_in_properties(tmp_path, store_env):
    path = tmp_path / "events.csv"
    path.write_text(
        "event_id,customer_id,name,occurred_at,total_price,currency\n"
        "p1,c1,Purchase,2026-11-01T10:00:00Z,19.5,EUR\n"
        "p2,c1,Purchase,not-a-time,5,EUR\n"
    )
    result = journeys("events", "import", str(path), env=store_env)
    assert "line 3: occurred_at:" in result.stdout
    engine = make_engine(store_env["JOURNEYS_DATABASE_URL"])
    with engine.connect() as conn:
        props = conn.execute(
            text("SELECT properties FROM events WHERE event_id = 'p1'")
        ).scalar_one()
    assert orjson.loads(props) == {"total_price": 19.5, "currency": "EUR"}


def test_customers_import_merges(tmp_path, store_env):
    path = tmp_path / "customers.ndjson"
    path.write_bytes(
        b'{"customer_id": "c1", "email": "a@example.com", "attributes": {"plan": "pro"}}\n'
        b'{"customer_id": "c1", "attributes": {"signed_up": true}}\n'
    )
    result = journeys("customers", "import", str(path), env=store_env)
    assert result.returncode == 0, result.stdout + result.stderr
    engine = make_engine(store_env["JOURNEYS_DATABASE_URL"])
    with engine.connect() as conn:
        row = conn.execute(text("SELECT email, attributes FROM customers WHERE id = 'c1'")).one()
    assert row[0] == "a@example.com"
    assert orjson.loads(row[1]) == {"plan": "pro", "signed_up": True}
