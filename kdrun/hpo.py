"""Hyperparameter search on Optuna: what kdrun's sweeper and its trials share.

kdrun's Hydra sweeper (``hydra_plugins/kdrun_optuna_sweeper``, selected by the
``hparams_search=...`` presets) asks the study for a trial, launches it as a Hydra job with the
suggested parameters, and tells the study the job's result. This module is the part both sides
need, and the part that runs *inside* a trial:

* :func:`open_storage`, :func:`make_sampler`, :func:`make_pruner`: one study, opened the same way
  by the sweeper and by every trial process (which may be a SLURM job on another node): a path
  (the default ``outputs/optuna/<study>.journal``) is an Optuna journal file, safe to share
  between processes and hosts on one file system; ``sqlite:///...``, ``postgresql://...`` and
  the other SQLAlchemy URLs are an RDB storage.
* :func:`trial_callbacks`: in a job launched by the sweeper (``hydra.sweeper.trial_number`` set),
  a :class:`TrialReporter` that reports the monitored metric after every evaluated epoch
  (``Trial.report(value, step=epoch)``) and, when the study's pruner says so, stops training by
  raising :class:`TrialPruned` (after the epoch's checkpoint is written) — the process marks the
  trial ``PRUNED`` in the study itself, so pruning works wherever the trial runs.
* :func:`monitored_value`: the one place that maps ``hydra.sweeper.metric`` to a logged key.
  The default ``val/acc1`` needs a validation split (``dataset.val_fraction > 0`` or
  ``dataset.val_split=standard``), evaluated after every epoch as ``val/*``; with one, a
  ``test/*`` metric is refused — the test set is evaluated once at the end and never tuned on.
* :func:`prepare_resume`: ``n_trials`` is the study's total; trials left ``RUNNING`` by a killed
  sweep are failed and their parameters queued again (their run dirs resume from checkpoints).

Optuna is imported only when a study is opened, so a plain ``kdrun`` run never loads it.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from kdrun import distributed
from kdrun.errors import ConfigError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("kdrun")

#: study user attr: numbers of the trials a killed sweep left running (they do not count)
INTERRUPTED_ATTR = "kdrun_interrupted"
#: ``hydra.sweeper._target_`` of kdrun's sweeper (trials of other sweepers report nothing)
SWEEPER_TARGET = "hydra_plugins.kdrun_optuna_sweeper.kdrun_optuna_sweeper.KdrunOptunaSweeper"
DEFAULT_METRIC = "val/acc1"

SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "qmc": "QMCSampler",
    "nsgaii": "NSGAIISampler",
    "bruteforce": "BruteForceSampler",
}
PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "threshold": "ThresholdPruner",
}


class TrialPruned(Exception):
    """Raised at an epoch end when the study's pruner stops the trial (checkpoint written)."""

    def __init__(self, number: int, epoch: int, value: float) -> None:
        super().__init__(f"trial {number} pruned after epoch {epoch} ({value:.4f})")
        self.number, self.epoch, self.value = number, epoch, value


# ----- the study ---------------------------------------------------------------------------------
def is_rdb_url(storage: str) -> bool:
    return "://" in storage


def open_storage(storage: str) -> Any:
    """An Optuna storage: a journal file for a path, an RDB storage for a SQLAlchemy URL."""
    import optuna

    if is_rdb_url(storage):
        if storage.startswith("sqlite:///"):
            Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(storage)
    from optuna.storages.journal import JournalFileBackend

    path = Path(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the default symlink lock is atomic on NFS too (trials on other SLURM nodes)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _accepted_options(cls: type, options: Mapping[str, Any], family: Mapping[str, str]) -> dict:
    """The options ``cls`` takes. One that no class of its ``family`` (samplers or pruners)
    takes is a typo: an error naming it; one meant for another member is left out, so a
    preset's TPE or median options survive ``sampler=random`` or ``pruner=hyperband``."""
    import optuna

    takes = set(inspect.signature(cls).parameters)
    for key in options:
        if key in takes:
            continue
        module = optuna.samplers if family is SAMPLERS else optuna.pruners
        if not any(
            key in inspect.signature(getattr(module, n)).parameters for n in family.values()
        ):
            kind = "sampler" if family is SAMPLERS else "pruner"
            raise ConfigError(
                f"hydra.sweeper.{kind}_options.{key}: no Optuna {kind} takes it "
                f"({cls.__name__} takes {', '.join(sorted(takes - {'self'}))})"
            )
    return {k: v for k, v in options.items() if k in takes}


def make_sampler(name: str, options: Mapping[str, Any], seed: int | None) -> Any:
    """``hydra.sweeper.sampler``: tpe (default), random, cmaes, gp, qmc, nsgaii, bruteforce.

    ``options`` (``hydra.sweeper.sampler_options``) are the sampler's keyword arguments; those
    only other samplers take are left out (so a preset's TPE options survive
    ``sampler=random``)."""
    import optuna

    if name not in SAMPLERS:
        raise ConfigError(f"hydra.sweeper.sampler={name!r} is not one of {', '.join(SAMPLERS)}")
    cls = getattr(optuna.samplers, SAMPLERS[name])
    kwargs = dict(options)
    if name == "tpe":
        kwargs.setdefault("constant_liar", True)  # parallel trials: no duplicate suggestions
    if seed is not None:
        kwargs["seed"] = seed
    try:
        return cls(**_accepted_options(cls, kwargs, SAMPLERS))
    except ImportError as err:  # cmaes without the cmaes package, ...
        raise ConfigError(f"hydra.sweeper.sampler={name}: {err}") from err


def make_pruner(name: str, options: Mapping[str, Any], epochs: int) -> Any:
    """``hydra.sweeper.pruner``: none (default), median, percentile, successive_halving,
    hyperband, threshold; ``options`` (``hydra.sweeper.pruner_options``) are its keyword
    arguments (those only other pruners take are left out). A step is an epoch:
    hyperband's ``max_resource`` defaults to ``trainer.epochs``."""
    import optuna

    if name not in PRUNERS:
        raise ConfigError(f"hydra.sweeper.pruner={name!r} is not one of {', '.join(PRUNERS)}")
    cls = getattr(optuna.pruners, PRUNERS[name])
    kwargs = dict(options)
    if name == "hyperband":
        kwargs.setdefault("min_resource", 1)
        kwargs.setdefault("max_resource", int(epochs))
    try:
        return cls(**_accepted_options(cls, kwargs, PRUNERS))
    except TypeError as err:
        raise ConfigError(f"hydra.sweeper.pruner_options for {name}: {err}") from err


def prepare_resume(study: optuna.Study, n_trials: int) -> int:
    """Fail the trials a killed sweep left ``RUNNING``, queue their parameters again, and return
    how many trials are still to run for a study total of ``n_trials``.

    Only Optuna's public API: ``Study.tell(number, state=FAIL)`` ends such a trial, and its
    number goes to the study's user attr ``kdrun_interrupted``; interrupted trials do not count
    towards ``n_trials``, finished, pruned and crashed ones do."""
    from optuna.trial import TrialState

    interrupted = set(study.user_attrs.get(INTERRUPTED_ATTR, []))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        interrupted.add(trial.number)
        if trial.params:
            study.enqueue_trial(dict(trial.params))
        log.warning("trial %d was interrupted; its parameters run again", trial.number)
    if interrupted:
        study.set_user_attr(INTERRUPTED_ATTR, sorted(interrupted))
    done = sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and t.number not in interrupted)
    )
    return max(0, n_trials - done)


# ----- the monitored metric ----------------------------------------------------------------------
def metric_keys(metric: str, has_validation: bool) -> tuple[str, ...]:
    """The logged keys that may hold ``metric`` (the one place for val/test naming).

    ``val/<m>`` needs a validation split; with one, ``test/<m>`` is refused."""
    if metric.startswith("val/") and not has_validation:
        raise ConfigError(
            f"hydra.sweeper.metric={metric} needs a validation split: set "
            "dataset.val_fraction=0.1 (or hydra.sweeper.metric=test/acc1 to tune on the test set)"
        )
    if has_validation and metric.split("/")[0] in ("test", "test_at_best"):
        raise ConfigError(
            f"hydra.sweeper.metric={metric} would tune on the test set although the run has a "
            f"validation split: use hydra.sweeper.metric=val/{metric.split('/', 1)[1]}"
        )
    return (metric,)


def monitored_value(metric: str, values: Mapping[str, Any], has_validation: bool) -> float | None:
    """``metric``'s value in a logged record or summary (None when this one has none)."""
    for key in metric_keys(metric, has_validation):
        if values.get(key) is not None:
            return float(values[key])
    return None


# ----- inside a trial ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialInfo:
    """What a job launched by kdrun's sweeper knows of its trial (from ``hydra.sweeper``)."""

    storage: str
    study_name: str
    number: int
    metric: str
    pruner: str
    pruner_options: dict[str, Any]


def current_trial() -> TrialInfo | None:
    """This job's trial, or None outside a search by kdrun's sweeper."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    if sweeper.get("_target_") != SWEEPER_TARGET or sweeper.get("trial_number") is None:
        return None
    return TrialInfo(
        storage=str(sweeper.storage),
        study_name=str(sweeper.study_name),
        number=int(sweeper.trial_number),
        metric=str(sweeper.get("metric") or DEFAULT_METRIC),
        pruner=str(sweeper.get("pruner") or "none"),
        pruner_options=OmegaConf.to_container(sweeper.get("pruner_options") or {}, resolve=True),
    )


def has_validation_split(cfg: DictConfig) -> bool:
    return (
        float(cfg.dataset.get("val_fraction", 0.0) or 0.0) > 0
        or cfg.dataset.get("val_split", "none") == "standard"
    )


def reported_history(run_dir: Path, metric: str, has_validation: bool) -> dict[int, float]:
    """``{epoch: value}`` of ``metric`` in the run dir's ``metrics.jsonl`` (a resumed run's
    past)."""
    found: dict[int, float] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return found
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "epoch" in event:
            value = monitored_value(metric, event, has_validation)
            if value is not None:
                found[int(event["epoch"])] = value
    return found


class TrialReporter:
    """Reports the monitored metric to the study after each evaluated epoch and prunes.

    Rank 0 talks to the study; the prune decision is broadcast so every DDP rank stops at the
    same epoch. A resumed run first reports the epochs it had logged before the interruption
    (the trial that continues it is a new one), so the pruner compares like with like."""

    def __init__(self, trial: TrialInfo, cfg: DictConfig, run_dir: Path) -> None:
        self.info = trial
        self.has_validation = has_validation_split(cfg)
        self.epochs = int(cfg.trainer.epochs)
        self.run_dir = Path(run_dir)
        self.trial: Any = None

    def on_fit_start(self, trainer: Any) -> None:
        if not trainer.dist.is_main:
            return
        import optuna

        storage = open_storage(self.info.storage)
        study = optuna.load_study(
            study_name=self.info.study_name,
            storage=storage,
            pruner=make_pruner(self.info.pruner, self.info.pruner_options, self.epochs),
        )
        frozen = study.trials[self.info.number]
        if frozen.state != optuna.trial.TrialState.RUNNING:
            log.warning("trial %d is %s in the study: not reporting", frozen.number, frozen.state)
            return
        # public storage API: the trial's id from its number (Trial(study, trial_id) needs it)
        study_id = storage.get_study_id_from_name(self.info.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.info.number)
        self.trial = optuna.trial.Trial(study, trial_id)
        self.trial.set_user_attr("run_dir", str(self.run_dir))
        history = reported_history(self.run_dir, self.info.metric, self.has_validation)
        for epoch, value in sorted(history.items()):
            if epoch <= trainer.epoch and epoch not in frozen.intermediate_values:
                self.trial.report(value, step=epoch)

    def on_epoch_end(self, trainer: Any, record: Mapping[str, Any]) -> None:
        pruned: TrialPruned | None = None
        if self.trial is not None and trainer.dist.is_main:
            value = monitored_value(self.info.metric, record, self.has_validation)
            if value is not None:
                self.trial.report(value, step=int(record["epoch"]))
                if int(record["epoch"]) < self.epochs and self.trial.should_prune():
                    pruned = TrialPruned(self.info.number, int(record["epoch"]), value)
                    self.trial.study.tell(self.info.number, state=_pruned_state())
        pruned = distributed.broadcast_object(pruned)
        if pruned is not None:
            raise pruned


def _pruned_state() -> Any:
    from optuna.trial import TrialState

    return TrialState.PRUNED


def trial_callbacks(cfg: DictConfig, run_dir: Path) -> list[Any]:
    """The callbacks for the main trainer of this job: a reporter in a trial, else none."""
    trial = current_trial()
    return [] if trial is None else [TrialReporter(trial, cfg, run_dir)]


def objective(cfg: DictConfig, summary: Mapping[str, Any]) -> float | None:
    """The value a finished run returns to a sweeper: the monitored metric at the last epoch
    (``hydra.sweeper.metric`` in a search, else the final top-1 accuracy: ``val/acc1`` with a
    validation split — never a test figure then — else ``test/acc1``)."""
    if summary.get("pruned"):
        return None  # the trial process already told the study
    trial = current_trial()
    has_validation = has_validation_split(cfg)
    metric = trial.metric if trial is not None else ("val/acc1" if has_validation else "test/acc1")
    return monitored_value(metric, summary, has_validation)
