"""The supervisor of `journeys dev` on real short-lived processes: how long it waits
before it starts a child again, and what it says."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from devstack import MAX_DELAY_SECONDS, STABLE_SECONDS, Child


def _dying_child(tmp_path: Path) -> Child:
    return Child(
        "flaky",
        [sys.executable, "-c", "raise SystemExit(3)"],
        dict(os.environ),
        tmp_path / "flaky.log",
        ready=lambda: True,
    )


def test_a_child_that_keeps_dying_waits_longer_each_time(tmp_path: Path) -> None:
    said: list[str] = []
    child = _dying_child(tmp_path)
    child.spawn()
    delays = []
    for _ in range(7):
        assert child.process is not None
        child.process.wait()
        now = time.monotonic()
        assert child.supervise(now, said.append)
        assert child.status == "restarting"
        delays.append(child.delay)
        # Not before its delay is over; then it is started again.
        assert not child.supervise(child.restart_at - 0.01, said.append)
        assert child.supervise(child.restart_at, said.append)
        assert child.status == "starting"
    assert delays == [1, 2, 4, 8, 16, MAX_DELAY_SECONDS, MAX_DELAY_SECONDS]
    assert said[0].startswith("flaky exited with code 3 after 0 s; restarting in 1 s (restart 1")
    assert said[1].startswith("flaky started again (pid ")
    assert child.restarts == 7
    log = (tmp_path / "flaky.log").read_text()
    assert log.count("--- journeys dev: flaky starts at") == 8


def test_a_child_that_ran_a_while_is_restarted_after_the_first_delay(tmp_path: Path) -> None:
    child = _dying_child(tmp_path)
    child.spawn()
    for _ in range(3):
        assert child.process is not None
        child.process.wait()
        child.supervise(time.monotonic(), lambda _: None)
        child.supervise(child.restart_at, lambda _: None)
    assert child.delay == 4
    assert child.process is not None
    child.process.wait()
    # It died again, but only after running long enough to count as healthy.
    child.supervise(child.started_at + STABLE_SECONDS, lambda _: None)
    assert child.delay == 1


def test_a_child_becomes_up_when_it_answers(tmp_path: Path) -> None:
    answers = iter([False, True])
    child = Child(
        "slow",
        [sys.executable, "-c", "import time; time.sleep(30)"],
        dict(os.environ),
        tmp_path / "slow.log",
        ready=lambda: next(answers),
    )
    child.spawn()
    try:
        assert not child.supervise(time.monotonic(), lambda _: None)
        assert child.status == "starting"
        assert child.supervise(time.monotonic(), lambda _: None)
        assert child.status == "up"
        state = child.state(time.monotonic())
        assert child.process is not None
        assert (state.name, state.status, state.pid) == ("slow", "up", child.process.pid)
    finally:
        assert child.process is not None
        child.process.kill()
        child.process.wait()
