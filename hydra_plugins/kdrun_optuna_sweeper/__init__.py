"""kdrun's Optuna sweeper: hydra-optuna-sweeper with a study that resumes.

Hydra only loads plugins from the ``hydra_plugins`` namespace package, so this subclass lives
here. Selected by ``hparams_search=...`` presets (``hydra.sweeper._target_``); every other
``hydra.sweeper.*`` key is hydra-optuna-sweeper's.

What it adds to the stock sweeper (which, rerun, would run ``n_trials`` *more* trials and leave
killed ones ``RUNNING`` forever):

* ``n_trials`` is the study's total: rerunning the same command after an interruption runs only
  the trials still missing (finished and failed trials count; interrupted ones do not).
* Trials left ``RUNNING`` by a killed sweep are marked failed (their numbers listed in the
  study's user attr ``kdrun_interrupted``) and their parameters are queued again, so the rerun
  trains exactly that configuration and kdrun's ``resume=auto`` continues it from its last
  checkpoint instead of starting over.
* A ``sqlite:///`` storage's parent directory is created.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from optuna.trial import TrialState

log = logging.getLogger(__name__)

INTERRUPTED_ATTR = "kdrun_interrupted"


def sqlite_path(storage: Any) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other storages)."""
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        return Path(storage[len("sqlite:///") :])
    return None


def prepare_resume(study: optuna.Study, n_trials: int) -> int:
    """Mark interrupted trials, queue their parameters again; return how many trials to run.

    Uses only optuna's public API: ``Study.tell(number, state=FAIL)`` ends a trial left
    ``RUNNING``; the numbers of such trials are kept in the study's user attr
    ``kdrun_interrupted`` (they do not count towards ``n_trials``)."""
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


class KdrunOptunaSweeper(OptunaSweeper):
    """:class:`OptunaSweeper` whose ``n_trials`` counts the whole (resumable) study."""

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        db = sqlite_path(impl.storage)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        if impl.storage is not None and impl.study_name is not None:
            study = optuna.create_study(
                study_name=impl.study_name,
                storage=impl.storage,
                directions=impl._get_directions(),
                load_if_exists=True,
            )
            total = impl.n_trials
            impl.n_trials = prepare_resume(study, total)
            log.info("study %s: %d of %d trials to run", impl.study_name, impl.n_trials, total)
            if impl.n_trials == 0:
                # Nothing to launch: still write the sweep's optimization_results.yaml.
                Path(impl.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        return impl.sweep(arguments)
