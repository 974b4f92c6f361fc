"""core.statistics: lift, its interval and the z-test against a hand computation (and
scipy / statsmodels when installed), and the always-valid interval's coverage when it is
read after every batch of viewers, beside the fixed interval read the same way."""

from __future__ import annotations

import math
import random

import pytest

from core.statistics import (
    MIXING_VARIANCE,
    Arm,
    always_valid_interval,
    compare,
    lift,
    lift_interval,
    small_sample_warning,
    two_proportion_p_value,
)

Z_975 = 1.959963984540054  # the 97.5% normal quantile, to 16 digits

# Fixed numbers: 200 of 1,000 treated customers converted, 150 of 1,000 held out.
TREATMENT = Arm(viewers=1_000, conversions=200)
CONTROL = Arm(viewers=1_000, conversions=150)


def _hand_p_value(x1: int, n1: int, x2: int, n2: int) -> float:
    # Written out apart from the module: erfc instead of NormalDist.
    pooled = (x1 + x2) / (n1 + n2)
    z = (x1 / n1 - x2 / n2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return math.erfc(abs(z) / math.sqrt(2))


def test_lift_is_the_relative_change_of_the_rate() -> None:
    assert lift(TREATMENT, CONTROL) == pytest.approx((0.2 - 0.15) / 0.15)
    assert lift(Arm(100, 5), Arm(100, 10)) == pytest.approx(-0.5)
    assert lift(Arm(100, 5), Arm(100, 0)) is None
    assert lift(Arm(0, 0), CONTROL) is None


def test_lift_interval_by_hand() -> None:
    # log(0.2 / 0.15) +- 1.96 * sqrt(1/200 - 1/1000 + 1/150 - 1/1000), then exp(.) - 1
    log_ratio = math.log(0.2 / 0.15)
    standard_error = math.sqrt(1 / 200 - 1 / 1000 + 1 / 150 - 1 / 1000)
    expected = (
        math.exp(log_ratio - Z_975 * standard_error) - 1,
        math.exp(log_ratio + Z_975 * standard_error) - 1,
    )
    low, high = lift_interval(TREATMENT, CONTROL)
    assert (low, high) == pytest.approx(expected, rel=1e-12)
    # and the numbers themselves, worked on paper: 0.0996 .. 0.6167
    assert low == pytest.approx(0.09964, abs=5e-5)
    assert high == pytest.approx(0.61669, abs=5e-5)


def test_p_value_by_hand() -> None:
    # pooled 0.175; se = sqrt(0.175 * 0.825 * 2/1000) = 0.016993; z = 0.05 / se = 2.9424
    assert two_proportion_p_value(TREATMENT, CONTROL) == pytest.approx(
        _hand_p_value(200, 1000, 150, 1000), rel=1e-9
    )
    assert two_proportion_p_value(TREATMENT, CONTROL) == pytest.approx(0.003258, abs=2e-6)
    # symmetric, 1 for equal rates, and for arms that never (or always) convert
    assert two_proportion_p_value(CONTROL, TREATMENT) == pytest.approx(
        two_proportion_p_value(TREATMENT, CONTROL)
    )
    assert two_proportion_p_value(Arm(500, 50), Arm(800, 80)) == pytest.approx(1.0)
    assert two_proportion_p_value(Arm(500, 0), Arm(800, 0)) == 1.0
    assert two_proportion_p_value(Arm(0, 0), CONTROL) is None


@pytest.mark.parametrize(
    ("treatment", "control"),
    [
        (Arm(1_000, 200), Arm(1_000, 150)),
        (Arm(4_321, 321), Arm(480, 30)),
        (Arm(250, 9), Arm(260, 14)),
        (Arm(20_000, 1_100), Arm(2_000, 98)),
    ],
)
def test_against_a_hand_computation_on_fixed_numbers(treatment: Arm, control: Arm) -> None:
    x1, n1, x2, n2 = treatment.conversions, treatment.viewers, control.conversions, control.viewers
    assert two_proportion_p_value(treatment, control) == pytest.approx(
        _hand_p_value(x1, n1, x2, n2), rel=1e-9
    )
    ratio = (x1 / n1) / (x2 / n2)
    half = Z_975 * math.sqrt(1 / x1 - 1 / n1 + 1 / x2 - 1 / n2)
    assert lift_interval(treatment, control) == pytest.approx(
        (ratio * math.exp(-half) - 1, ratio * math.exp(half) - 1), rel=1e-9
    )


@pytest.mark.parametrize(
    ("treatment", "control"),
    [
        (Arm(1_000, 200), Arm(1_000, 150)),
        (Arm(4_321, 321), Arm(480, 30)),
        (Arm(250, 9), Arm(260, 14)),
    ],
)
def test_against_statsmodels(treatment: Arm, control: Arm) -> None:
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    counts = [treatment.conversions, control.conversions]
    viewers = [treatment.viewers, control.viewers]
    _, p_value = proportion.proportions_ztest(counts, viewers)
    assert two_proportion_p_value(treatment, control) == pytest.approx(p_value, rel=1e-9)
    low, high = proportion.confint_proportions_2indep(
        treatment.conversions,
        treatment.viewers,
        control.conversions,
        control.viewers,
        method="log",
        compare="ratio",
    )
    assert lift_interval(treatment, control) == pytest.approx((low - 1, high - 1), rel=1e-9)


def test_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    pooled = 350 / 2000
    z = 0.05 / math.sqrt(pooled * (1 - pooled) * 2 / 1000)
    assert two_proportion_p_value(TREATMENT, CONTROL) == pytest.approx(
        2 * stats.norm.sf(z), rel=1e-9
    )
    half = stats.norm.ppf(0.975) * math.sqrt(1 / 200 - 1 / 1000 + 1 / 150 - 1 / 1000)
    expected = (
        math.exp(math.log(0.2 / 0.15) - half) - 1,
        math.exp(math.log(0.2 / 0.15) + half) - 1,
    )
    assert lift_interval(TREATMENT, CONTROL) == pytest.approx(expected, rel=1e-9)


def test_significance_needs_the_test_and_the_interval() -> None:
    assert compare(TREATMENT, CONTROL).significant
    no_difference = compare(Arm(1_000, 150), Arm(1_000, 150))
    assert not no_difference.significant
    assert no_difference.lift == 0
    small = compare(Arm(120, 14), Arm(110, 10))
    assert small.p_value is not None and small.p_value > 0.05 and not small.significant


def test_a_warning_when_a_group_is_too_small() -> None:
    assert small_sample_warning(TREATMENT, CONTROL) is None
    assert "control has 40 viewers" in (small_sample_warning(TREATMENT, Arm(40, 10)) or "")
    assert "treatment has 3 conversions" in (small_sample_warning(Arm(500, 3), CONTROL) or "")
    without = compare(Arm(100, 0), Arm(100, 7))
    assert without.lift == -1.0
    assert without.lift_ci is None and without.always_valid_ci is None
    assert without.warning and not without.significant


def test_a_group_too_small_to_read_is_never_significant() -> None:
    # One control viewer who converted: the z-test says p < 0.05, the interval excludes
    # 0, and still nobody should act on it.
    tiny = compare(Arm(24, 4), Arm(1, 1))
    assert tiny.p_value is not None and tiny.p_value < 0.05
    assert tiny.lift_ci is not None and tiny.lift_ci[1] < 0
    assert tiny.warning and not tiny.significant


def test_the_always_valid_interval_by_hand_and_wider_than_the_fixed_one() -> None:
    # d +- sqrt(V (V + t2) / t2 * (2 log 20 + log((V + t2) / V)))
    d = math.log(0.2 / 0.15)
    v = 1 / 200 - 1 / 1000 + 1 / 150 - 1 / 1000
    t2 = MIXING_VARIANCE
    half = math.sqrt(v * (v + t2) / t2 * (2 * math.log(20) + math.log((v + t2) / v)))
    low, high = always_valid_interval(TREATMENT, CONTROL)
    assert (low, high) == pytest.approx((math.exp(d - half) - 1, math.exp(d + half) - 1))
    fixed_low, fixed_high = lift_interval(TREATMENT, CONTROL)
    assert low < fixed_low < lift(TREATMENT, CONTROL) < fixed_high < high


def _peeking_misses(
    *,
    experiments: int,
    looks: int,
    per_look: int,
    control_rate: float,
    true_lift: float,
    seed: int,
) -> tuple[float, float, float]:
    """Share of experiments in which the always-valid and the fixed 95% interval, read
    after every `per_look` viewers per arm, ever exclude the true lift; and the share in
    which the always-valid interval excludes a lift of 0 at the last look."""
    rng = random.Random(seed)
    treatment_rate = control_rate * (1 + true_lift)
    sequential_misses = fixed_misses = detected = 0
    for _ in range(experiments):
        x_t = x_c = n = 0
        missed_sequential = missed_fixed = False
        for _ in range(looks):
            x_t += sum(rng.random() < treatment_rate for _ in range(per_look))
            x_c += sum(rng.random() < control_rate for _ in range(per_look))
            n += per_look
            treatment, control = Arm(n, x_t), Arm(n, x_c)
            for interval, which in (
                (always_valid_interval(treatment, control), "sequential"),
                (lift_interval(treatment, control), "fixed"),
            ):
                if interval is not None and not interval[0] <= true_lift <= interval[1]:
                    if which == "sequential":
                        missed_sequential = True
                    else:
                        missed_fixed = True
        sequential_misses += missed_sequential
        fixed_misses += missed_fixed
        final = always_valid_interval(treatment, control)
        detected += final is not None and (final[0] > 0 or final[1] < 0)
    return sequential_misses / experiments, fixed_misses / experiments, detected / experiments


def test_the_sequential_interval_keeps_its_coverage_when_read_after_every_look() -> None:
    # 300 experiments, each read 25 times (every 100 viewers per arm, up to 2,500).
    sequential, fixed, _ = _peeking_misses(
        experiments=300, looks=25, per_look=100, control_rate=0.1, true_lift=0.2, seed=15
    )
    # At most 5% may ever miss; 0.05 + 2.33 standard errors of 300 experiments.
    assert sequential <= 0.05 + 2.33 * math.sqrt(0.05 * 0.95 / 300)
    # The fixed interval read as often misses far more often: the test can tell.
    assert fixed > 0.10


def test_the_sequential_interval_still_finds_a_real_lift() -> None:
    # Not vacuous: with 10,000 viewers per arm a +20% lift on 10% is told from 0 mostly.
    sequential, _, detected = _peeking_misses(
        experiments=60, looks=10, per_look=1_000, control_rate=0.1, true_lift=0.2, seed=7
    )
    assert sequential <= 0.1
    assert detected > 0.6


@pytest.mark.slow
@pytest.mark.parametrize(
    ("control_rate", "true_lift"), [(0.1, 0.0), (0.1, 0.2), (0.03, -0.15), (0.3, 0.05)]
)
def test_the_sequential_interval_coverage_at_length(control_rate: float, true_lift: float) -> None:
    sequential, fixed, _ = _peeking_misses(
        experiments=2_000,
        looks=50,
        per_look=200,
        control_rate=control_rate,
        true_lift=true_lift,
        seed=1_515,
    )
    assert sequential <= 0.05 + 2.33 * math.sqrt(0.05 * 0.95 / 2_000)
    assert fixed > sequential
