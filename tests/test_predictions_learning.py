"""The learner's figures and the two baselines, checked by hand and against references.

BG/NBD is checked three ways: its log-likelihood against a hand computation of the
paper's equation on a small fixed data set, its fit and P(alive) against the `lifetimes`
package on the CDNOW summary it ships (when installed), and its probability of a purchase
within a horizon against a simulation of the model's own story.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.prediction_learning import (
    BgNbdParams,
    FeatureFrame,
    bgnbd_log_likelihood,
    bgnbd_p_active,
    bgnbd_p_alive,
    brier,
    calibration_table,
    design_matrix,
    fit_bgnbd,
    fit_model,
    fit_rate_table,
    quintile_scores,
    rfm_heuristic,
    roc_auc,
)

# A small fixed data set: (repeat purchases x, time of the last t_x, age T).
SMALL = [(0, 0.0, 30.0), (1, 10.0, 30.0), (3, 25.0, 30.0), (2, 5.0, 40.0), (6, 38.0, 40.0)]
PARAMS = BgNbdParams(r=0.5, alpha=6.0, a=0.8, b=2.5)


def _hand_log_likelihood(params: BgNbdParams, x: int, t_x: float, age: float) -> float:
    """Fader, Hardie and Lee (2005), equation 6, written with Beta functions."""

    def log_beta(p: float, q: float) -> float:
        return math.lgamma(p) + math.lgamma(q) - math.lgamma(p + q)

    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    nbd = math.lgamma(r + x) - math.lgamma(r) + r * math.log(alpha)
    still = math.exp(log_beta(a, b + x) - log_beta(a, b) + nbd - (r + x) * math.log(alpha + age))
    gone = 0.0
    if x > 0:
        gone = math.exp(
            log_beta(a + 1, b + x - 1) - log_beta(a, b) + nbd - (r + x) * math.log(alpha + t_x)
        )
    return math.log(still + gone)


def _columns(rows: list[tuple[float, float, float]]) -> tuple[np.ndarray, ...]:
    data = np.array(rows, dtype=float)
    return data[:, 0], data[:, 1], data[:, 2]


def test_bgnbd_log_likelihood_is_the_papers_equation_on_a_small_fixed_set():
    x, t_x, age = _columns(SMALL)
    ours = bgnbd_log_likelihood(PARAMS, x, t_x, age)
    hand = [_hand_log_likelihood(PARAMS, int(r[0]), r[1], r[2]) for r in SMALL]
    assert ours == pytest.approx(hand, rel=1e-12)


def test_bgnbd_p_alive_by_hand_on_the_small_set():
    x, t_x, age = _columns(SMALL)
    r, alpha, a, b = PARAMS.r, PARAMS.alpha, PARAMS.a, PARAMS.b
    hand = [
        1.0
        if n == 0
        else 1.0 / (1.0 + a / (b + n - 1) * ((alpha + big_t) / (alpha + last)) ** (r + n))
        for n, last, big_t in SMALL
    ]
    assert bgnbd_p_alive(PARAMS, x, t_x, age) == pytest.approx(hand, rel=1e-12)


def test_bgnbd_fit_is_a_maximum_of_the_likelihood():
    rng = np.random.default_rng(3)
    x, t_x, age = _simulate(BgNbdParams(0.6, 8.0, 0.7, 3.0), customers=4_000, age=60.0, rng=rng)[:3]
    fitted = fit_bgnbd(x, t_x, age)
    best = bgnbd_log_likelihood(fitted, x, t_x, age).sum()
    for name in ("r", "alpha", "a", "b"):
        for factor in (0.98, 1.02):
            moved = BgNbdParams(**{**fitted.__dict__, name: getattr(fitted, name) * factor})
            assert bgnbd_log_likelihood(moved, x, t_x, age).sum() < best


def test_bgnbd_matches_lifetimes_on_the_cdnow_summary():
    lifetimes = pytest.importorskip("lifetimes")
    from lifetimes.datasets import load_cdnow_summary

    summary = load_cdnow_summary(index_col=[0])
    x = summary["frequency"].to_numpy(float)
    t_x = summary["recency"].to_numpy(float)
    age = summary["T"].to_numpy(float)
    ours = fit_bgnbd(x, t_x, age)
    theirs = lifetimes.BetaGeoFitter().fit(summary["frequency"], summary["recency"], summary["T"])
    for name in ("r", "alpha", "a", "b"):
        assert getattr(ours, name) == pytest.approx(theirs.params_[name], rel=1e-4)
    # The paper's own estimates on this data (Fader, Hardie and Lee 2005, section 5).
    assert (ours.r, ours.alpha, ours.a, ours.b) == pytest.approx(
        (0.243, 4.414, 0.793, 2.426), abs=1e-3
    )
    alive = theirs.conditional_probability_alive(
        summary["frequency"], summary["recency"], summary["T"]
    )
    assert bgnbd_p_alive(ours, x, t_x, age) == pytest.approx(np.asarray(alive), abs=1e-6)
    # A customer seen at their first purchase: the chance of another within 10 weeks.
    none_yet = theirs.probability_of_n_purchases_up_to_time(10, 0)
    zero = np.zeros(1)
    assert bgnbd_p_active(ours, zero, zero, zero, 10.0)[0] == pytest.approx(1 - none_yet, rel=1e-6)


def _simulate(
    params: BgNbdParams, *, customers: int, age: float, rng: np.random.Generator, horizon=0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BG/NBD's story: Poisson purchases at rate lambda ~ Gamma(r, alpha) after a first
    one at 0; after each repeat purchase the customer leaves with p ~ Beta(a, b). Returns
    x, t_x, age and whether a purchase came in (age, age + horizon]."""
    rate = np.maximum(rng.gamma(params.r, 1 / params.alpha, customers), 1e-12)
    leave = rng.beta(params.a, params.b, customers)
    clock = np.zeros(customers)
    x = np.zeros(customers)
    t_x = np.zeros(customers)
    later = np.zeros(customers, dtype=bool)
    going = np.ones(customers, dtype=bool)
    while going.any():
        idx = np.flatnonzero(going)
        clock[idx] += rng.exponential(1 / rate[idx])
        inside = clock[idx] <= age
        later[idx[~inside & (clock[idx] <= age + horizon)]] = True
        x[idx[inside]] += 1
        t_x[idx[inside]] = clock[idx[inside]]
        gone = inside & (rng.random(len(idx)) < leave[idx])
        going[idx[~inside | gone]] = False
    return x, t_x, np.full(customers, age), later


def test_bgnbd_probability_within_a_horizon_matches_a_simulation_of_the_model():
    params = BgNbdParams(r=0.6, alpha=8.0, a=0.7, b=3.0)
    rng = np.random.default_rng(12)
    x, t_x, age, later = _simulate(params, customers=80_000, age=40.0, horizon=20.0, rng=rng)
    predicted = bgnbd_p_active(params, x, t_x, age, 20.0)
    assert predicted.mean() == pytest.approx(later.mean(), abs=0.006)
    for low, high in ((0, 0), (1, 1), (2, 3), (4, 1_000)):
        group = (x >= low) & (x <= high)
        assert group.sum() > 1_000
        assert predicted[group].mean() == pytest.approx(later[group].mean(), abs=0.02)


def test_quintile_scores_follow_the_rfm_definition():
    # 1 + floor(5 W / N), W = how many are strictly worse; a missing value is the worst.
    assert quintile_scores(np.array([5, 1, 3, 3, np.nan]), higher_is_better=True).tolist() == [
        5,
        2,
        3,
        3,
        1,
    ]
    assert quintile_scores(np.array([10, 2, 2, np.nan]), higher_is_better=False).tolist() == [
        2,
        3,
        3,
        1,
    ]


def test_rfm_heuristic_sums_recency_frequency_and_monetary_on_a_small_fixed_set():
    frame = FeatureFrame(
        customer_ids=["a", "b", "c", "d"],
        columns=("recency_days", "frequency", "monetary"),
        values=np.array(
            [[2.0, 5.0, 100.0], [30.0, 1.0, 10.0], [np.nan, 0.0, np.nan], [2.0, 2.0, 50.0]]
        ),
    )
    # R: a, d best (2 worse than them: 3); b (1 worse: 2); c (none: 1).
    # F: a 4 worse -> 1 + 15 // 4 = 4; d 2 -> 3; b 1 -> 2; c 0 -> 1. M alike.
    assert rfm_heuristic(frame).tolist() == [3 + 4 + 4, 2 + 2 + 2, 1 + 1 + 1, 3 + 3 + 3]


def test_rate_table_shrinks_each_score_towards_the_overall_rate():
    table = fit_rate_table(np.array([3, 3, 4]), np.array([1, 0, 1]), prior_rows=20.0)
    overall = 2 / 3
    assert table.rates == pytest.approx({3: (1 + 20 * overall) / 22, 4: (1 + 20 * overall) / 21})
    assert table.apply(np.array([4, 9])).tolist() == pytest.approx(
        [(1 + 20 * overall) / 21, overall]
    )


def test_auc_brier_and_calibration_by_hand():
    outcomes = np.array([0, 0, 1, 1])
    # Positive 0.35 beats one negative of two, positive 0.8 beats both: 3 of 4 pairs.
    assert roc_auc(outcomes, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(np.array([1, 1]), np.array([0.2, 0.3])) is None
    assert brier(outcomes, np.array([0.0, 0.5, 0.5, 1.0])) == pytest.approx(0.125)
    table = calibration_table(np.array([0, 1, 1, 1]), np.array([0.05, 0.15, 0.95, 1.0]))
    assert [b.customers for b in table] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table[9].mean_predicted == pytest.approx(0.975)
    assert (table[0].observed_rate, table[1].observed_rate, table[9].observed_rate) == (0, 1, 1)
    assert table[2].mean_predicted is None


def test_a_few_rows_are_predicted_as_the_calibrated_estimator_predicts_them():
    rng = np.random.default_rng(4)
    columns = (
        "recency_days",
        "frequency",
        "ipi_mean",
        "ipi_recent",
        "target_last_horizon",
        "target_prev_horizon",
    )
    values = rng.gamma(2.0, 10.0, size=(3_000, len(columns)))
    values[rng.random(values.shape) < 0.1] = np.nan
    frame = FeatureFrame([f"c{i}" for i in range(3_000)], columns, values)
    outcomes = (rng.random(3_000) < 1 / (1 + np.nan_to_num(values[:, 0], nan=50) / 20)).astype(int)
    fitted = fit_model([frame], [outcomes])
    few = FeatureFrame(frame.customer_ids[:40], columns, values[:40])
    matrix, _ = design_matrix(few)
    assert fitted.predict(few) == pytest.approx(
        fitted.estimator.predict_proba(matrix)[:, 1], abs=1e-12
    )
    assert len(fitted.estimator.calibrated_classifiers_) == 3
