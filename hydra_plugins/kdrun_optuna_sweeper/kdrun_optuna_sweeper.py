"""The ``hydra/sweeper: kdrun_optuna`` config and the Hydra :class:`Sweeper` it instantiates.

Keys (``hydra.sweeper.*``):

* ``params``: the search space, one override per key in the Optuna sweeper's syntax —
  ``interval(a, b)`` (float; ``int(interval(a, b))`` for ints), ``tag(log, interval(a, b))``
  (log scale), ``choice(a, b, ...)`` (categorical), ``range(start, stop[, step])`` (stepped
  int/float); a plain value is fixed. Sweep overrides on the command line join the space.
* ``direction`` (maximize|minimize) of ``metric``, the per-epoch evaluation metric the trials
  report and return at their last epoch (default ``val/acc1``: needs a validation split).
* ``sampler`` (tpe|random|cmaes|gp|qmc|nsgaii|bruteforce) with ``sampler_options`` and ``seed``;
  ``pruner`` (none|median|percentile|successive_halving|hyperband|threshold) with
  ``pruner_options``; a step is an epoch.
* ``study_name`` and ``storage``: a journal file path (default
  ``<paths.output_root>/optuna/<study_name>.journal``) or an RDB URL (``sqlite:///x.db``).
* ``n_trials``: the study's total (a rerun runs what is missing); ``n_jobs``: trials launched
  per batch (run at once by a parallel launcher: ``launcher=local`` or ``launcher=slurm``);
  ``max_failure_rate``: the share of failed trials in a batch that stops the search.
* ``rerun_seeds``: seeds in the printed command that reruns the best configuration.
* ``trial_number``: set by the sweeper on each job it launches (the trial the job trains);
  leave it null.
"""

# no `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in
# sys.modules, where dataclasses cannot resolve string annotations
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class KdrunOptunaSweeperConf:
    _target_: str = "hydra_plugins.kdrun_optuna_sweeper.kdrun_optuna_sweeper.KdrunOptunaSweeper"
    direction: str = "maximize"
    metric: str = "val/acc1"
    study_name: str = "kdrun"
    storage: Any = None
    n_trials: int = 20
    n_jobs: int = 1
    max_failure_rate: float = 0.0
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    seed: Any = None
    pruner: str = "none"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    rerun_seeds: int = 5
    trial_number: Any = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="kdrun_optuna", node=KdrunOptunaSweeperConf, provider="kdrun"
)


class KdrunOptunaSweeper(Sweeper):
    """Ask the study for trials, launch them as Hydra jobs in batches of ``n_jobs``, tell it
    their results; write the best parameters, plots and a rerun command to the sweep dir."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        from ._search import run_search

        assert self.config is not None and self.hydra_context is not None
        run_search(self.settings, arguments, self.config, self.hydra_context, self.launcher)
