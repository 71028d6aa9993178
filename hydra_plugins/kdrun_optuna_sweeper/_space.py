"""The search space: Hydra sweep overrides -> Optuna distributions.

The syntax is the one of Hydra's Optuna sweeper, parsed by Hydra's own override parser, so its
users' ``hydra.sweeper.params`` carry over unchanged:

==============================  ==============================================================
``interval(0.1, 0.9)``          ``FloatDistribution(0.1, 0.9)``; ``int(interval(1, 8))`` is
                                an ``IntDistribution`` (Hydra's interval is always float)
``tag(log, interval(1e-4, 1))`` the same on a log scale
``choice(a, b, 3)``             ``CategoricalDistribution`` (``range(...)`` with ``shuffle``
                                too)
``range(1, 9, 2)``              ``IntDistribution(1, 9, step=2)``: 1, 3, ..., 9 — as in the
                                Optuna sweeper, the stop is included (Optuna's ``high``); a
                                float range is a stepped ``FloatDistribution``
a plain value                   fixed: passed to every trial as it is
==============================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from kdrun.errors import ConfigError


def _choices(override: Override) -> CategoricalDistribution:
    choices = list(override.sweep_iterator(transformer=Transformer.encode))
    for choice in choices:
        if not isinstance(choice, (str, int, float, bool, type(None))):
            raise ConfigError(
                f"hydra.sweeper.params.{override.get_key_element()}: a choice must be a str, "
                f"int, float, bool or null, not {choice!r}"
            )
    return CategoricalDistribution(choices)


def _range(override: Override, value: RangeSweep) -> BaseDistribution:
    if value.shuffle:
        return _choices(override)
    start, stop, step = value.start, value.stop, value.step
    if any(isinstance(v, float) for v in (start, stop, step)):
        return FloatDistribution(float(start), float(stop), step=float(step))
    return IntDistribution(int(start), int(stop), step=int(step))


def distribution(override: Override) -> BaseDistribution | None:
    """The Optuna distribution of a sweep override (None for a plain, fixed value)."""
    if not override.is_sweep_override():
        return None
    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return _choices(override)
    if isinstance(value, RangeSweep):
        return _range(override, value)
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ConfigError(f"{key}: {override.input_line} is no search space Optuna can sample")


def parse_search_space(
    params: Mapping[str, Any], arguments: Iterable[str]
) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """``(distributions, fixed)`` from ``hydra.sweeper.params`` and the command's overrides.

    Later entries win (the command line over the config); a plain value on the command line
    for a searched key fixes it, ``~key`` takes it out of the space (e.g. a knob the chosen
    method lacks). ``fixed`` maps override keys (``+x``, ``~x`` keep their prefix) to the
    override as written, passed to every trial."""
    lines = [f"{key}={_as_override_value(value)}" for key, value in params.items()]
    lines += list(arguments)
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        if override.is_delete() and override.key_or_group in distributions:
            del distributions[override.key_or_group]  # `~key`: searched no more, left as is
            continue
        dist = distribution(override)
        if dist is None:
            distributions.pop(key, None)
            fixed[key] = override.input_line
        else:
            fixed.pop(key, None)
            distributions[key] = dist
    return distributions, fixed


def _as_override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def format_value(value: Any) -> str:
    """A sampled value as a Hydra override value (choices are already encoded strings)."""
    if isinstance(value, float):
        return repr(value)
    return _as_override_value(value)
