"""Predictive models in the store, on SQLite and PostgreSQL: features by hand, leakage,
calibration on generated data with a known probability, scores, levels, real time."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import bindparam, text

from core.errors import Conflict
from core.predictions import PredictiveModelCreate, PredictiveModelDefinition
from core.tables import UTCDateTime
from store import predictions as prediction_store
from store.prediction_features import feature_columns, read_features, read_outcomes
from store.prediction_training import NotEnoughHistory, train_and_score
from tests.utils.predictions import BUY_CHANCE, T, customer_type, load_known, model_body
from tests.utils.rfm import EventRow, add_customers, load

C = datetime(2026, 6, 1, tzinfo=UTC)


def _definition(**changes) -> PredictiveModelDefinition:
    return PredictiveModelDefinition.model_validate(
        {k: v for k, v in model_body(**changes).items() if k != "slug"}
    )


def _create(engine, **changes) -> None:
    with engine.begin() as conn:
        prediction_store.create_model(
            conn, model=PredictiveModelCreate.model_validate(model_body(**changes)), now=C
        )


def _scores(engine, slug: str = "buy-30d") -> dict[str, tuple[float, str]]:
    with engine.connect() as conn:
        rows = prediction_store.page_scores(conn, slug=slug, limit=100_000)
    return {r.customer_id: (r.probability, r.level) for r in rows}


def _day(n: float) -> datetime:
    return C - timedelta(days=n)


def test_features_as_of_a_cutoff_by_hand(store_engine):
    with store_engine.begin() as conn:
        add_customers(
            conn, ["a", "b", "c"], {"a": {"vip": True, "age": 41, "name": "Ann"}, "b": {}}
        )
    load(
        store_engine,
        [
            EventRow("a", "Purchase", _day(40), {"total_price": 10, "product_id": "p1"}),
            EventRow("a", "Purchase", _day(20), {"total_price": 30, "product_id": "p2"}),
            EventRow("a", "Purchase", _day(5), {"total_price": "x", "product_id": "p1"}),
            EventRow("a", "Visit", _day(2)),
            EventRow("a", "Purchase", _day(-1), {"total_price": 99, "product_id": "p1"}),
            EventRow("b", "Visit", _day(3)),
            EventRow("c", "Purchase", _day(-2), {"total_price": 5}),
        ],
        customers=[],
    )
    definition = _definition(
        target={
            "event": "Purchase",
            "where": [{"property": "product_id", "op": "eq", "value": "p1"}],
            "within": "P30D",
        },
        features={"value_property": "total_price", "attributes": ["vip", "age", "name"]},
    )
    with store_engine.connect() as conn:
        frame = read_features(conn, definition, cutoff=C)
        outcomes_before = read_outcomes(conn, definition, cutoff=_day(30), end=C)
        outcomes_after = read_outcomes(conn, definition, cutoff=C, end=_day(-30))
    assert frame.columns == feature_columns(definition)
    assert frame.customer_ids == ["a", "b"]  # c has no event at or before the cutoff
    a = dict(zip(frame.columns, frame.values[0], strict=True))
    expected_a = {
        "recency_days": 5,
        "frequency": 3,
        "monetary": 40,  # 10 + 30; the text price counts nothing
        "purchase_tenure_days": 40,
        "ipi_mean": 17.5,  # gaps 20 and 15
        "ipi_last": 15,
        "ipi_recent": 17.5,
        "tenure_days": 40,
        "days_since_last_event": 2,
        "events_total": 4,  # the purchase after the cutoff is not read
        "events_7d": 2,
        "events_30d": 3,
        "events_90d": 4,
        "events_365d": 4,
        "target_count": 2,  # product p1 only
        "target_days": 2,
        "target_recency_days": 5,
        "target_tenure_days": 40,
        "target_last_horizon": 1,
        "target_prev_horizon": 1,
        "target_30d": 1,
        "target_90d": 2,
        "target_365d": 2,
        "attr:vip": 1,
        "attr:age": 41,
    }
    assert {k: a[k] for k in expected_a} == pytest.approx(expected_a, abs=1e-6)
    assert np.isnan(a["attr:name"])
    b = dict(zip(frame.columns, frame.values[1], strict=True))
    assert b["frequency"] == 0 and b["target_count"] == 0 and b["events_total"] == 1
    assert np.isnan(b["recency_days"]) and np.isnan(b["ipi_mean"]) and np.isnan(b["monetary"])
    assert b["tenure_days"] == pytest.approx(3)
    assert outcomes_before == {"a"}  # its p1 purchase 5 days before the cutoff
    assert outcomes_after == {"a"}  # the p1 purchase a day after


def _training_figures(engine) -> tuple:
    outcome = train_and_score(engine, slug="buy-30d", as_of=T)
    return outcome.report.model_dump(), _scores(engine)


def _events_after_t(customers: int) -> list[EventRow]:
    """What a store holds once time has passed T: its customers act again (some a second
    after T), and new customers arrive."""
    rng = random.Random(99)
    events = []
    for n in range(customers):
        cid = f"k{n:05d}-{n % len(BUY_CHANCE)}"
        events.append(EventRow(cid, "Visit", T + timedelta(seconds=1 + n)))
        if rng.random() < 0.5:
            at = T + timedelta(days=rng.uniform(0.001, 60))
            events.append(EventRow(cid, "Purchase", at, {"total_price": 500}))
    events += [EventRow(f"new-{n}", "Purchase", T + timedelta(days=1 + n)) for n in range(50)]
    return events


def test_a_training_as_of_t_is_unchanged_by_events_after_t(store_engine):
    load_known(store_engine, customers=600, seed=5)
    _create(store_engine)
    report, scores = _training_figures(store_engine)
    load(store_engine, _events_after_t(600))
    with store_engine.connect() as conn:
        after_t = conn.execute(
            text("SELECT COUNT(*) FROM events WHERE occurred_at > :t").bindparams(
                bindparam("t", type_=UTCDateTime())
            ),
            {"t": T},
        ).scalar_one()
    assert after_t >= 650
    again_report, again_scores = _training_figures(store_engine)
    assert again_report == report
    assert again_scores == scores


def test_calibrated_on_generated_data_with_a_known_probability(sqlite_engine):
    load_known(sqlite_engine, customers=3_000)
    _create(sqlite_engine)
    outcome = train_and_score(sqlite_engine, slug="buy-30d", as_of=T)
    # Scored as of T: each type's mean probability is its known chance of buying in the
    # horizon after T, and every customer is near their own.
    scores = _scores(sqlite_engine)
    by_type: dict[int, list[float]] = {}
    for customer_id, (probability, _) in scores.items():
        by_type.setdefault(customer_type(customer_id), []).append(probability)
    for kind, chance in enumerate(BUY_CHANCE):
        assert np.mean(by_type[kind]) == pytest.approx(chance, abs=0.05), kind
    errors = [abs(p - BUY_CHANCE[customer_type(c)]) for c, (p, _) in scores.items()]
    assert np.mean(errors) < 0.07
    # On the holdout, every well-filled bin predicts the rate it observed.
    for row in outcome.report.model.calibration:
        if row.customers >= 150:
            assert row.mean_predicted == pytest.approx(row.observed_rate, abs=0.07), row
    # The known types are what matters, and both baselines see them only through RFM.
    report = outcome.report
    baselines = {b.method: b for b in report.baselines}
    assert report.model.auc > baselines["rfm_heuristic"].auc
    assert report.model.brier < baselines["bgnbd"].brier
    assert outcome.status == "ok" and report.beats_rfm_heuristic


def test_too_little_history_is_refused_in_words_and_recorded(store_engine):
    load(store_engine, [EventRow("a", "Purchase", T - timedelta(days=10))])
    _create(store_engine)
    with pytest.raises(NotEnoughHistory, match="needs customers with events before"):
        train_and_score(store_engine, slug="buy-30d", as_of=T)
    with store_engine.connect() as conn:
        latest = prediction_store.latest_training(conn, slug="buy-30d")
        failures = conn.execute(text("SELECT kind, key, stage FROM failures")).all()
    assert latest.status == "failed" and "needs customers" in latest.error
    assert [tuple(f) for f in failures] == [("prediction_model", "buy-30d", "training")]


def test_churn_is_the_chance_of_not_doing_the_target_and_levels_follow_thresholds(store_engine):
    load_known(store_engine, customers=400, seed=3)
    _create(store_engine)
    _create(store_engine, slug="churn-30d", direction="churn", levels={"medium": 0.4, "high": 0.7})
    train_and_score(store_engine, slug="buy-30d", as_of=T)
    outcome = train_and_score(store_engine, slug="churn-30d", as_of=T)
    buy, churn = _scores(store_engine, "buy-30d"), _scores(store_engine, "churn-30d")
    assert buy.keys() == churn.keys() and len(buy) == 400
    for customer_id, (p_buy, level) in buy.items():
        assert churn[customer_id][0] == pytest.approx(1 - p_buy, abs=1e-9)
        assert level == ("high" if p_buy >= 0.6 else "medium" if p_buy >= 0.3 else "low")
        p_churn, churn_level = churn[customer_id]
        assert churn_level == ("high" if p_churn >= 0.7 else "medium" if p_churn >= 0.4 else "low")
    # The holdout figures are those of the churn outcome: the same ranking, reversed.
    assert outcome.report.direction == "churn" and outcome.report.model.auc > 0.5


def test_new_thresholds_relevel_every_score_at_once(store_engine):
    load_known(store_engine, customers=300, seed=4)
    _create(store_engine)
    train_and_score(store_engine, slug="buy-30d", as_of=T)
    before = _scores(store_engine)
    with store_engine.begin() as conn:
        prediction_store.update_model(
            conn,
            slug="buy-30d",
            definition=_definition(levels={"medium": 0.1, "high": 0.2}),
            now=C,
        )
    after = _scores(store_engine)
    assert {c: p for c, (p, _) in after.items()} == {c: p for c, (p, _) in before.items()}
    assert {c: lvl for c, (_, lvl) in after.items()} == {
        c: "high" if p >= 0.2 else "medium" if p >= 0.1 else "low" for c, (p, _) in before.items()
    }


def test_a_model_named_by_a_segment_is_not_deleted(store_engine):
    from tests.utils.segments import create_rule_segment

    _create(store_engine)
    create_rule_segment(store_engine, "likely", {"prediction": "buy-30d", "level": "high"})
    with store_engine.begin() as conn, pytest.raises(Conflict) as refused:
        prediction_store.delete_model(conn, slug="buy-30d")
    assert refused.value.code == "in_use"
    assert "segment likely condition" in refused.value.message
