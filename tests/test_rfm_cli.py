"""`journeys score MODEL [--as-of]` against the configured database."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import text

from core.db import make_engine
from core.migrate import migrate
from store.rfm_models import create_model
from tests.test_cli import journeys
from tests.utils.rfm import T, load, make_model, purchase


def test_score_runs_a_pass_and_prints_the_summary(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    engine = make_engine(url)
    migrate(engine)
    with engine.begin() as conn:
        create_model(conn, model=make_model(), now=T)
    load(
        engine,
        [purchase("a", T - timedelta(days=1), 100), purchase("b", T - timedelta(days=40), 5)],
    )

    result = journeys(
        "score", "default", "--as-of", "2026-11-20T12:00:00Z", env={"JOURNEYS_DATABASE_URL": url}
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "2 scored, 2 entries, 0 exits" in result.stdout
    for label in ("Champions", "Needs Attention", "At Risk", "Regulars", "Promising"):
        assert label in result.stdout
    with engine.connect() as conn:
        as_of = conn.execute(text("SELECT as_of FROM rfm_passes")).scalar_one()
    assert str(as_of).startswith("2026-11-20 12:00:00")

    missing = journeys("score", "nope", env={"JOURNEYS_DATABASE_URL": url})
    assert missing.returncode == 1 and missing.stderr == "journeys: no RFM model 'nope'\n"
    naive = journeys(
        "score", "default", "--as-of", "2026-11-20T12:00:00", env={"JOURNEYS_DATABASE_URL": url}
    )
    assert naive.returncode == 2 and "needs a zone" in naive.stdout
