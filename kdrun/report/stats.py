"""Statistics over seeds for ``kdrun-report``: per-configuration intervals and paired differences.

Contract
--------
``summarize(values) -> SeedSummary`` for the values of one metric over the n seeds of one
configuration:

* mean ``x̄ = Σ xᵢ / n``; sample standard deviation ``s = sqrt(Σ (xᵢ − x̄)² / (n − 1))``;
* 95 % t-interval of the mean: ``x̄ ± t₀.₉₇₅,ₙ₋₁ · s / √n``, with ``t₀.₉₇₅,ₙ₋₁`` the 0.975
  quantile of Student's t with n − 1 degrees of freedom (the interval
  ``scipy.stats.t.interval(0.95, n - 1, loc=x̄, scale=s / √n)`` gives).

``paired_difference(baseline, method) -> PairedDifference`` for one metric, each side a mapping
seed -> value. Only seeds both sides have are paired (seed-matched); the others are returned in
``only_baseline`` / ``only_method`` so that callers report them. With ``dᵢ = methodᵢ − baselineᵢ``
over the n paired seeds:

* mean difference ``d̄``, its standard deviation ``s_d`` (ddof = 1) and the 95 % t-interval
  ``d̄ ± t₀.₉₇₅,ₙ₋₁ · s_d / √n``;
* paired t-test: ``t = d̄ / (s_d / √n)`` with n − 1 degrees of freedom and the two-sided
  p-value ``p = 2 · P(T > |t|)`` (the numbers ``scipy.stats.ttest_rel(method, baseline)``
  gives). When all differences are equal (``s_d = 0``), ``t`` is ±inf with p = 0 if ``d̄ ≠ 0``
  and undefined (NaN) if ``d̄ = 0``, as in scipy.

Undefined quantities (std, interval and test with fewer than 2 values) are NaN, never 0.
Means and standard deviations are computed with :mod:`statistics` (``fmean``, ``stdev``);
the t distribution comes from :mod:`scipy.stats`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from scipy.stats import t as student_t

CONFIDENCE = 0.95
NAN = float("nan")


@dataclass(frozen=True)
class SeedSummary:
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class PairedDifference:
    seeds: tuple  # the paired seeds, in seed order
    only_baseline: tuple  # seeds the baseline has and the method lacks
    only_method: tuple  # seeds the method has and the baseline lacks
    baseline_mean: float  # over the paired seeds
    method_mean: float
    mean: float  # mean of method - baseline
    std: float
    ci_low: float
    ci_high: float
    t: float
    df: int
    p: float

    @property
    def n(self) -> int:
        return len(self.seeds)


def seed_order(seed: Hashable) -> tuple:
    """Sort key: integer seeds numerically, anything else after them as text."""
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def t_quantile(df: int) -> float:
    return float(student_t.ppf(0.5 + CONFIDENCE / 2, df))


def t_interval(mean: float, std: float, n: int) -> tuple[float, float]:
    if n < 2 or not math.isfinite(std):
        return NAN, NAN
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def summarize(values: Iterable[float]) -> SeedSummary:
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summarize needs at least one value")
    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if len(xs) > 1 else NAN
    low, high = t_interval(mean, std, len(xs))
    return SeedSummary(len(xs), mean, std, low, high)


def paired_t(differences: list[float]) -> tuple[float, float]:
    """(t, two-sided p) of the one-sample t-test of the differences against 0."""
    n = len(differences)
    if n < 2:
        return NAN, NAN
    mean = statistics.fmean(differences)
    std = statistics.stdev(differences)
    if std == 0.0:
        return (NAN, NAN) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (std / math.sqrt(n))
    return t, float(2.0 * student_t.sf(abs(t), n - 1))


def paired_difference(
    baseline: Mapping[Hashable, float], method: Mapping[Hashable, float]
) -> PairedDifference:
    seeds = tuple(sorted(set(baseline) & set(method), key=seed_order))
    only_baseline = tuple(sorted(set(baseline) - set(method), key=seed_order))
    only_method = tuple(sorted(set(method) - set(baseline), key=seed_order))
    diffs = [float(method[s]) - float(baseline[s]) for s in seeds]
    if not diffs:
        return PairedDifference(
            (), only_baseline, only_method, NAN, NAN, NAN, NAN, NAN, NAN, NAN, 0, NAN
        )
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else NAN
    low, high = t_interval(mean, std, len(diffs))
    t, p = paired_t(diffs)
    return PairedDifference(
        seeds=seeds,
        only_baseline=only_baseline,
        only_method=only_method,
        baseline_mean=statistics.fmean(float(baseline[s]) for s in seeds),
        method_mean=statistics.fmean(float(method[s]) for s in seeds),
        mean=mean,
        std=std,
        ci_low=low,
        ci_high=high,
        t=t,
        df=len(diffs) - 1,
        p=p,
    )
