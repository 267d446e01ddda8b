"""Statistics over seeds behind every generated verdict: a mean with its 95 % interval, the
interval of a paired or two-sample difference, per-seed slopes, an exact sign-flip
permutation test, and the three-way verdict rules. Pure functions of arrays.

The rules (``RULE`` states them in each verdict file):

* **effect** (a directional prediction, "x is larger with more noise"): it *holds* when the
  95 % interval of the effect excludes 0 on the predicted side; it *fails* when the interval
  excludes every effect of at least ``margin`` in the predicted direction (margin 0: the
  interval lies wholly on the other side); otherwise it is *inconclusive*.
* **absence** ("confusion does not grow with depth"): it *holds* when the interval lies
  inside ``(-margin, margin)``, so every meaningful effect is excluded; it *fails* when the
  interval lies wholly beyond the margin on one side; otherwise *inconclusive*.
* a prediction made of parts (``all_of``) holds when every part holds, fails when any part
  fails, else is inconclusive.
* a NaN or infinite value, or fewer than 2 seeds, gives no interval: *inconclusive*.

Intervals are Student-t intervals over seeds (``n - 1`` degrees of freedom) by default; a
percentile bootstrap is available (``method="bootstrap"``) for many seeds, where it is
sound. With 3 seeds t_{0.975, 2} = 4.30: the half-width is 2.5 standard deviations, so only
effects several times the seed-to-seed spread hold. An exact sign-flip test cannot reject at
the 5 % level with fewer than 6 seeds (its smallest p-value is 2 / 2^n), which is why the
verdicts use intervals.

>>> est = mean_ci([0.30, 0.35, 0.40])
>>> round(est.mean, 3), round(est.half_width, 3)
(0.35, 0.124)
>>> effect_verdict(est, direction=+1)
'holds'
>>> absence_verdict(mean_ci([0.01, -0.02, 0.0]), margin=0.1)
'holds'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps

LEVEL = 0.95
HOLDS, FAILS, INCONCLUSIVE, NOT_TESTED = "holds", "fails", "inconclusive", "n/a"
WORDS = (HOLDS, FAILS, INCONCLUSIVE, NOT_TESTED)

RULE = (
    "Numbers are mean ± half-width of the 95 % Student-t interval over seeds (n - 1 degrees "
    "of freedom; n = number of seeds). A predicted effect *holds* when its interval excludes "
    "0 on the predicted side, *fails* when its interval excludes every effect of at least the "
    "stated margin in the predicted direction, else is *inconclusive*. A predicted absence "
    "*holds* when its interval lies inside ±margin, *fails* when it lies wholly beyond the "
    "margin, else is *inconclusive*. A prediction of several parts holds when all hold and "
    "fails when any fails. NaN, infinite values or fewer than 2 seeds: inconclusive."
)


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` seeds and its interval ``[lo, hi]`` at ``level``."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = LEVEL
    method: str = "t"

    @property
    def half_width(self) -> float:
        """Half the interval's width (NaN without an interval)."""
        return (self.hi - self.lo) / 2

    @property
    def defined(self) -> bool:
        """True when the interval exists (finite ends)."""
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """``"0.350 ± 0.124"`` (t) or ``"0.350 [0.31, 0.39]"`` (bootstrap); ``"0.350 (n=1)"``
        without an interval; values multiplied by ``scale`` (100 for percent)."""
        m = self.mean * scale
        if not math.isfinite(m):
            return "n/a" if math.isnan(m) else f"{m:.{digits}g}"
        if not self.defined:
            return f"{m:.{digits}f} (n={self.n})"
        if self.method == "t":
            return f"{m:.{digits}f} ± {self.half_width * scale:.{digits}f}"
        return f"{m:.{digits}f} [{self.lo * scale:.{digits}f}, {self.hi * scale:.{digits}f}]"

    def __str__(self) -> str:
        return self.format()


def _clean(values: Iterable[float]) -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, float)
    if arr.ndim != 1:
        raise ValueError(f"expected one value per seed (a 1-D sequence), got shape {arr.shape}")
    return arr


def t_quantile(n: int, level: float = LEVEL) -> float:
    """The two-sided Student-t quantile for ``n`` values (``n - 1`` degrees of freedom).

    >>> round(t_quantile(3), 3)
    4.303
    """
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    return float(_sps.t.ppf(0.5 + level / 2, n - 1))


def mean_ci(values: Iterable[float], level: float = LEVEL, method: str = "t",
            n_boot: int = 10_000, seed: int = 0) -> Estimate:
    """Mean of ``values`` (one per seed) with its ``level`` interval: Student t
    (``mean ± t_{n-1} s / sqrt n``) or the percentile bootstrap of the mean (``n_boot``
    resamples, seeded). Any NaN or infinite value, or fewer than 2 values, gives NaN ends
    (no interval), and a NaN gives a NaN mean: missing evidence is never support.

    >>> mean_ci([1.0, float("nan"), 2.0]).defined
    False
    """
    if method not in ("t", "bootstrap"):
        raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}")
    v = _clean(values)
    n = len(v)
    mean = float(np.mean(v)) if n else float("nan")
    if n < 2 or not np.isfinite(v).all():
        return Estimate(mean, float("nan"), float("nan"), n, level, method)
    if method == "t":
        half = t_quantile(n, level) * float(np.std(v, ddof=1)) / math.sqrt(n)
        return Estimate(mean, mean - half, mean + half, n, level, method)
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(boots, [0.5 - level / 2, 0.5 + level / 2])
    return Estimate(mean, float(lo), float(hi), n, level, method)


def paired_diff(a: Sequence[float], b: Sequence[float], level: float = LEVEL,
                method: str = "t") -> Estimate:
    """Interval of mean(a - b) for values paired by seed (same data, init and order).

    >>> paired_diff([1.0, 2.0, 3.0], [0.5, 1.4, 2.6]).mean
    0.5
    """
    a_, b_ = _clean(a), _clean(b)
    if len(a_) != len(b_):
        raise ValueError(f"paired values need one per seed on each side, got {len(a_)} and "
                         f"{len(b_)}; use welch_diff for unpaired groups")
    return mean_ci(a_ - b_, level, method)


def welch_diff(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Estimate:
    """Welch's interval of mean(a) - mean(b) for unpaired groups (unequal variances,
    Welch-Satterthwaite degrees of freedom). ``n`` is the smaller group's size.

    >>> round(welch_diff([1.0, 1.1, 0.9], [0.0, 0.2, -0.2]).mean, 6)
    1.0
    """
    a_, b_ = _clean(a), _clean(b)
    n = min(len(a_), len(b_))
    diff = float(np.mean(a_) - np.mean(b_)) if n else float("nan")
    if n < 2 or not (np.isfinite(a_).all() and np.isfinite(b_).all()):
        return Estimate(diff, float("nan"), float("nan"), n, level)
    va, vb = np.var(a_, ddof=1) / len(a_), np.var(b_, ddof=1) / len(b_)
    se = math.sqrt(va + vb)
    if se == 0:
        return Estimate(diff, diff, diff, n, level)
    dof = (va + vb) ** 2 / (va**2 / (len(a_) - 1) + vb**2 / (len(b_) - 1))
    half = float(_sps.t.ppf(0.5 + level / 2, dof)) * se
    return Estimate(diff, diff - half, diff + half, n, level)


def slopes(x: Sequence[float], y: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of ``y`` (S, K) against ``x`` (K,) -> (S,): one trend
    per seed, whose mean and interval say whether the trend is more than seed noise. A row
    with a NaN gives a NaN slope.

    >>> slopes([0, 1, 2], np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])).tolist()
    [1.0, 0.0]
    """
    x_ = _clean(x)
    y_ = np.atleast_2d(np.asarray(y, float))
    if y_.shape[1] != len(x_) or len(x_) < 2 or np.ptp(x_) == 0:
        raise ValueError(f"slopes need y of shape (seeds, {len(x_)}) and at least 2 distinct "
                         f"x values; got x {x_.tolist()} and y {y_.shape}")
    xc = x_ - x_.mean()
    return (y_ - y_.mean(axis=1, keepdims=True)) @ xc / float(xc @ xc)


def sign_flip_test(diffs: Sequence[float], n_resamples: int = 100_000, seed: int = 0
                   ) -> float:
    """Two-sided p-value of "mean of ``diffs`` is 0" by flipping signs: exact over all 2^n
    flips for n <= 16, else ``n_resamples`` random flips. NaN when a value is not finite.

    >>> sign_flip_test([1.0, 2.0, 3.0])  # the smallest p-value 3 seeds can give
    0.25
    """
    d = _clean(diffs)
    n = len(d)
    if n == 0 or not np.isfinite(d).all():
        return float("nan")
    observed = abs(d.mean())
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)  # (2^n, n) of +-1
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_resamples, n))
    means = np.abs(signs @ d) / n
    return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))


def effect_verdict(est: Estimate, direction: int = 1, margin: float = 0.0) -> str:
    """The effect rule (module docstring): ``direction`` +1 predicts a positive effect, -1 a
    negative one; ``margin`` >= 0 is the smallest effect that counts as the prediction.

    >>> effect_verdict(Estimate(-0.3, -0.5, -0.1, 3), direction=+1)
    'fails'
    >>> effect_verdict(Estimate(0.02, -0.01, 0.05, 3), direction=+1, margin=0.1)
    'fails'
    >>> effect_verdict(Estimate(0.02, -0.01, 0.15, 3), direction=+1, margin=0.1)
    'inconclusive'
    """
    if direction not in (-1, 1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not est.defined:
        return INCONCLUSIVE
    lo, hi = (est.lo, est.hi) if direction == 1 else (-est.hi, -est.lo)
    if lo > 0:
        return HOLDS
    if hi < margin or (margin == 0 and hi <= 0):
        return FAILS
    return INCONCLUSIVE


def absence_verdict(est: Estimate, margin: float) -> str:
    """The absence rule (module docstring): holds when the interval lies inside
    ``(-margin, margin)``.

    >>> absence_verdict(Estimate(0.0, -0.2, 0.2, 3), margin=0.1)
    'inconclusive'
    >>> absence_verdict(Estimate(0.5, 0.3, 0.7, 3), margin=0.1)
    'fails'
    """
    if not margin > 0:
        raise ValueError(f"an absence needs a margin > 0 (the smallest effect that matters), "
                         f"got {margin}")
    if not est.defined:
        return INCONCLUSIVE
    if -margin < est.lo and est.hi < margin:
        return HOLDS
    if est.lo >= margin or est.hi <= -margin:
        return FAILS
    return INCONCLUSIVE


def all_of(words: Iterable[str]) -> str:
    """Combine the verdicts of a prediction's parts: holds if all hold, fails if any fails,
    inconclusive otherwise; ``n/a`` for no parts.

    >>> all_of(["holds", "inconclusive"]), all_of(["holds", "fails"]), all_of([])
    ('inconclusive', 'fails', 'n/a')
    """
    ws = list(words)
    bad = [w for w in ws if w not in WORDS]
    if bad:
        raise ValueError(f"unknown verdict words {bad}; valid: {', '.join(WORDS)}")
    ws = [w for w in ws if w != NOT_TESTED]
    if not ws:
        return NOT_TESTED
    if FAILS in ws:
        return FAILS
    return HOLDS if all(w == HOLDS for w in ws) else INCONCLUSIVE
