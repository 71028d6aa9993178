"""Config validation: every value is checked before any work starts.

Hydra already rejects unknown group options (``method=foo``) and unknown keys (struct mode). This
module checks the rest and raises :class:`~kdrun.errors.ConfigError` with one line naming the key,
the value and what is allowed:

* the core keys (``trainer.*``, ``eval.*``, ``dataset.*``, ``hardware.*``, ``optim.*``,
  ``logger.*``, ``seed``, ``resume``) against :data:`CORE_SCHEMA`;
* every node with a ``_target_`` (model, method, schedule, optimizer) against the target's
  signature: unknown arguments, wrong types (from the annotations) and the class's ``ranges``.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdrun.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    kind: type | tuple[type, ...]
    low: float | None = None  # inclusive unless low_open
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    low_open: bool = False

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        text = " or ".join(name.get(k, k.__name__) for k in kinds)
        if self.low is not None and self.high is not None:
            text += f" in {'(' if self.low_open else '['}{self.low}, {self.high}]"
        elif self.low is not None:
            text += f" {'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            text += f" <= {self.high}"
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
    "dataset.name": Rule(STR),
    "dataset.root": Rule(STR),
    "dataset.fraction": Rule(NUM, low=0, high=1, low_open=True),
    "dataset.download": Rule(BOOL),
    "dataset.loader": Rule(STR, choices=("device", "workers")),
    "dataset.augment": Rule(STR, choices=("default", "none")),
    "dataset.subset_seed": Rule(INT, low=0, nullable=True),
    "dataset.val_fraction": Rule(NUM, low=0, high=1),
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
    if value is None:
        if rule.nullable:
            return
        raise ConfigError(f"{key} must be {rule.describe()}, got null")
    if not _type_ok(value, rule.kind):
        raise ConfigError(f"{key}={value!r} has the wrong type: must be {rule.describe()}")
    if rule.choices is not None and value not in rule.choices:
        raise ConfigError(f"{key}={value!r} is not allowed: must be {rule.describe()}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low_bad = rule.low is not None and (
            value <= rule.low if rule.low_open else value < rule.low
        )
        high_bad = rule.high is not None and value > rule.high
        if low_bad or high_bad:
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
        return Rule(object, choices=typing.get_args(annotation), nullable=nullable)
    if annotation is float:
        return Rule(NUM, nullable=nullable)
    if annotation in (int, bool, str):
        return Rule(annotation, nullable=nullable)
    return None


def check_target_node(path: str, node: DictConfig, runtime_args: tuple[str, ...] = ()) -> None:
    """Check a ``_target_`` node's keys against the target's signature and ``ranges``."""
    target = node.get("_target_")
    try:
        obj = get_object(target)
    except Exception:
        raise ConfigError(f"{path}._target_={target!r} cannot be imported") from None
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except (TypeError, ValueError, NameError):
        return
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    ranges = getattr(obj, "ranges", {}) or {}
    for key in node:
        if str(key).startswith("_") or key in runtime_args:
            continue
        full = f"{path}.{key}"
        if key not in params:
            if open_kwargs:
                continue
            allowed = ", ".join(n for n in params if n not in runtime_args and n not in ("args",))
            raise ConfigError(f"{full} is not an option of {target}; allowed: {allowed}")
        value = OmegaConf.to_container(node, resolve=True)[key]
        rule = _annotation_rule(hints.get(key, params[key].annotation), params[key].default)
        if rule is not None and not isinstance(value, (list, dict)):
            check_value(full, value, rule)
        if key in ranges and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = ranges[key]
            check_value(full, value, Rule(NUM, low=low, high=high))


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
