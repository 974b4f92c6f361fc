"""Comparing two conversion rates: pure functions, no I/O (personalisation analytics now,
journey experiments later).

An arm is `viewers` customers of whom `conversions` converted. The treatment is compared
with its control by:

- **lift** `(p_t - p_c) / p_c`, the relative change of the conversion rate;
- a **95% confidence interval for the lift** by the delta method on the log of the rate
  ratio (Katz's interval): `log(p_t / p_c) +- z * sqrt(1/x_t - 1/n_t + 1/x_c - 1/n_c)`,
  mapped back with `exp(.) - 1`. The log scale keeps the interval inside (-1, inf), as a
  lift is, and is what statsmodels' `confint_proportions_2indep(compare="ratio",
  method="log")` computes. It needs a conversion in each arm;
- a **two-proportion z-test**, two-sided, with the pooled rate under the null (as
  statsmodels' `proportions_ztest`);
- `significant`: p < 0.05 **and** the interval excludes a lift of 0 (the two agree
  except near the edge, where both must say so) **and** neither arm is too small to read
  (below): a p-value from one control viewer is not one to act on;
- an **always-valid interval** for the lift from the mixture sequential probability ratio
  test (mSPRT, Johari, Pekelis and Walsh, "Always valid inference", 2017, the basis of
  Optimizely's Stats Engine) with a normal mixture over the same log ratio: with the
  estimate `d`, its variance `V` (as above) and the mixing variance `tau2`, the
  `1 - alpha` interval is `d +- sqrt(V (V + tau2) / tau2 * (2 log(1/alpha) + log((V +
  tau2) / V)))`. It may be read after every new viewer, as often as one likes, and still
  covers the true lift with probability `1 - alpha` over the whole experiment: looking
  every day does not inflate false positives, where the fixed interval, read daily and
  acted on the first time it excludes 0, would. `tau2 = 0.01` (a standard deviation of
  0.1 on the log scale): the interval is tightest for true lifts of about +-10 to 20%,
  the size personalisation usually moves conversion by.
- a **warning** when either arm is too small to read: fewer than 100 viewers or fewer
  than 5 conversions (the normal approximations above need both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
MIXING_VARIANCE = 0.01
"""tau^2 of the mSPRT's normal mixture, on the log rate ratio."""
MIN_VIEWERS = 100
MIN_CONVERSIONS = 5

_NORMAL = NormalDist()


@dataclass(frozen=True)
class Arm:
    """One group: how many customers viewed, and how many of them converted."""

    viewers: int
    conversions: int

    def __post_init__(self) -> None:
        if self.viewers < 0 or not 0 <= self.conversions <= self.viewers:
            raise ValueError(f"need 0 <= conversions <= viewers, got {self}")

    @property
    def rate(self) -> float | None:
        """The conversion rate, or None without viewers."""
        return self.conversions / self.viewers if self.viewers else None


Interval = tuple[float, float]


@dataclass(frozen=True)
class Comparison:
    """A treatment against its control: every figure is None when it cannot be computed
    from these counts (no viewers, no conversion in the control, ...)."""

    lift: float | None
    lift_ci: Interval | None
    p_value: float | None
    significant: bool
    always_valid_ci: Interval | None
    warning: str | None


def lift(treatment: Arm, control: Arm) -> float | None:
    """(p_t - p_c) / p_c, or None when the control's rate is 0 or unknown."""
    p_t, p_c = treatment.rate, control.rate
    if p_t is None or p_c is None or p_c == 0:
        return None
    return (p_t - p_c) / p_c


def _log_ratio(treatment: Arm, control: Arm) -> tuple[float, float] | None:
    """log(p_t / p_c) and its delta-method variance; None without a conversion in each arm."""
    if treatment.conversions == 0 or control.conversions == 0:
        return None
    estimate = math.log(treatment.conversions / treatment.viewers) - math.log(
        control.conversions / control.viewers
    )
    variance = (
        1 / treatment.conversions
        - 1 / treatment.viewers
        + 1 / control.conversions
        - 1 / control.viewers
    )
    return estimate, variance


def _as_lift(low: float, high: float) -> Interval:
    return math.expm1(low), math.expm1(high)


def lift_interval(
    treatment: Arm, control: Arm, *, confidence: float = CONFIDENCE
) -> Interval | None:
    """The delta-method (log ratio) interval for the lift, or None without a conversion
    in each arm."""
    found = _log_ratio(treatment, control)
    if found is None:
        return None
    estimate, variance = found
    half = _NORMAL.inv_cdf(0.5 + confidence / 2) * math.sqrt(max(variance, 0.0))
    return _as_lift(estimate - half, estimate + half)


def two_proportion_p_value(treatment: Arm, control: Arm) -> float | None:
    """Two-sided p-value of the pooled two-proportion z-test; None without viewers in
    either arm. Both arms at 0% (or both at 100%) show no difference: 1.0."""
    if treatment.viewers == 0 or control.viewers == 0:
        return None
    pooled = (treatment.conversions + control.conversions) / (treatment.viewers + control.viewers)
    if pooled in (0.0, 1.0):
        return 1.0
    standard_error = math.sqrt(
        pooled * (1 - pooled) * (1 / treatment.viewers + 1 / control.viewers)
    )
    z = (treatment.conversions / treatment.viewers - control.conversions / control.viewers) / (
        standard_error
    )
    return min(1.0, 2 * _NORMAL.cdf(-abs(z)))


def always_valid_interval(
    treatment: Arm,
    control: Arm,
    *,
    alpha: float = SIGNIFICANCE,
    mixing_variance: float = MIXING_VARIANCE,
) -> Interval | None:
    """The mSPRT (normal mixture) always-valid `1 - alpha` interval for the lift; None
    without a conversion in each arm."""
    found = _log_ratio(treatment, control)
    if found is None:
        return None
    estimate, variance = found
    if variance <= 0:  # every viewer of both arms converted: the ratio is known exactly
        return _as_lift(estimate, estimate)
    half = math.sqrt(
        variance
        * (variance + mixing_variance)
        / mixing_variance
        * (2 * math.log(1 / alpha) + math.log((variance + mixing_variance) / variance))
    )
    return _as_lift(estimate - half, estimate + half)


def small_sample_warning(
    treatment: Arm,
    control: Arm,
    *,
    min_viewers: int = MIN_VIEWERS,
    min_conversions: int = MIN_CONVERSIONS,
) -> str | None:
    """Why these arms are too small to read, or None."""
    problems = []
    for name, arm in (("treatment", treatment), ("control", control)):
        if arm.viewers < min_viewers:
            problems.append(f"{name} has {arm.viewers} viewers (fewer than {min_viewers})")
        elif arm.conversions < min_conversions:
            problems.append(
                f"{name} has {arm.conversions} conversions (fewer than {min_conversions})"
            )
    if not problems:
        return None
    return "too small to read: " + "; ".join(problems)


def _excludes_zero(interval: Interval | None) -> bool:
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def compare(
    treatment: Arm,
    control: Arm,
    *,
    confidence: float = CONFIDENCE,
    mixing_variance: float = MIXING_VARIANCE,
) -> Comparison:
    """Every figure of a treatment against its control (see the module docstring)."""
    interval = lift_interval(treatment, control, confidence=confidence)
    p_value = two_proportion_p_value(treatment, control)
    warning = small_sample_warning(treatment, control)
    return Comparison(
        lift=lift(treatment, control),
        lift_ci=interval,
        p_value=p_value,
        significant=(
            warning is None
            and p_value is not None
            and p_value < 1 - confidence
            and _excludes_zero(interval)
        ),
        always_valid_ci=always_valid_interval(
            treatment, control, alpha=1 - confidence, mixing_variance=mixing_variance
        ),
        warning=warning,
    )
