r"""Uncertainty of a comparison: confidence intervals, differences to a baseline, verdicts.

Every interval is Student-t based (``scipy.stats.t``), which is exact for normally distributed
run-to-run noise and the usual choice for the handful of seeds a training study can afford
(bootstrap intervals are unreliable below about ten samples):

* :func:`mean_interval`: :math:`\bar x \pm t_{1-\alpha/2,\,n-1}\, s/\sqrt n`.
* :func:`difference_interval`: the mean difference of a method to a baseline. When the two
  share at least two seeds (the protocol's seeds ``random_seed + i``) the difference is taken
  seed by seed on the shared seeds, which removes the noise the two share (the data order, the
  initialisation) — a *paired* t interval on the per-seed differences; a seed only one side ran
  (a study in progress, a run left out) is not in it. Otherwise it is Welch's interval for two
  independent samples, with the Welch–Satterthwaite degrees of freedom. The result says which
  one was used and over how many seeds.
* :func:`verdict`: ``better`` when the whole interval of (method − baseline) lies above 0,
  ``worse`` when it lies below, else ``not distinguishable`` at that level. With one seed there
  is no interval and the verdict is ``one seed``. When every seed gives the same difference
  (runs that do not depend on their seed) the interval is the point itself, and a nonzero point is
  a verdict: the difference is then deterministic, not noise.
* :func:`sample_std`: the sample standard deviation of a table's cell, NaN when a value is not
  finite (where :func:`statistics.stdev` raises).

Every value must be finite (a ``ValueError`` otherwise): a diverged run's Δm has no place in a
mean, and the caller decides what to show instead (:func:`mtopt.report.comparison.compare` leaves
such seeds out of a row and says so under the table). Higher is better for every quantity here
(Δm is built so).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

__all__ = [
    "Difference",
    "Interval",
    "difference_interval",
    "mean_interval",
    "rank_correlation",
    "sample_std",
    "verdict",
]


@dataclass(frozen=True)
class Interval:
    """A mean with its sample standard deviation, sample size and two-sided confidence interval
    (``lo``/``hi`` are NaN with fewer than two samples)."""

    mean: float
    std: float
    n: int
    lo: float
    hi: float
    level: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


@dataclass(frozen=True)
class Difference(Interval):
    """A difference (method − baseline) and how its interval was computed: ``paired`` (per-seed
    differences on the shared seeds; ``std`` is their sample standard deviation, ``n`` the
    number of shared seeds) or
    ``welch`` (independent samples; ``std`` is the standard error of the difference, ``n`` the
    smaller sample; with one run on either side there is no interval, and with no spread on
    either side the interval is the point itself)."""

    kind: str = "paired"


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The t interval of the mean of ``values``."""
    _check_level(level)
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    _check_finite(values)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, 0.0, 1, math.nan, math.nan, level)
    std = statistics.stdev(values)
    half = _t(level, n - 1) * std / math.sqrt(n)
    return Interval(mean, std, n, mean - half, mean + half, level)


def difference_interval(
    method: Mapping[int, float], baseline: Mapping[int, float], level: float = 0.95
) -> Difference:
    """The interval of mean(method) − mean(baseline); both map seed → value (module doc)."""
    _check_level(level)
    if not method or not baseline:
        raise ValueError("a difference needs values on both sides")
    _check_finite(list(method.values()) + list(baseline.values()))
    shared = sorted(set(method) & set(baseline))
    if len(shared) >= 2:
        diffs = [method[s] - baseline[s] for s in shared]
        one = mean_interval(diffs, level)
        return Difference(one.mean, one.std, one.n, one.lo, one.hi, level, "paired")
    a, b = list(method.values()), list(baseline.values())
    mean = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(mean, math.nan, min(len(a), len(b)), math.nan, math.nan, level, "welch")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Difference(mean, 0.0, min(len(a), len(b)), mean, mean, level, "welch")
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = _t(level, dof) * se
    return Difference(mean, se, min(len(a), len(b)), mean - half, mean + half, level, "welch")


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n − 1) of ``values``; 0 for fewer than two, NaN when
    one is not finite (a diverged run's metric in a table cell)."""
    values = list(values)
    if len(values) < 2:
        return 0.0
    if not all(math.isfinite(v) for v in values):
        return math.nan
    return statistics.stdev(values)


def verdict(diff: Interval) -> str:
    """``better``, ``worse``, ``not distinguishable`` (at the interval's level), or ``one seed``
    when there is no interval."""
    if math.isnan(diff.lo) or math.isnan(diff.hi):
        return "one seed"
    if diff.lo > 0:
        return "better"
    if diff.hi < 0:
        return "worse"
    return "not distinguishable"


def rank_correlation(ours: Mapping[str, float], theirs: Mapping[str, float]) -> tuple[float, int]:
    """Spearman's rank correlation between two scorings of the methods both contain (ties get
    the average rank) and how many methods that is; NaN with fewer than three."""
    common = sorted(set(ours) & set(theirs))
    if len(common) < 3:
        return math.nan, len(common)
    rho = _scipy_stats.spearmanr([ours[m] for m in common], [theirs[m] for m in common])[0]
    return float(rho), len(common)


def _t(level: float, dof: float) -> float:
    return float(_scipy_stats.t.ppf(0.5 + level / 2, dof))


def _check_finite(values: Sequence[float]) -> None:
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"an interval needs finite values, got {bad[0]} among {len(values)}")


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
