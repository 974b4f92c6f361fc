"""The `journeys` command: help everywhere, keys, file imports with line numbers, and one
line on stderr with a documented exit code when the store, Temporal or the input fails."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Engine

from core.db import make_engine
from core.migrate import alembic_config, migrate

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


# --- failures: one line on stderr, a documented exit code, never a traceback ---

EXIT_FAILED, EXIT_STORE, EXIT_TEMPORAL = 1, 3, 4


def one_line_failure(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a command that failed with `code`."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, result.stderr
    assert lines[0].startswith("journeys: ")
    return lines[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


STORE_COMMANDS = [
    ["keys", "create", "--role", "admin"],
    ["keys", "list"],
    ["keys", "revoke", "k-1"],
    ["events", "import", "{file}"],
    ["customers", "import", "{file}"],
    ["score", "default"],
    ["segments", "evaluate", "vip"],
    ["templates", "install"],
    ["inspect", "carol"],
    ["analytics", "champions-nurture"],
    ["api", "--port", "{port}"],
    ["worker"],
]


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_store_command_names_an_unreachable_database(tmp_path, command):
    port = closed_port()
    records = tmp_path / "records.ndjson"
    records.write_text("")
    args = [arg.format(file=records, port=closed_port()) for arg in command]
    url = f"postgresql://journeys:s3cret@127.0.0.1:{port}/journeys"
    result = journeys(*args, env={"JOURNEYS_DATABASE_URL": url})
    line = one_line_failure(result, EXIT_STORE)
    assert line == (
        f"journeys: the database at postgresql://journeys:***@127.0.0.1:{port}/journeys"
        " is not reachable: Connection refused"
    )


@pytest.mark.parametrize("command", [["keys", "list"], ["inspect", "carol"]])
def test_a_file_that_is_not_a_database(tmp_path, command):
    path = tmp_path / "journeys.db"
    path.write_bytes(b"these are not the pages of a SQLite database\n" * 200)
    result = journeys(*command, env={"JOURNEYS_DATABASE_URL": f"sqlite:///{path}"})
    line = one_line_failure(result, EXIT_STORE)
    assert line.endswith(f"at sqlite:///{path} is not a SQLite database: file is not a database")
    assert path.read_bytes().startswith(b"these are not the pages")


def test_a_database_folder_that_cannot_be_made(tmp_path):
    (tmp_path / "a-file").write_text("")
    url = f"sqlite:///{tmp_path / 'a-file' / 'journeys.db'}"
    result = journeys("keys", "list", env={"JOURNEYS_DATABASE_URL": url})
    line = one_line_failure(result, EXIT_STORE)
    assert f"at {url} is not reachable: cannot create the folder {tmp_path / 'a-file'}" in line


@pytest.fixture
def locked_store(tmp_path: Path):
    """A migrated SQLite store with a rule segment and an RFM model, whose write lock
    another connection holds."""
    from store.rfm_models import create_model
    from store.segments import create_segment
    from tests.utils.rfm import T, load, make_model, purchase

    path = tmp_path / "locked.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    with engine.begin() as conn:
        create_model(conn, model=make_model(), now=T)
        condition = {"attribute": "vip", "op": "exists"}
        create_segment(
            conn, slug="vip", name="VIP", kind="rule", condition=condition, now=datetime.now(UTC)
        )
    load(engine, [purchase("a", T, 10)])
    engine.dispose()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    yield path
    holder.rollback()
    holder.close()


@pytest.mark.parametrize("command", [["segments", "evaluate", "vip"], ["score", "default"]])
def test_a_locked_database(locked_store, command):
    env = {
        "JOURNEYS_DATABASE_URL": f"sqlite:///{locked_store}",
        "JOURNEYS_SQLITE_BUSY_TIMEOUT_MS": "300",
    }
    line = one_line_failure(journeys(*command, env=env), EXIT_STORE)
    assert line == (
        f"journeys: the database at sqlite:///{locked_store} is locked: another process held"
        " it for longer than 0.3 s (JOURNEYS_SQLITE_BUSY_TIMEOUT_MS)"
    )


# The newest migration in migrations/versions: what this code migrates a store to.
HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


@pytest.mark.parametrize("command", [["keys", "list"], ["inspect", "carol"]])
def test_a_database_migrated_by_a_newer_version(store_engine, command):
    with store_engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    result = journeys(*command, env={"JOURNEYS_DATABASE_URL": url_of(store_engine)})
    line = one_line_failure(result, EXIT_STORE)
    assert line.endswith(
        "was migrated by a newer version of journeys (revision 9999_future);"
        f" this version knows revisions up to {HEAD}"
    )
    with store_engine.connect() as conn:  # and nothing was touched
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == (
            "9999_future"
        )


@pytest.mark.parametrize("command", [["inspect", "carol"], ["analytics", "champions-nurture"]])
def test_reading_commands_refuse_a_database_that_is_not_migrated(tmp_path, command):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    result = journeys(*command, env={"JOURNEYS_DATABASE_URL": url})
    line = one_line_failure(result, EXIT_STORE)
    assert line == (
        f"journeys: the database at {url} is not migrated (no schema revision; this version"
        f" needs {HEAD}): `journeys api` or `journeys worker` migrates it on start"
    )


def test_reading_commands_refuse_an_older_schema(store_engine):
    with store_engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0004'"))
    result = journeys("inspect", "carol", env={"JOURNEYS_DATABASE_URL": url_of(store_engine)})
    line = one_line_failure(result, EXIT_STORE)
    assert line.endswith(
        f"is not migrated (at revision 0004; this version needs {HEAD}):"
        " `journeys api` or `journeys worker` migrates it on start"
    )


def test_an_unknown_segment(store_engine):
    result = journeys(
        "segments", "evaluate", "nope", env={"JOURNEYS_DATABASE_URL": url_of(store_engine)}
    )
    assert one_line_failure(result, EXIT_FAILED) == "journeys: no segment 'nope'"
    assert result.stdout == ""


async def test_an_unreachable_temporal_is_one_line():
    from temporalio.client import Client

    from cli import explain_failure
    from core.settings import get_settings

    with pytest.raises(RuntimeError) as refused:
        await Client.connect(f"127.0.0.1:{closed_port()}")
    # The line names the configured address, which the worker would have dialled.
    configured = get_settings().temporal_address
    assert explain_failure(refused.value) == (
        EXIT_TEMPORAL,
        f"Temporal at {configured} is not reachable: Connection refused",
    )


@pytest.mark.slow
def test_the_worker_names_an_unreachable_temporal(tmp_path):
    address = f"127.0.0.1:{closed_port()}"
    env = {
        "JOURNEYS_DATABASE_URL": f"sqlite:///{tmp_path / 'worker.db'}",
        "JOURNEYS_TEMPORAL_ADDRESS": address,
    }
    result = journeys("worker", env=env)  # it retries the connection for a minute
    assert result.returncode == EXIT_TEMPORAL, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("journeys: ")]
    assert errors == [f"journeys: Temporal at {address} is not reachable: Connection refused"]


def test_piped_tables_are_not_cut_at_80_columns(tmp_path, store_env):
    names = [f"a-key-named-for-a-rather-long-purpose-{i}" for i in range(2)]
    for name in names:
        assert (
            journeys(
                "keys", "create", "--role", "support", "--name", name, env=store_env
            ).returncode
            == 0
        )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    listed = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "list"],
        cwd=ROOT,
        env={**env, **store_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert all(name in listed.stdout for name in names)
    assert max(len(line) for line in listed.stdout.splitlines()) > 80
