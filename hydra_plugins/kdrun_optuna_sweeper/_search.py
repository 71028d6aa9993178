"""The search loop of kdrun's Optuna sweeper (ask, launch a batch, tell).

Every launched job gets the trial's parameters as overrides plus ``hydra.sweeper.trial_number``,
``hydra.sweeper.storage`` (made absolute) and ``hydra.sweeper.study_name``: the trial process
(:mod:`kdrun.hpo`) opens the same study from the shared storage, reports its per-epoch metric
and, when pruned, marks itself ``PRUNED`` there. After a batch the sweeper reads each trial's
state back: a pruned trial stays pruned, a job that returned a value completes its trial, any
other outcome fails it.

While it runs, the sweep holds an exclusive lock next to a journal file
(``<journal>.<study>.sweep.lock``): a second sweep of the same study stops with an error
instead of failing the first one's running trials as "interrupted".
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from kdrun import hpo
from kdrun.errors import ConfigError

from ._results import write_results
from ._space import format_value, parse_search_space

log = logging.getLogger(__name__)


def storage_location(settings: Mapping[str, Any], config: DictConfig) -> str:
    """The storage as every process must see it: an RDB URL as given, a journal path absolute."""
    storage = settings.get("storage")
    if storage is None:
        root = config.get("paths", {}).get("output_root", "outputs")
        storage = f"{root}/optuna/{settings['study_name']}.journal"
    storage = str(storage)
    return storage if hpo.is_rdb_url(storage) else str(Path(storage).resolve())


def quoted(value: str) -> str:
    """A string as a quoted Hydra override value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@contextlib.contextmanager
def sweep_lock(storage: str, study_name: str) -> Iterator[None]:
    if hpo.is_rdb_url(storage):
        yield
        return
    path = Path(f"{storage}.{study_name}.sweep.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            raise ConfigError(
                f"study {study_name} in {storage} is being searched by another sweep "
                f"({fh.read().strip() or 'unknown process'}): wait for it, or name another "
                "study with hydra.sweeper.study_name=..."
            ) from None
        fh.truncate(0)
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def check_settings(settings: Mapping[str, Any], config: DictConfig) -> None:
    if settings["direction"] not in ("maximize", "minimize"):
        raise ConfigError(
            f"hydra.sweeper.direction={settings['direction']!r} must be maximize or minimize"
        )
    if int(settings["n_jobs"]) < 1:
        raise ConfigError(f"hydra.sweeper.n_jobs={settings['n_jobs']} must be >= 1")
    if not 0.0 <= float(settings["max_failure_rate"]) <= 1.0:
        raise ConfigError("hydra.sweeper.max_failure_rate must be in [0, 1]")
    # fails early (one line) when the metric needs a validation split the config lacks
    hpo.metric_keys(str(settings["metric"]), hpo.has_validation_split(config))


def container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def run_search(
    settings: Mapping[str, Any],
    arguments: list[str],
    config: DictConfig,
    hydra_context: HydraContext,
    launcher: Any,
) -> None:
    check_settings(settings, config)
    distributions, fixed = parse_search_space(container(settings["params"]) or {}, arguments)
    if not distributions:
        raise ConfigError("hydra.sweeper.params is empty: nothing to search")
    study_name = str(settings["study_name"])
    storage_url = storage_location(settings, config)
    epochs = int(config.trainer.epochs)
    pruner = hpo.make_pruner(
        str(settings["pruner"]), container(settings["pruner_options"]) or {}, epochs
    )
    sweep_dir = Path(config.hydra.sweep.dir)
    with sweep_lock(storage_url, study_name):
        storage = hpo.open_storage(storage_url)
        optuna.create_study(
            study_name=study_name,
            storage=storage,
            direction=str(settings["direction"]),
            load_if_exists=True,
        )
        to_run = hpo.prepare_resume(
            optuna.load_study(study_name=study_name, storage=storage), int(settings["n_trials"])
        )
        seed = settings.get("seed")
        existing = len(optuna.load_study(study_name=study_name, storage=storage).trials)
        # a resumed search draws new suggestions, not the first run's again
        sampler = hpo.make_sampler(
            str(settings["sampler"]),
            container(settings["sampler_options"]) or {},
            None if seed is None else int(seed) + existing,
        )
        study = optuna.load_study(
            study_name=study_name, storage=storage, sampler=sampler, pruner=pruner
        )
        log.info(
            "study %s: %d of %d trials to run (sampler %s, pruner %s, storage %s)",
            study_name,
            to_run,
            settings["n_trials"],
            settings["sampler"],
            settings["pruner"],
            storage_url,
        )
        job_overrides = [
            f"hydra.sweeper.storage={quoted(storage_url)}",
            f"hydra.sweeper.study_name={quoted(study_name)}",
        ]
        fixed_overrides = list(fixed.values())
        run_batches(
            study,
            distributions,
            fixed_overrides + job_overrides,
            launcher,
            to_run,
            int(settings["n_jobs"]),
            float(settings["max_failure_rate"]),
        )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_results(
            study,
            sweep_dir,
            config,
            hydra_context,
            list(distributions),
            int(settings["rerun_seeds"]),
        )


def run_batches(
    study: optuna.Study,
    distributions: dict[str, Any],
    common_overrides: list[str],
    launcher: Any,
    to_run: int,
    n_jobs: int,
    max_failure_rate: float,
) -> None:
    job_idx = 0
    while to_run > 0:
        batch = [study.ask(fixed_distributions=distributions) for _ in range(min(n_jobs, to_run))]
        overrides = []
        for trial in batch:
            params = [f"{name}={format_value(value)}" for name, value in trial.params.items()]
            log.info("\t#%d : %s", trial.number, " ".join(params))
            overrides.append(
                (*common_overrides, *params, f"hydra.sweeper.trial_number={trial.number}")
            )
        returns = launcher.launch(overrides, initial_job_idx=job_idx)
        job_idx += len(returns)
        failures = 0
        states = {t.number: t for t in study.get_trials(deepcopy=False)}
        for trial, ret in zip(batch, returns):
            frozen = states[trial.number]
            if frozen.state == TrialState.PRUNED:
                step = frozen.last_step
                log.info("\t#%d pruned after epoch %s (%.4f)", trial.number, step, frozen.value)
                continue
            if frozen.state != TrialState.RUNNING:  # ended by someone else: leave it so
                log.warning("\t#%d is %s in the study", trial.number, frozen.state.name)
                continue
            value = None
            if ret.status == JobStatus.COMPLETED:
                value = ret.return_value
            if value is None:
                failures += 1
                log.warning("\t#%d failed: %s", trial.number, _failure(ret))
                study.tell(trial, state=TrialState.FAIL)
                continue
            study.tell(trial, float(value))
            log.info("\t#%d : %.4f", trial.number, float(value))
        if failures / len(returns) > max_failure_rate:
            raise RuntimeError(
                f"{failures} of {len(returns)} trials of a batch failed (more than "
                f"hydra.sweeper.max_failure_rate={max_failure_rate}); see their run dirs"
            )
        to_run -= len(batch)


def _failure(ret: Any) -> str:
    if ret.status == JobStatus.COMPLETED:
        return "the job returned no value"
    try:
        _ = ret.return_value  # raises the job's exception
    except Exception as exc:  # only reported
        return f"{type(exc).__name__}: {exc}"
    return str(ret.status)
