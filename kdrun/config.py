"""Config validation: every value is checked before any work starts.

Hydra already rejects unknown group options (``method=foo``) and unknown keys (struct mode). This
module checks the rest and raises :class:`~kdrun.errors.ConfigError` with one line naming the key,
the value and what is allowed:

* the core keys (``trainer.*``, ``eval.*``, ``dataset.*``, ``hardware.*``, ``optim.*``,
  ``logger.*``, ``seed``, ``resume``) against :data:`CORE_SCHEMA`;
* every node with a ``_target_`` (model, method, schedule, optimizer) against the target's
  declarations only (see :mod:`kdrun.methods.base`): unknown arguments, types from the
  constructor annotations, choices from ``Literal[...]``, bounds from the class's ``ranges``
  (:class:`~kdrun.methods.base.Range`), then the class's ``check_knobs`` hook if it has one.

:class:`ValidateBeforeRunDir` (registered in ``conf/config.yaml`` under ``hydra.callbacks``) runs
:func:`validate` before Hydra creates a single run's directory, so a rejected command leaves no
run dir behind. For a sweep of Hydra's basic sweeper (``-m``, on any launcher: local, SLURM) it
composes and validates every job of the sweep before the sweep dir exists or a job is submitted:
one bad value rejects the sweep with one line naming the job's overrides. Other sweepers (the
Optuna search) choose their values as they go; their jobs are checked when they start. The app
validates again.
"""

from __future__ import annotations

import copy
import inspect
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from kdrun.errors import ConfigError
from kdrun.methods.base import Range
from kdrun.metrics import METRIC_KEYS


@dataclass(frozen=True)
class Rule:
    """What one value may be: its type(s), bounds (closed ends unless marked open), choices, and
    whether null is allowed."""

    kind: type | tuple[type, ...]
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive unless high_open
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    low_open: bool = False
    high_open: bool = False

    @property
    def bounds(self) -> Range:
        return Range(self.low, self.high, self.low_open, self.high_open)

    def describe(self) -> str:
        """The allowed values in words: ``a number > 0``, ``one of kd, mse (or null)``."""
        if self.choices:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        else:
            name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
            kinds = list(self.kind if isinstance(self.kind, tuple) else (self.kind,))
            if int in kinds and float in kinds:
                kinds.remove(int)  # an integer is a number
            text = " or ".join(name.get(k, k.__name__) for k in kinds)
            bounds = self.bounds.describe()
            text += f" {bounds}" if bounds else ""
        return text + (" (or null)" if self.nullable else "")


INT, NUM, BOOL, STR = int, (int, float), bool, str

CORE_SCHEMA: dict[str, Rule] = {
    "seed": Rule(INT, low=0),
    "resume": Rule(STR),
    "trainer.epochs": Rule(INT, low=1),
    "trainer.batch_size": Rule(INT, low=1),
    "trainer.eval_every": Rule(INT, low=1),
    "trainer.log_every": Rule(INT, low=1),
    "trainer.limit_train_batches": Rule(INT, low=1, nullable=True),
    "trainer.limit_eval_batches": Rule(INT, low=1, nullable=True),
    "trainer.grad_clip": Rule(NUM, low=0, low_open=True, nullable=True),
    "trainer.drop_last": Rule(BOOL),
    "trainer.checkpoint_every_steps": Rule(INT, low=1, nullable=True),
    "eval.n_bins": Rule(INT, low=1, high=10_000),
    "eval.batch_size": Rule(INT, low=1),
    "eval.monitor": Rule(STR, choices=tuple(f"val/{k}" for k in METRIC_KEYS)),
    "dataset.name": Rule(STR),
    "dataset.root": Rule(STR),
    "dataset.fraction": Rule(NUM, low=0, high=1, low_open=True),
    "dataset.download": Rule(BOOL),
    "dataset.loader": Rule(STR, choices=("device", "workers")),
    "dataset.augment": Rule(STR, choices=("default", "none")),
    "dataset.subset_seed": Rule(INT, low=0, nullable=True),
    "dataset.val_fraction": Rule(NUM, low=0, high=1),
    "dataset.val_split": Rule(STR, choices=("none", "standard")),
    "hardware.device": Rule(STR),
    "hardware.amp": Rule(STR, choices=("auto", "off", "bf16", "fp16")),
    "hardware.compile": Rule(BOOL),
    "hardware.channels_last": Rule(BOOL),
    "hardware.num_workers": Rule(INT, low=0),
    "hardware.sync_bn": Rule(BOOL),
    "hardware.distributed": Rule(BOOL),
    "hardware.deterministic": Rule(BOOL),
    "optim.lr": Rule(NUM, low=0, low_open=True),
    "optim.weight_decay": Rule(NUM, low=0),
    "optim.momentum": Rule(NUM, low=0, high=1),
    "logger.backend": Rule(STR, choices=("wandb", "none")),
    "logger.mode": Rule(STR, choices=("auto", "online", "offline", "disabled")),
}


def _type_ok(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # True is an int in Python, never in a config
    return isinstance(value, kinds)


def check_value(key: str, value: Any, rule: Rule) -> None:
    """Raise :class:`ConfigError` (one line: key, value, the allowed values) if ``value`` breaks
    ``rule``."""
    if value is None:
        if rule.nullable:
            return
        raise ConfigError(f"{key}=null is not allowed: must be {rule.describe()}")
    if not _type_ok(value, rule.kind):
        raise ConfigError(f"{key}={value!r} has the wrong type: must be {rule.describe()}")
    if rule.choices is not None and value not in rule.choices:
        raise ConfigError(f"{key}={value!r} is not one of the choices: must be {rule.describe()}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value not in rule.bounds:
            raise ConfigError(f"{key}={value!r} is out of range: must be {rule.describe()}")


def _select(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, (DictConfig, Mapping)) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _annotation_rule(annotation: Any, default: Any) -> Rule | None:
    """A Rule from a parameter annotation (None when it cannot be checked simply)."""
    if isinstance(annotation, str):
        return None
    nullable = default is None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = nullable or len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            kinds = tuple(a for a in args if a in (int, float, bool, str))
            return Rule(kinds, nullable=nullable) if len(kinds) == len(args) else None
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        kinds = tuple(dict.fromkeys(type(c) for c in choices))
        return Rule(kinds, choices=choices, nullable=nullable)
    if annotation is float:
        return Rule(NUM, nullable=nullable)
    if annotation in (int, bool, str):
        return Rule(annotation, nullable=nullable)
    return None


def _parameters(obj: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]] | None:
    """``(parameters, type hints)`` of a class's constructor or a function (None: unreadable)."""
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except (TypeError, ValueError, NameError):
        return None
    return {n: p for n, p in sig.parameters.items() if n != "self"}, hints


def knob_rules(obj: Any, runtime_args: tuple[str, ...] = ()) -> dict[str, Rule | None]:
    """The declared :class:`Rule` of every configurable argument of ``obj`` (a class or a
    function): the annotation's type, null and ``Literal`` choices, merged with the bounds in
    ``obj.ranges``; ``None`` for an argument whose annotation cannot be checked simply."""
    found = _parameters(obj)
    if found is None:
        return {}
    params, hints = found
    ranges = getattr(obj, "ranges", {}) or {}
    rules: dict[str, Rule | None] = {}
    for name, param in params.items():
        if name in runtime_args or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        rule = _annotation_rule(hints.get(name, param.annotation), param.default)
        if name in ranges:
            bounds = Range.of(ranges[name])
            rule = Rule(
                rule.kind if rule is not None else NUM,
                low=bounds.low,
                high=bounds.high,
                nullable=rule.nullable if rule is not None else False,
                low_open=bounds.low_open,
                high_open=bounds.high_open,
            )
        rules[name] = rule
    return rules


def check_target_node(path: str, node: DictConfig, runtime_args: tuple[str, ...] = ()) -> None:
    """Check a ``_target_`` node's keys against the target's declarations (:func:`knob_rules`),
    then the target's ``check_knobs(knobs)`` hook with every argument's value (config or
    default)."""
    target = node.get("_target_")
    try:
        obj = get_object(target)
    except Exception:
        raise ConfigError(f"{path}._target_={target!r} cannot be imported") from None
    found = _parameters(obj)
    if found is None:
        return
    params = found[0]
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    rules = knob_rules(obj, runtime_args)
    values = OmegaConf.to_container(node, resolve=True)
    for key in node:
        if str(key).startswith("_") or key in runtime_args:
            continue
        full = f"{path}.{key}"
        if key not in rules:
            if open_kwargs:
                continue
            allowed = ", ".join(rules)
            raise ConfigError(f"{full} is not an option of {target}; allowed: {allowed}")
        rule, value = rules[key], values[key]
        if rule is not None and not isinstance(value, (list, dict)):
            check_value(full, value, rule)
    check_knobs = getattr(obj, "check_knobs", None)
    if callable(check_knobs):
        knobs = {n: p.default for n, p in params.items() if n in rules and p.default is not p.empty}
        knobs.update((k, v) for k, v in values.items() if not str(k).startswith("_"))
        check_knobs(knobs)


RUNTIME_ARGS = {
    "model": ("num_classes", "in_channels", "image_size"),
    "method": ("num_classes", "num_samples"),
    "optim": ("params",),
    "schedule": (),
}


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid value in ``cfg``."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:
        raise ConfigError(f"config does not resolve: {str(exc).splitlines()[0]}") from None
    for key, rule in CORE_SCHEMA.items():
        present, value = _select(cfg, key)
        if present:
            check_value(key, value, rule)
    for group, runtime in RUNTIME_ARGS.items():
        node = cfg.get(group)
        if isinstance(node, DictConfig) and "_target_" in node:
            check_target_node(group, node, runtime)
    resume = cfg.get("resume", "auto")
    if resume not in ("auto", "never") and not str(resume).endswith((".ckpt", ".pt", ".pth")):
        raise ConfigError(f"resume={resume!r} must be auto, never or a checkpoint path (*.ckpt)")
    tags = cfg.get("tags", [])
    if not isinstance(tags, (ListConfig, list)):
        raise ConfigError(f"tags={tags!r} must be a list, e.g. tags=[baseline,v2]")


class ValidateBeforeRunDir(Callback):
    """Hydra callback: validates a single run's config before Hydra creates its run dir (and
    writes ``.hydra/``), so a rejected command exits with status 2 and one ``kdrun: error:``
    line, leaving nothing behind."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate_composed(config)
        except ConfigError as err:
            print(f"kdrun: error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            return
        for number, overrides in enumerate(basic_sweep_overrides(config)):
            try:
                validate_composed(compose_sweep_job(config, overrides))
            except (ConfigError, HydraException) as err:
                shown = " ".join(overrides) or "no overrides"
                print(
                    f"kdrun: error: sweep job {number} ({shown}): {one_line(err)}", file=sys.stderr
                )
                sys.exit(2)


def basic_sweep_overrides(config: DictConfig) -> list[list[str]]:
    """The overrides of every job Hydra's basic sweeper would launch for the multirun
    ``config`` (its ``hydra.sweeper.params``, then the command line's overrides)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(config.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def compose_sweep_job(config: DictConfig, overrides: list[str]) -> DictConfig:
    """One job's config, composed as the basic sweeper composes it (nothing is written)."""
    from hydra.core.global_hydra import GlobalHydra

    return GlobalHydra.instance().config_loader().load_sweep_config(config, overrides)


def one_line(err: Exception) -> str:
    """An error's message on one line (Hydra's span several: the message, then indented detail
    such as the available options, then the search path and a debugging hint, left out)."""
    kept = []
    for line in (line.strip() for line in str(err).splitlines()):
        if line.startswith(("Config search path", "Set the environment variable HYDRA")):
            break
        if line and not line.startswith(("full_key:", "object_type=")):
            kept.append(line)
    return " ".join(kept)


def validate_composed(config: DictConfig) -> None:
    """:func:`validate` on a config with its ``hydra`` node, before the run starts: the run dir it
    would get stands in for ``hydra.runtime.output_dir`` (nothing is created)."""
    full = copy.deepcopy(config)
    with read_write(full), open_dict(full):
        run_dir = OmegaConf.select(full, "hydra.run.dir", default=None)
        full.hydra.runtime.output_dir = os.path.abspath(str(run_dir or "."))
    instance = HydraConfig.instance()
    previous = instance.cfg
    instance.set_config(full)
    try:
        task = copy.deepcopy(full)
        with read_write(task), open_dict(task):
            del task["hydra"]
        validate(task)
    finally:
        instance.cfg = previous
