"""Finished runs for ``kdrun-report``: finding, reading, protocol labelling and grouping.

Contract
--------
* :func:`find_runs` — every directory holding a ``summary.json`` below the given paths (a run
  dir, a multirun dir, ``outputs/``), W&B folders excluded, in path order (numbers in paths
  compared as numbers), without duplicates.
* :func:`read_run` — one run: its ``summary.json``, ``.hydra/overrides.yaml``, the ``status`` of
  ``run.json`` (None without one) and the evaluation protocol; None when ``summary.json`` is not
  readable JSON.
* Protocols (:data:`PROTOCOLS`), decided from the summary:

  - ``"val_select"`` — a ``val/*`` or ``test_at_best/*`` key exists: per-epoch evaluation on a
    validation split, a model selected on it (``eval.monitor`` of ``.hydra/config.yaml``), the
    test set evaluated once at the end (``test/*`` last model, ``test_at_best/*`` selected one);
  - ``"validation"`` — ``"eval_split": "validation"`` without such keys (runs written before the
    test set was evaluated at the end): every ``test/*`` figure of the summary is on the held-out
    validation split, so its keys are renamed ``val/*``;
  - ``"test"`` — otherwise (``"eval_split": "test"`` or a summary without the key): per-epoch
    evaluation on the test set.

  In every protocol the maximum over epochs of a per-epoch accuracy, stored as ``*/acc1_best``
  by older runs, is renamed ``*/acc1_max`` (``*/acc1_max_epoch``): on the test split it was
  selected on the test set and is never reported as "best".
* Status filter: :func:`partition_by_status` keeps runs whose status is in
  :data:`INCLUDED_STATUSES` (``finished``, or no ``run.json``) and returns the others by status,
  for the report to list apart.
* :func:`group_configurations` — one :class:`Configuration` per (method, dataset, model,
  command-line overrides other than ``seed`` and bookkeeping keys, protocol), in first-seen order.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdrun.report.stats import SeedSummary, seed_order, summarize
from kdrun.rundir import read_run_info

IGNORED_OVERRIDE_KEYS = (
    "seed",
    "hydra.",
    "launcher",
    "logger",
    "paths.",
    "resume",
    "hardware.num_workers",
    "trainer.log_every",
    "tags",
    "name",
)
#: numeric summary keys that describe the run rather than measure it (not compared to a baseline)
BOOKKEEPING_KEYS = ("seed", "epochs", "params", "world_size")
INCLUDED_STATUSES = ("finished", None)
PROTOCOLS = {
    "test": (
        "no validation split: evaluated on the test set after every epoch; "
        "figures are the last epoch's"
    ),
    "validation": (
        "validation split only: every figure is on the held-out validation share of the "
        "training set (the test set was not evaluated); figures are the last epoch's"
    ),
    "val_select": (
        "validation split: evaluated on it after every epoch, the model selected on "
        "{monitor}; the test set evaluated once at the end, for the last model (test) "
        "and for the selected one (test at best val)"
    ),
}


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]  # metric keys renamed as the protocol says
    overrides: list[str]
    status: str | None
    protocol: str
    monitor: str | None = None

    @property
    def seed(self) -> Any:
        return self.summary.get("seed")


@dataclass
class Configuration:
    method: str
    dataset: str
    model: str
    overrides: str  # space-separated, sorted
    protocol: str
    runs: list[Run] = field(default_factory=list)
    metrics: dict[str, SeedSummary] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[Any]:
        return sorted({r.seed for r in self.runs}, key=seed_order)

    @property
    def monitor(self) -> str | None:
        monitors = {r.monitor for r in self.runs if r.monitor}
        return ", ".join(sorted(monitors)) or None

    def duplicate_seeds(self) -> list[Any]:
        seen = [r.seed for r in self.runs]
        return sorted({s for s in seen if seen.count(s) > 1}, key=seed_order)

    def per_seed(self, key: str) -> dict[Any, float]:
        """Value of ``key`` per seed (the mean where one seed has several runs)."""
        values: dict[Any, list[float]] = {}
        for run in self.runs:
            v = run.summary.get(key)
            if numeric(v):
                values.setdefault(run.seed, []).append(float(v))
        return {s: math.fsum(vs) / len(vs) for s, vs in values.items()}


def numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def natural_key(path: Path) -> list:
    """Sort key reading digit runs as numbers: sweep job 2 before job 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(paths: list[Path]) -> list[Path]:
    runs: list[Path] = []
    for path in paths:
        if (path / "summary.json").is_file():
            runs.append(path)
        elif path.is_dir():
            found = [p.parent for p in path.rglob("summary.json") if "wandb" not in p.parts]
            runs.extend(sorted(found, key=natural_key))
    return list(OrderedDict.fromkeys(runs))


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def read_overrides(run: Path) -> list[str]:
    items = read_yaml(run / ".hydra" / "overrides.yaml") or []
    return [str(o) for o in items]


def read_monitor(run: Path) -> str | None:
    config = read_yaml(run / ".hydra" / "config.yaml")
    evaluation = config.get("eval") if isinstance(config, dict) else None
    monitor = evaluation.get("monitor") if isinstance(evaluation, dict) else None
    return str(monitor) if monitor else None


def protocol_of(summary: dict[str, Any]) -> str:
    parts = {p for key in summary for p in key.split("/")[:-1]}
    if "val" in parts or "test_at_best" in parts:
        return "val_select"
    if summary.get("eval_split") == "validation":
        return "validation"
    return "test"


def normalized_key(key: str, protocol: str) -> str:
    parts = key.split("/")
    if protocol == "validation":
        parts = ["val" if p == "test" else p for p in parts]
    if len(parts) >= 2 and parts[-2] in ("test", "val") and parts[-1].startswith("acc1_best"):
        parts[-1] = "acc1_max" + parts[-1][len("acc1_best") :]
    return "/".join(parts)


def read_run(path: Path) -> Run | None:
    try:
        raw = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    protocol = protocol_of(raw)
    summary = {normalized_key(k, protocol): v for k, v in raw.items()}
    status = read_run_info(path).get("status")
    monitor = read_monitor(path) if protocol == "val_select" else None
    return Run(path, summary, read_overrides(path), status, protocol, monitor)


def partition_by_status(runs: list[Run]) -> tuple[list[Run], dict[str, list[Run]]]:
    included: list[Run] = []
    others: dict[str, list[Run]] = OrderedDict()
    for run in runs:
        if run.status in INCLUDED_STATUSES:
            included.append(run)
        else:
            others.setdefault(str(run.status), []).append(run)
    return included, others


def kept_overrides(overrides: list[str]) -> str:
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in ("method", "dataset", "model") or key.startswith(IGNORED_OVERRIDE_KEYS):
            continue
        kept.append(item.lstrip("+"))
    return " ".join(sorted(kept))


def numeric_keys(runs: list[Run]) -> list[str]:
    """Every numeric summary key of the runs but ``seed``."""
    keys = {k for r in runs for k, v in r.summary.items() if numeric(v)}
    return sorted(keys - {"seed"})


def comparable(key: str) -> bool:
    """A measured figure (not bookkeeping, not the epoch at which a maximum was reached)."""
    return key not in BOOKKEEPING_KEYS and not key.endswith("_epoch")


def group_configurations(runs: list[Run]) -> list[Configuration]:
    groups: dict[tuple[str, ...], Configuration] = OrderedDict()
    for run in runs:
        s = run.summary
        label = (
            str(s.get("method")),
            str(s.get("dataset")),
            str(s.get("model")),
            kept_overrides(run.overrides),
            run.protocol,
        )
        if label not in groups:
            groups[label] = Configuration(*label)
        groups[label].runs.append(run)
    for config in groups.values():
        for key in numeric_keys(config.runs):
            values = [r.summary[key] for r in config.runs if numeric(r.summary.get(key))]
            config.metrics[key] = summarize(values)
    return list(groups.values())
