"""The learner of predictive models, its two baselines and the validation figures.

Pure computation on arrays (numpy, scikit-learn, scipy); the store reads the features.

**Learner.** scikit-learn's `HistGradientBoostingClassifier`, calibrated by isotonic
regression over three shuffled folds (`CalibratedClassifierCV`). Chosen over logistic
regression because the features are counts and day spans whose effect is neither linear
nor monotone in log-odds (the chance of a purchase first rises with the days since the
last one, up to the customer's usual interval, then falls), and because many are missing
by nature (no purchase yet, a single purchase has no interval): boosted trees take NaN as
a value of its own and need no scaling or hand-made bins. It fits a million rows in
seconds per core. Boosting's raw probabilities drift at the extremes; the isotonic step
maps them onto observed rates on rows the trees did not see.

**Baselines.** The *RFM heuristic* ranks customers by R + F + M, each the quintile score
of the product's RFM (1 + floor(5 W / N), W = customers strictly worse), and turns each
sum into the rate of that sum on the training rows. *BG/NBD* (Fader, Hardie and Lee
2005) is fitted by maximum likelihood to each customer's repeat days of the target
event, the time of the last one and their age (days since the first), and gives the
probability of at least one target event within the horizon:
P(alive) * (1 - ((alpha + T) / (alpha + T + horizon)) ** (r + x)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from core.predictions import CalibrationBin

LEARNER = "HistGradientBoostingClassifier (scikit-learn), isotonic calibration on out-of-fold predictions (3 shuffled folds)"
MAX_TRAINING_ROWS = 250_000
"""Past this, a stratified sample of the training rows is fitted: a training fits the
trees eight times (two models, each three folds and a refit), and more rows bought no
accuracy on 30-odd features."""
BGNBD_MAX_CUSTOMERS = 50_000
"""BG/NBD's four parameters are fitted on at most this many customers (a seeded sample)."""
FEW_ROWS = 100
"""Up to this many rows (real-time rescoring), `FittedModel` predicts by the short path."""
PARALLEL_ROWS = 100_000
"""Below this many rows the trees fit and predict on one thread: OpenMP's threads spin
while they wait, and on a busy machine a small fit took 100 times longer on two."""
CALIBRATION_BINS = 10
_EPS = 1e-12


@dataclass(frozen=True)
class FeatureFrame:
    """Features of customers as of one cutoff: one row per customer, NaN where missing."""

    customer_ids: list[str]
    columns: tuple[str, ...]
    values: np.ndarray

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.columns.index(name)]

    def __len__(self) -> int:
        return len(self.customer_ids)


def _ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = top / bottom
    out[~np.isfinite(out)] = np.nan
    return out


DERIVED = ("avg_value", "ipi_trend", "overdue", "target_trend")


def design_matrix(frame: FeatureFrame) -> tuple[np.ndarray, list[str]]:
    """The learner's input: the frame's columns and ratios trees cannot form themselves
    (spend per purchase, the recent interval over the usual one, days since the last
    purchase over the usual interval, the target's last horizon against the one before)."""
    names = list(frame.columns)
    extra: list[np.ndarray] = []
    if "monetary" in frame.columns:
        extra.append(_ratio(frame.column("monetary"), frame.column("frequency")))
        names.append("avg_value")
    extra.append(_ratio(frame.column("ipi_recent"), frame.column("ipi_mean")))
    extra.append(_ratio(frame.column("recency_days"), frame.column("ipi_mean")))
    extra.append(frame.column("target_last_horizon") - frame.column("target_prev_horizon"))
    names += ["ipi_trend", "overdue", "target_trend"]
    return np.column_stack([frame.values, *extra]), names


@lru_cache(maxsize=1)
def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def _threads_for(rows: int) -> Iterator[None]:
    if rows >= PARALLEL_ROWS:
        yield
        return
    with _controller().limit(limits=1, user_api="openmp"):
        yield


@dataclass
class FittedModel:
    """A calibrated estimator of P(the customer does the target within the horizon)."""

    feature_names: list[str]
    estimator: Any

    def predict(self, frame: FeatureFrame) -> np.ndarray:
        if not len(frame):
            return np.zeros(0)
        matrix, names = design_matrix(frame)
        if names != self.feature_names:
            raise ValueError("the features read are not those the model was trained on")
        with _threads_for(len(frame)):
            if len(frame) > FEW_ROWS:
                return np.clip(self.estimator.predict_proba(matrix)[:, 1], 0.0, 1.0)
            return np.clip(self._few(matrix), 0.0, 1.0)

    def _few(self, matrix: np.ndarray) -> np.ndarray:
        """`predict_proba` of the calibrated estimator, for a few rows without its
        per-call checks (label encoding, response detection): what each of its
        (forest, calibrator) pairs gives, averaged, as it does. A test holds the two
        equal; real-time rescoring of one customer spent most of its time in the checks."""
        pairs = self.estimator.calibrated_classifiers_
        total = np.zeros(len(matrix))
        for pair in pairs:
            total += pair.calibrators[0].predict(pair.estimator.decision_function(matrix))
        return total / len(pairs)


def _sample(rows: int, labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most `limit` rows, keeping the share of positives."""
    if rows <= limit:
        return np.arange(rows)
    rng = np.random.default_rng(seed)
    picked = []
    for value in (0, 1):
        where = np.flatnonzero(labels == value)
        take = round(limit * len(where) / rows)
        picked.append(rng.choice(where, size=take, replace=False))
    return np.sort(np.concatenate(picked))


def fit_model(
    frames: Sequence[FeatureFrame], labels: Sequence[np.ndarray], *, seed: int = 0
) -> FittedModel:
    """Fit the calibrated learner on the stacked rows of `frames` (labels 1 = did the
    target within the horizon after that frame's cutoff)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold

    matrices = [design_matrix(frame) for frame in frames]
    names = matrices[0][1]
    matrix = np.vstack([m for m, _ in matrices])
    y = np.concatenate(labels).astype(int)
    keep = _sample(len(y), y, MAX_TRAINING_ROWS, seed)
    matrix, y = matrix[keep], y[keep]
    positives = int(y.sum())
    if positives < 3 or len(y) - positives < 3:
        raise ValueError(
            f"the training rows hold {positives} customers who did the target and"
            f" {len(y) - positives} who did not; each needs at least 3"
        )
    trees = HistGradientBoostingClassifier(
        learning_rate=0.1,
        max_iter=200,
        max_leaf_nodes=15,
        min_samples_leaf=min(100, max(5, len(y) // 200)),
        l2_regularization=1.0,
        early_stopping=len(y) >= 2_000,
        validation_fraction=0.15,
        n_iter_no_change=20,
        random_state=seed,
    )
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
    # Isotonic needs data: with few rows per fold a sigmoid is the steadier map.
    method = "isotonic" if min(positives, len(y) - positives) >= 300 else "sigmoid"
    # Three (forest, calibrator) pairs, each forest fitted on two folds and calibrated on
    # the third, their probabilities averaged. On CDNOW this ranked and calibrated better
    # than one forest refitted on everything (ensemble=False): AUC 0.807 against 0.805.
    estimator = CalibratedClassifierCV(trees, method=method, cv=folds)
    with _threads_for(len(y)):
        estimator.fit(matrix, y)
    return FittedModel(feature_names=names, estimator=estimator)


# --- figures ------------------------------------------------------------------------------


def roc_auc(outcomes: np.ndarray, scores: np.ndarray) -> float | None:
    """The probability that a random positive outranks a random negative (ties half);
    None when only one outcome occurs."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(outcomes)) < 2:
        return None
    return float(roc_auc_score(outcomes, scores))


def brier(outcomes: np.ndarray, probabilities: np.ndarray) -> float:
    return float(np.mean((probabilities - outcomes) ** 2)) if len(outcomes) else 0.0


def calibration_table(
    outcomes: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS
) -> list[CalibrationBin]:
    """Equal-width bins of the predicted probability: customers, mean prediction and the
    rate observed in each (the last bin includes 1)."""
    index = np.minimum((probabilities * bins).astype(int), bins - 1)
    table = []
    for i in range(bins):
        inside = index == i
        count = int(inside.sum())
        table.append(
            CalibrationBin(
                lower=i / bins,
                upper=(i + 1) / bins,
                customers=count,
                mean_predicted=float(probabilities[inside].mean()) if count else None,
                observed_rate=float(outcomes[inside].mean()) if count else None,
            )
        )
    return table


# --- the RFM heuristic ----------------------------------------------------------------------


def quintile_scores(values: np.ndarray, *, higher_is_better: bool) -> np.ndarray:
    """1 + floor(5 W / N) with W the customers strictly worse (NaN counts worst)."""
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=int)
    worst = -np.inf if higher_is_better else np.inf
    filled = np.where(np.isnan(values), worst, values)
    ordered = np.sort(filled)
    if higher_is_better:
        worse = np.searchsorted(ordered, filled, side="left")
    else:
        worse = n - np.searchsorted(ordered, filled, side="right")
    return 1 + (5 * worse) // n


def rfm_heuristic(frame: FeatureFrame) -> np.ndarray:
    """R + F + M (3 to 15) of every customer of the frame, ranked among themselves."""
    r = quintile_scores(frame.column("recency_days"), higher_is_better=False)
    f = quintile_scores(np.nan_to_num(frame.column("frequency")), higher_is_better=True)
    if "monetary" in frame.columns:
        m = quintile_scores(np.nan_to_num(frame.column("monetary")), higher_is_better=True)
    else:
        m = f
    return r + f + m


@dataclass(frozen=True)
class RateTable:
    """The observed rate of each score on training rows, shrunk towards the overall rate
    by 20 rows' worth of prior, so a score few customers have gets no extreme rate."""

    rates: dict[int, float]
    overall: float

    def apply(self, scores: np.ndarray) -> np.ndarray:
        return np.array([self.rates.get(int(s), self.overall) for s in scores], dtype=float)


def fit_rate_table(scores: np.ndarray, outcomes: np.ndarray, prior_rows: float = 20.0) -> RateTable:
    overall = float(outcomes.mean()) if len(outcomes) else 0.0
    rates = {}
    for value in np.unique(scores):
        inside = scores == value
        rates[int(value)] = float(
            (outcomes[inside].sum() + prior_rows * overall) / (inside.sum() + prior_rows)
        )
    return RateTable(rates=rates, overall=overall)


# --- BG/NBD ----------------------------------------------------------------------------------


def bgnbd_inputs(frame: FeatureFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(who did the target, their repeat days x, day of the last t_x, age in days) from
    the target's own history: x counts distinct days after the first, as the model's
    authors count CDNOW."""
    seen = frame.column("target_count") > 0
    x = frame.column("target_days")[seen] - 1
    age = frame.column("target_tenure_days")[seen]
    t_x = age - frame.column("target_recency_days")[seen]
    return seen, x, t_x, age


@dataclass(frozen=True)
class BgNbdParams:
    r: float
    alpha: float
    a: float
    b: float


def bgnbd_log_likelihood(
    params: BgNbdParams, x: np.ndarray, t_x: np.ndarray, age: np.ndarray
) -> np.ndarray:
    """Each customer's log-likelihood (Fader, Hardie and Lee 2005, equation 6): `x`
    repeat purchases, the last at `t_x`, observed for `age` since the first."""
    from scipy.special import gammaln

    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    # The optimiser may try parameters where a term is infinite: the point is rejected.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
        a2 = gammaln(a + b) + gammaln(b + x) - gammaln(b) - gammaln(a + b + x)
        a3 = -(r + x) * np.log(alpha + age)
        repeat = x > 0
        a4 = np.full_like(a3, -np.inf)
        a4[repeat] = (
            np.log(a) - np.log(b + x[repeat] - 1) - (r + x[repeat]) * np.log(alpha + t_x[repeat])
        )
        return a1 + a2 + np.logaddexp(a3, a4)


def fit_bgnbd(x: np.ndarray, t_x: np.ndarray, age: np.ndarray) -> BgNbdParams:
    """Maximum-likelihood BG/NBD parameters (Nelder-Mead on their logarithms), from at
    most `BGNBD_MAX_CUSTOMERS` customers (a seeded sample: four parameters need no more).
    Times are scaled so the oldest customer is 10 units old while fitting, as the
    `lifetimes` package does, which keeps the optimiser in a well-conditioned region."""
    from scipy.optimize import minimize

    if len(x) == 0:
        raise ValueError("BG/NBD needs at least one customer")
    if len(x) > BGNBD_MAX_CUSTOMERS:
        keep = np.random.default_rng(0).choice(len(x), BGNBD_MAX_CUSTOMERS, replace=False)
        x, t_x, age = x[keep], t_x[keep], age[keep]
    scale = 10.0 / max(float(np.max(age)), _EPS)
    rows = np.column_stack([x, t_x * scale, age * scale])
    unique, weights = np.unique(rows, axis=0, return_counts=True)
    ux, ut, uage = unique[:, 0], unique[:, 1], unique[:, 2]

    def negative(log_params: np.ndarray) -> float:
        params = BgNbdParams(*np.exp(log_params))
        value = -float(np.dot(weights, bgnbd_log_likelihood(params, ux, ut, uage)))
        return value if math.isfinite(value) else 1e300

    best = minimize(
        negative,
        x0=np.zeros(4),
        method="Nelder-Mead",
        options={"maxiter": 4_000, "xatol": 1e-7, "fatol": 1e-9},
    )
    r, alpha, a, b = np.exp(best.x)
    return BgNbdParams(r=float(r), alpha=float(alpha / scale), a=float(a), b=float(b))


def bgnbd_p_alive(
    params: BgNbdParams, x: np.ndarray, t_x: np.ndarray, age: np.ndarray
) -> np.ndarray:
    """P(still active at `age`): 1 for a customer with no repeat purchase."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    repeat = x > 0
    log_odds = np.full(len(x), -np.inf)
    log_odds[repeat] = (
        np.log(a)
        - np.log(b + x[repeat] - 1)
        + (r + x[repeat]) * (np.log(alpha + age[repeat]) - np.log(alpha + t_x[repeat]))
    )
    return 1.0 / (1.0 + np.exp(log_odds))


def bgnbd_p_active(
    params: BgNbdParams, x: np.ndarray, t_x: np.ndarray, age: np.ndarray, horizon: float
) -> np.ndarray:
    """P(at least one purchase in the `horizon` after `age`). A customer drops out only
    right after a purchase, so one who is alive makes none in the horizon with the
    Poisson chance integrated over the posterior Gamma(r + x, alpha + age)."""
    r, alpha = params.r, params.alpha
    none_if_alive = np.exp((r + x) * (np.log(alpha + age) - np.log(alpha + age + horizon)))
    return bgnbd_p_alive(params, x, t_x, age) * (1.0 - none_if_alive)
