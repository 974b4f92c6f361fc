"""Where a running `journeys dev` stack keeps its data, so that the `journeys` commands
run from another shell or folder use that stack instead of a fresh `./.journeys` store.

`journeys dev` writes one record per data folder under the user's state folder
(`$XDG_STATE_HOME/journeys/stacks`, else `~/.local/state/journeys/stacks`) and removes it
when it stops. A command adopts the stack's settings only when exactly one stack is
running and nothing names a store explicitly (`JOURNEYS_DATABASE_URL` or
`JOURNEYS_DATA_DIR` in the environment or in `./.env`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import MutableMapping
from pathlib import Path

from dotenv import dotenv_values
from pydantic import BaseModel, ValidationError

# Any of these, set by the user, names the store: the running stack is then not adopted.
EXPLICIT_STORE_SETTINGS = ("JOURNEYS_DATABASE_URL", "JOURNEYS_DATA_DIR")


class StackRecord(BaseModel):
    """What another shell needs to reach a running dev stack."""

    pid: int
    data_dir: str
    database_url: str
    temporal_address: str
    temporal_ui_url: str
    api_url: str

    def settings(self) -> dict[str, str]:
        """The environment that points the `journeys` commands at this stack."""
        return {
            "JOURNEYS_DATA_DIR": self.data_dir,
            "JOURNEYS_DATABASE_URL": self.database_url,
            "JOURNEYS_TEMPORAL_ADDRESS": self.temporal_address,
            "JOURNEYS_TEMPORAL_UI_URL": self.temporal_ui_url,
            "JOURNEYS_PUBLIC_URL": self.api_url,
        }


def records_folder() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "journeys" / "stacks"


def record_path(data_dir: Path) -> Path:
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return records_folder() / f"{digest}.json"


def write_record(record: StackRecord) -> Path:
    path = record_path(Path(record.data_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(record.model_dump_json())
    temporary.replace(path)
    return path


def remove_record(data_dir: Path) -> None:
    record_path(data_dir).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, but not ours to adopt
        return False
    return True


def running_stacks() -> list[StackRecord]:
    """The records of stacks still running; a record left by a killed stack is removed."""
    folder = records_folder()
    if not folder.is_dir():
        return []
    running: list[StackRecord] = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = StackRecord.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            record = None
        if record is not None and _alive(record.pid):
            running.append(record)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return running


def store_named_explicitly(environ: MutableMapping[str, str], dotenv: Path) -> bool:
    if any(environ.get(name) for name in EXPLICIT_STORE_SETTINGS):
        return True
    if not dotenv.is_file():
        return False
    values = dotenv_values(dotenv)
    return any(values.get(name) for name in EXPLICIT_STORE_SETTINGS)


def adopt_running_stack(
    environ: MutableMapping[str, str], dotenv: Path = Path(".env")
) -> StackRecord | None:
    """Point `environ` at the one running dev stack, unless the user named a store."""
    if store_named_explicitly(environ, dotenv):
        return None
    stacks = running_stacks()
    if len(stacks) != 1:
        return None
    environ.update(stacks[0].settings())
    return stacks[0]
