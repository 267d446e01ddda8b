"""The statistics behind the verdicts: intervals against SciPy, the verdict rules on cases
whose answer is known (a null effect, a NaN, a tie, a clear effect), and every error."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from graddyn.experiments._stats import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NOT_TESTED,
    Estimate,
    absence_verdict,
    all_of,
    effect_verdict,
    mean_ci,
    paired_diff,
    sign_flip_test,
    slopes,
    t_quantile,
    welch_diff,
)


def test_t_interval_matches_scipy():
    v = np.array([0.31, 0.36, 0.40, 0.29])
    lo, hi = sps.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=sps.sem(v))
    est = mean_ci(v)
    assert est.n == 4 and math.isclose(est.lo, lo) and math.isclose(est.hi, hi)
    assert math.isclose(t_quantile(3), 4.302652729911275)


def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    v = np.random.default_rng(0).normal(1.0, 0.1, size=30)
    a, b = mean_ci(v, method="bootstrap"), mean_ci(v, method="bootstrap")
    assert a == b and a.lo < v.mean() < a.hi and a.method == "bootstrap"
    t = mean_ci(v)
    assert abs(a.half_width - t.half_width) < 0.3 * t.half_width  # agree for 30 values
    assert "[" in a.format() and "±" in t.format()


@pytest.mark.parametrize("values", [[1.0, float("nan"), 2.0], [1.0, float("inf")], [0.5], []])
def test_missing_or_single_values_give_no_interval(values):
    est = mean_ci(values)
    assert not est.defined
    assert effect_verdict(est) == INCONCLUSIVE
    assert absence_verdict(est, margin=0.1) == INCONCLUSIVE


def test_nan_mean_is_not_hidden():
    assert math.isnan(mean_ci([1.0, float("nan")]).mean)
    assert mean_ci([0.5]).format() == "0.500 (n=1)" and mean_ci([float("nan")]).format() == "n/a"


def test_effect_rule_on_known_cases():
    clear = mean_ci([0.30, 0.35, 0.40])
    assert effect_verdict(clear, +1) == HOLDS
    assert effect_verdict(clear, -1) == FAILS  # significantly the other way
    null = mean_ci([0.02, -0.03, 0.01])
    assert effect_verdict(null, +1) == INCONCLUSIVE  # no margin: a null cannot fail
    assert effect_verdict(null, +1, margin=0.2) == FAILS  # every effect >= 0.2 excluded
    tie = mean_ci([0.0, 0.0, 0.0])  # exactly no effect on every seed
    assert effect_verdict(tie, +1) == FAILS and effect_verdict(tie, -1) == FAILS


def test_absence_rule_on_known_cases():
    assert absence_verdict(mean_ci([0.01, -0.01, 0.0]), 0.1) == HOLDS
    assert absence_verdict(mean_ci([0.3, -0.3, 0.0]), 0.1) == INCONCLUSIVE  # wide: no proof
    assert absence_verdict(mean_ci([0.5, 0.6, 0.55]), 0.1) == FAILS
    assert absence_verdict(mean_ci([-0.5, -0.6, -0.55]), 0.1) == FAILS


def test_all_of():
    assert all_of([HOLDS, HOLDS]) == HOLDS
    assert all_of([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert all_of([HOLDS, FAILS, INCONCLUSIVE]) == FAILS
    assert all_of([NOT_TESTED, HOLDS]) == HOLDS and all_of([]) == NOT_TESTED


def test_paired_and_welch_differences():
    a, b = [1.0, 2.0, 3.0], [0.9, 1.8, 2.95]
    assert math.isclose(paired_diff(a, b).mean, np.mean(np.subtract(a, b)))
    assert paired_diff(a, b).half_width < welch_diff(a, b).half_width  # pairing removes spread
    res = sps.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(0.95)
    w = welch_diff(a, b)
    assert math.isclose(w.lo, ci.low) and math.isclose(w.hi, ci.high)
    same = welch_diff([1.0, 1.0], [0.0, 0.0])
    assert same.lo == same.hi == 1.0
    assert not welch_diff([1.0, float("nan")], [0.0, 1.0]).defined


def test_slopes_per_seed():
    x = np.log2([1, 2, 4, 8])
    y = np.array([[0.0, 0.1, 0.2, 0.3], [1.0, 1.0, 1.0, 1.0], [0.0, 0.1, np.nan, 0.3]])
    s = slopes(x, y)
    assert np.allclose(s[:2], [0.1, 0.0]) and np.isnan(s[2])


def test_sign_flip_test():
    assert sign_flip_test([1.0, 2.0, 3.0]) == 0.25  # 3 seeds can never reach 5 %
    assert sign_flip_test(np.arange(1.0, 9.0)) == 2 / 256
    assert sign_flip_test([1.0, -1.0]) == 1.0
    assert math.isnan(sign_flip_test([1.0, float("nan")]))
    p = sign_flip_test(np.ones(20), n_resamples=2000)
    assert p < 0.01


@pytest.mark.parametrize(("call", "match"), [
    (lambda: mean_ci([1.0, 2.0], method="jackknife"), "'t' or 'bootstrap'"),
    (lambda: mean_ci([1.0, 2.0], level=95), "level must be in"),
    (lambda: mean_ci(np.ones((2, 2))), "one value per seed"),
    (lambda: t_quantile(1), "at least 2 values"),
    (lambda: paired_diff([1.0, 2.0], [1.0]), "one per seed on each side"),
    (lambda: slopes([1, 1], np.ones((2, 2))), "at least 2 distinct"),
    (lambda: effect_verdict(Estimate(0, 0, 0, 2), direction=0), "direction must be"),
    (lambda: effect_verdict(Estimate(0, 0, 0, 2), margin=-1), "margin must be >= 0"),
    (lambda: absence_verdict(Estimate(0, 0, 0, 2), margin=0), "margin > 0"),
    (lambda: all_of(["maybe"]), "unknown verdict words"),
])
def test_errors_name_the_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()
