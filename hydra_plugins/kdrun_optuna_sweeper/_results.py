"""What a search leaves in its sweep dir.

* ``optimization_results.yaml``: best parameters and value, the best trial's number and run dir,
  counts of complete / pruned / failed trials, the pruned trials' numbers, and ``rerun_best``:
  one command that trains the best configuration with ``rerun_seeds`` seeds on the full
  training set, scored on the test set (``dataset.val_fraction=0``);
* ``trials.csv``: every trial of the study (number, state, value, last reported epoch, run dir,
  parameters);
* ``optimization_history.png`` (value per trial, pruned trials at their last reported value,
  best so far), ``intermediate_values.png`` (each trial's per-epoch metric; pruned ones stop
  early) and ``param_importances.png`` (fANOVA, from two complete trials on).
"""

from __future__ import annotations

import csv
import logging
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.trial import TrialState

from ._space import format_value

log = logging.getLogger(__name__)

PRESET_GROUP = "hparams_search"


def write_results(
    study: optuna.Study,
    sweep_dir: Path,
    config: DictConfig,
    hydra_context: HydraContext,
    searched: list[str],
    rerun_seeds: int,
) -> None:
    trials = study.get_trials(deepcopy=False)
    by_state = {s: [t.number for t in trials if t.state == s] for s in TrialState}
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "trials": {
            "complete": len(by_state[TrialState.COMPLETE]),
            "pruned": len(by_state[TrialState.PRUNED]),
            "failed": len(by_state[TrialState.FAIL]),
        },
        "pruned_trials": by_state[TrialState.PRUNED],
    }
    write_trials_csv(trials, sweep_dir / "trials.csv")
    pruned = by_state[TrialState.PRUNED]
    log.info(
        "trials: %d complete, %d pruned%s, %d failed",
        results["trials"]["complete"],
        len(pruned),
        f" {pruned}" if pruned else "",
        results["trials"]["failed"],
    )
    if by_state[TrialState.COMPLETE]:
        best = study.best_trial
        try:
            command = rerun_command(config, hydra_context, best.params, searched, rerun_seeds)
        except Exception as exc:  # a convenience: it must not fail a finished search
            log.warning("no rerun command: %s", exc)
            command = None
        results.update(
            best_params=dict(best.params),
            best_value=best.value,
            best_trial=best.number,
            best_run_dir=best.user_attrs.get("run_dir"),
            rerun_best=command,
        )
        log.info("Best parameters: %s", best.params)
        log.info("Best value: %s (trial %d)", best.value, best.number)
        if command:
            log.info("Rerun the best configuration with %d seeds:\n%s", rerun_seeds, command)
    OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
    try:
        plot_results(study, trials, sweep_dir)
    except Exception as exc:  # plots must not fail a finished search
        log.warning("plots skipped: %s", exc)


def write_trials_csv(trials: Iterable[optuna.trial.FrozenTrial], path: Path) -> None:
    trials = list(trials)
    names = sorted({name for t in trials for name in t.params})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["number", "state", "value", "last_epoch", "run_dir", *names])
        for t in trials:
            writer.writerow(
                [
                    t.number,
                    t.state.name.lower(),
                    "" if t.value is None else t.value,
                    "" if t.last_step is None else t.last_step,
                    t.user_attrs.get("run_dir", ""),
                    *(t.params.get(n, "") for n in names),
                ]
            )


# ----- the rerun command -------------------------------------------------------------------------
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return format_value(value)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _choices(cfg: DictConfig) -> dict[str, Any]:
    return {
        group: choice
        for group, choice in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
        if not group.startswith("hydra/") and group != PRESET_GROUP
    }


def rerun_command(
    config: DictConfig,
    hydra_context: HydraContext,
    best_params: dict[str, Any],
    searched: list[str],
    seeds: int,
) -> str:
    """``kdrun -m ...``: the search's configuration without its preset, the best parameters, the
    full training set and ``seeds`` seeds.

    The preset's own settings (``override /method: ...``, ``dataset.val_fraction``...) are found
    by composing the command again without the preset and comparing: differing config-group
    choices, then differing values, become overrides."""
    drop = {PRESET_GROUP, "seed", "dataset.val_fraction", *searched}
    base = [o for o in config.hydra.overrides.task if _key(o) not in drop]
    loader = hydra_context.config_loader
    name = config.hydra.job.config_name

    def compose(overrides: list[str]) -> DictConfig:
        return loader.load_configuration(
            config_name=name, overrides=overrides, run_mode=RunMode.RUN
        )

    wanted = _choices(config)
    plain = compose([o for o in base if "." not in _key(o)])  # group choices and top-level keys
    groups = [
        f"{g}={c}" for g, c in wanted.items() if c is not None and _choices(plain).get(g) != c
    ]
    plain = compose(groups + base)
    have = _flatten(_app_config(plain))
    values = []
    for key, value in _flatten(_app_config(config)).items():
        if key in drop or key in have and have[key] == value:
            continue
        if isinstance(value, (dict, ListConfig)) or (
            isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)
        ):
            continue
        values.append(f"{'' if key in have else '+'}{key}={_value(value)}")
    params = [f"{k}={format_value(v)}" for k, v in best_params.items()]
    seed_list = ",".join(str(s) for s in range(seeds))
    words = ["kdrun", "-m", *groups, *base, *values, *params, "dataset.val_fraction=0"]
    words.append(f"seed={seed_list}")
    return " ".join(shlex.quote(w) for w in words)


def _app_config(cfg: DictConfig) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return data


# ----- plots -------------------------------------------------------------------------------------
def plot_results(
    study: optuna.Study, trials: list[optuna.trial.FrozenTrial], sweep_dir: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    pruned = [t for t in done if t.state == TrialState.PRUNED and t.value is not None]
    ax.scatter([t.number for t in complete], [t.value for t in complete], label="complete")
    ax.scatter(
        [t.number for t in pruned],
        [t.value for t in pruned],
        marker="x",
        color="grey",
        label="pruned (last reported)",
    )
    best, xs, ys = None, [], []
    for t in complete:
        if best is None or (t.value > best if maximize else t.value < best):
            best = t.value
        xs.append(t.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel="objective", title=f"optimisation history: {study.study_name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(sweep_dir / "optimization_history.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for t in done:
        steps = sorted(t.intermediate_values)
        style = "--" if t.state == TrialState.PRUNED else "-"
        ax.plot(steps, [t.intermediate_values[s] for s in steps], style, alpha=0.7)
    ax.set(xlabel="epoch", ylabel="reported metric", title="per-epoch metric (dashed: pruned)")
    fig.tight_layout()
    fig.savefig(sweep_dir / "intermediate_values.png", dpi=120)
    plt.close(fig)

    if len(complete) < 2:
        log.info("parameter importances need two complete trials: not plotted")
        return
    importances = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
    )
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (fANOVA)", title="parameter importances")
    fig.tight_layout()
    fig.savefig(sweep_dir / "param_importances.png", dpi=120)
    plt.close(fig)
