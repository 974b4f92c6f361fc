"""What `journeys dev` tells its API about the processes it supervises (the state file)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

ProcessStatus = Literal["starting", "up", "restarting"]


class ProcessState(BaseModel):
    """One supervised process as the supervisor last saw it."""

    name: str = Field(max_length=40)
    status: ProcessStatus
    pid: int | None = None
    restarts: int = Field(0, ge=0, description="how many times it was restarted")
    last_exit: str | None = Field(
        None, max_length=80, description="how it last ended, e.g. `killed by SIGKILL`"
    )
    restart_at: datetime | None = Field(None, description="when a restarting process starts")


class StackState(BaseModel):
    """The state file of `journeys dev` (`DIR/run/stack.json`)."""

    processes: list[ProcessState] = Field(default_factory=list, max_length=20)
    written_at: datetime
