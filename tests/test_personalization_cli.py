"""`journeys templates install` ships the seed's campaign beside its journeys, and
`journeys personalize analytics` has help (its report is checked in
test_personalization_api.py against the same store the API wrote)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core.db import make_engine
from store.personalization import get_campaign

ROOT = Path(__file__).resolve().parent.parent


def journeys(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_personalize_commands_have_help(tmp_path) -> None:
    env = {"JOURNEYS_DATABASE_URL": f"sqlite:///{tmp_path / 'help.db'}"}
    for command in (["personalize"], ["personalize", "analytics"]):
        result = journeys(*command, "--help", env=env)
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout


def test_templates_install_ships_the_campaign_with_the_journeys(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'install.db'}"
    result = journeys(
        "templates", "install", "--create-model", "--activate", env={"JOURNEYS_DATABASE_URL": url}
    )
    assert result.returncode == 0, result.stderr
    assert "rfm-homepage" in result.stdout and "personalizations/homepage.json" in result.stdout
    with make_engine(url).connect() as conn:
        installed = get_campaign(conn, slug="rfm-homepage")
    assert (installed.state, installed.active_version) == ("active", 1)
    again = journeys("templates", "install", env={"JOURNEYS_DATABASE_URL": url})
    assert again.returncode == 0, again.stderr
    line = next(line for line in again.stdout.splitlines() if "rfm-homepage" in line)
    assert "unchanged" in line and "active" in line
