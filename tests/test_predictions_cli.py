"""`journeys predictions train MODEL [--as-of]` against the configured database."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from core.db import make_engine
from core.migrate import migrate
from core.predictions import PredictiveModelCreate
from store.predictions import create_model
from tests.test_cli import journeys
from tests.utils.predictions import T, load_known, model_body


def test_train_prints_the_figures_beside_the_baselines(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    engine = make_engine(url)
    migrate(engine)
    with engine.begin() as conn:
        create_model(conn, model=PredictiveModelCreate.model_validate(model_body()), now=T)
    load_known(engine, customers=300, seed=31)
    env = {"JOURNEYS_DATABASE_URL": url}

    result = journeys("predictions", "train", "buy-30d", "--as-of", T.isoformat(), env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    for method in ("model", "rfm_heuristic", "bgnbd"):
        assert method in result.stdout
    assert "300 scored" in result.stdout and "calibration" in result.stdout
    with engine.connect() as conn:
        status, scored = conn.execute(text("SELECT status, scored FROM prediction_trainings")).one()
    verdict = "beats" if status == "ok" else "does not beat"
    assert scored == 300 and f"the model {verdict} the RFM heuristic" in result.stdout

    missing = journeys("predictions", "train", "nope", env=env)
    assert missing.returncode == 1 and missing.stderr == "journeys: no predictive model 'nope'\n"
    early = journeys("predictions", "train", "buy-30d", "--as-of", "2020-01-01T00:00:00Z", env=env)
    assert early.returncode == 1 and "needs customers with events before" in early.stderr
    naive = journeys("predictions", "train", "buy-30d", "--as-of", "2026-01-01T00:00", env=env)
    assert naive.returncode == 2
