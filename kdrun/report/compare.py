"""``--baseline METHOD``: seed-matched paired differences of every method against a baseline.

Contract
--------
:func:`compare_to_baseline` pairs configurations that share a *context*: dataset, model,
protocol and the overrides other than the method's own (``method.*``). In each context every
configuration of another method is compared with each baseline configuration (the baseline
method, with any ``method.*`` overrides of its own). For every key both sides measured
(:func:`kdrun.report.runs.comparable`) the result holds a
:class:`kdrun.report.stats.PairedDifference` of method − baseline over the seeds both have; the
seeds only one side has are kept in it (``only_baseline`` / ``only_method``) for the report to
list. Configurations in a context without the baseline come back in ``unmatched``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from kdrun.report.runs import Configuration, comparable
from kdrun.report.stats import PairedDifference, paired_difference


@dataclass
class Comparison:
    baseline: Configuration
    method: Configuration
    differences: dict[str, PairedDifference] = field(default_factory=dict)

    @property
    def only_baseline(self) -> list:
        """Seeds with a baseline run and no run of the method (not in any pair)."""
        method_seeds = set(self.method.seeds)
        return [s for s in self.baseline.seeds if s not in method_seeds]

    @property
    def only_method(self) -> list:
        baseline_seeds = set(self.baseline.seeds)
        return [s for s in self.method.seeds if s not in baseline_seeds]


def split_method_overrides(overrides: str) -> tuple[str, str]:
    """(the method's own ``method.*`` overrides, the others), each space-separated."""
    items = overrides.split()
    own = [o for o in items if o.split("=", 1)[0].lstrip("~").startswith("method.")]
    return " ".join(own), " ".join(o for o in items if o not in own)


def context_of(config: Configuration) -> tuple[str, str, str, str]:
    return (
        config.dataset,
        config.model,
        split_method_overrides(config.overrides)[1],
        config.protocol,
    )


def method_label(config: Configuration) -> str:
    own = split_method_overrides(config.overrides)[0]
    return f"{config.method} {own}".strip()


def pair(baseline: Configuration, method: Configuration) -> Comparison:
    comparison = Comparison(baseline, method)
    keys = sorted(k for k in set(baseline.metrics) & set(method.metrics) if comparable(k))
    for key in keys:
        comparison.differences[key] = paired_difference(
            baseline.per_seed(key), method.per_seed(key)
        )
    return comparison


def compare_to_baseline(
    configs: list[Configuration], baseline: str
) -> tuple[list[Comparison], list[Configuration]]:
    contexts: dict[tuple, list[Configuration]] = OrderedDict()
    for config in configs:
        contexts.setdefault(context_of(config), []).append(config)
    comparisons: list[Comparison] = []
    unmatched: list[Configuration] = []
    for members in contexts.values():
        bases = [c for c in members if c.method == baseline]
        others = [c for c in members if c.method != baseline]
        if not bases:
            unmatched.extend(others)
            continue
        for other in others:
            comparisons.extend(pair(base, other) for base in bases)
    return comparisons, unmatched
