"""Commands run from another shell or folder find the running `journeys dev` stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from core.db import make_engine
from core.migrate import migrate
from stackrecord import (
    StackRecord,
    adopt_running_stack,
    record_path,
    running_stacks,
    write_record,
)

ROOT = Path(__file__).resolve().parent.parent
DEAD_PID = 2**22 + 1  # above Linux's pid_max ceiling: no process has it


@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home


def stack(data_dir: Path, pid: int | None = None) -> StackRecord:
    return StackRecord(
        pid=os.getpid() if pid is None else pid,
        data_dir=str(data_dir),
        database_url=f"sqlite:///{data_dir / 'journeys.db'}",
        temporal_address="127.0.0.1:17233",
        temporal_ui_url="http://127.0.0.1:18233",
        api_url="http://127.0.0.1:18000",
    )


def test_one_running_stack_is_adopted(state_home: Path, tmp_path: Path):
    record = stack(tmp_path / "a")
    write_record(record)
    environ: dict[str, str] = {}
    assert adopt_running_stack(environ, tmp_path / "no.env") == record
    assert environ["JOURNEYS_DATABASE_URL"] == record.database_url
    assert environ["JOURNEYS_TEMPORAL_UI_URL"] == "http://127.0.0.1:18233"
    assert environ["JOURNEYS_TEMPORAL_ADDRESS"] == "127.0.0.1:17233"


@pytest.mark.parametrize("name", ["JOURNEYS_DATABASE_URL", "JOURNEYS_DATA_DIR"])
def test_a_store_the_user_names_wins(state_home: Path, tmp_path: Path, name: str):
    write_record(stack(tmp_path / "a"))
    environ = {name: "sqlite:///mine.db"}
    assert adopt_running_stack(environ, tmp_path / "no.env") is None
    assert environ == {name: "sqlite:///mine.db"}
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"{name}=elsewhere\n")
    environ = {}
    assert adopt_running_stack(environ, dotenv) is None and environ == {}


def test_a_stopped_stack_is_forgotten_and_two_are_ambiguous(state_home: Path, tmp_path: Path):
    dead = write_record(stack(tmp_path / "dead", pid=DEAD_PID))
    assert running_stacks() == [] and not dead.exists()
    write_record(stack(tmp_path / "a"))
    write_record(stack(tmp_path / "b"))
    environ: dict[str, str] = {}
    assert adopt_running_stack(environ, tmp_path / "no.env") is None and environ == {}


def test_the_record_is_one_per_data_folder(state_home: Path, tmp_path: Path):
    assert record_path(tmp_path / "a") == record_path(tmp_path / "x" / ".." / "a")
    assert record_path(tmp_path / "a") != record_path(tmp_path / "b")


def test_a_command_from_another_folder_writes_to_the_running_stack(
    state_home: Path, tmp_path: Path
):
    data_dir = tmp_path / "stack"
    data_dir.mkdir()
    record = stack(data_dir)
    migrate(make_engine(record.database_url))
    write_record(record)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JOURNEYS_DATABASE_URL", "JOURNEYS_DATA_DIR")
    }
    result = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "--role", "marketer", "--name", "found"],
        cwd=elsewhere,
        env={**env, "PYTHONPATH": str(ROOT), "XDG_STATE_HOME": str(state_home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"using the running dev stack: data in {data_dir}" in result.stderr
    assert not (elsewhere / ".journeys").exists()
    with make_engine(record.database_url).connect() as conn:
        names = conn.execute(text("SELECT name FROM api_keys")).scalars().all()
    assert names == ["found"]
