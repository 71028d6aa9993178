"""`hparams_search=ps_kd_alpha`: real Optuna studies driven through Hydra by kdrun's sweeper, on
digits — scoring on the validation split, resuming to the study's total after SIGTERM, pruning
from inside the trial processes, and two trials at once sharing the study's journal file.

The studies are read back with Optuna itself from the journal file the sweep wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import run_kdrun, start_kdrun
from tests.test_cli import wait_for_glob
from tests.test_slurm import slurm_cluster  # noqa: F401  (the fixture)

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from kdrun import hpo  # noqa: E402

BASE = [
    "hparams_search=ps_kd_alpha",
    "dataset=digits",
    "logger=none",
    "trainer.log_every=1000",
]
STUDY = "ps_kd_alpha-digits"


def load_study(tmp_path: Path) -> optuna.Study:
    journal = tmp_path / "outputs" / "optuna" / "ps_kd_alpha.journal"
    return optuna.load_study(study_name=STUDY, storage=hpo.open_storage(str(journal)))


def trial_dirs(tmp_path: Path) -> list[Path]:
    jobs = (tmp_path / "outputs" / "multiruns").glob("*/*")
    return sorted((p for p in jobs if p.name.isdigit()), key=lambda p: int(p.name))


def sweep_results(tmp_path: Path) -> tuple[Path, dict]:
    (path,) = (tmp_path / "outputs" / "multiruns").glob("*/optimization_results.yaml")
    return path.parent, OmegaConf.to_container(OmegaConf.load(path))


def per_epoch_key(run_dir: Path) -> str:
    """The key of the per-epoch validation accuracy in this run's logs (``val/acc1``; older
    runs logged the validation split's evaluation as ``test/acc1``)."""
    text = (run_dir / "metrics.jsonl").read_text()
    return "val/acc1" if '"val/acc1"' in text else "test/acc1"


def logged_epochs(run_dir: Path) -> list[int]:
    key = per_epoch_key(run_dir)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["epoch"] for e in events if key in e and "train/loss" in e]


def last_validation_acc(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())[per_epoch_key(run_dir)]


def test_study_runs_scores_on_validation_and_resumes_to_its_total(tmp_path):
    run_kdrun([*BASE, "trainer.epochs=1", "hydra.sweeper.n_trials=2"], tmp_path)
    study = load_study(tmp_path)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(study.trials) == 2 and len(complete) == 2
    dirs = trial_dirs(tmp_path)
    assert len(dirs) == 2
    for trial, run_dir in zip(complete, dirs):
        assert 0.1 <= trial.params["method.alpha_T"] <= 0.95
        assert 0.005 <= trial.params["optim.lr"] <= 0.2
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        summary = json.loads((run_dir / "summary.json").read_text())
        # the trial trained exactly the suggested configuration, and returned its score
        assert cfg.method._target_.endswith("PSKD")
        assert cfg.method.alpha_T == pytest.approx(trial.params["method.alpha_T"])
        assert cfg.optim.lr == pytest.approx(trial.params["optim.lr"])
        assert trial.value == pytest.approx(last_validation_acc(run_dir))
        assert trial.intermediate_values == {1: pytest.approx(last_validation_acc(run_dir))}
        assert trial.user_attrs["run_dir"] == str(run_dir.resolve())
        # scored on the held-out validation share of the training set, not the test set
        assert summary["eval_split"] == "validation"
        assert cfg.dataset.val_fraction == 0.1
    sweep_dir, results = sweep_results(tmp_path)
    best = max(complete, key=lambda t: t.value)
    assert results["best_value"] == pytest.approx(best.value)
    assert results["best_params"] == pytest.approx(best.params)
    assert results["trials"] == {"complete": 2, "pruned": 0, "failed": 0}
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (sweep_dir / plot).read_bytes().startswith(b"\x89PNG")
    # the rerun command: the preset's method, the best values, the full training set, 5 seeds
    rerun = results["rerun_best"].split()
    assert rerun[:2] == ["kdrun", "-m"] and "method=ps_kd" in rerun
    assert f"method.alpha_T={best.params['method.alpha_T']!r}" in rerun
    assert "dataset.val_fraction=0" in rerun and rerun[-1] == "seed=0,1,2,3,4"
    assert not any(w.startswith("hparams_search") for w in rerun)

    # the same command again: the study already has its 2 trials, nothing runs
    proc = run_kdrun([*BASE, "trainer.epochs=1", "hydra.sweeper.n_trials=2"], tmp_path)
    assert "0 of 2 trials to run" in proc.stdout + proc.stderr
    assert len(load_study(tmp_path).trials) == 2
    # a larger total adds only the missing trial, which the sampler draws knowing the others
    run_kdrun([*BASE, "trainer.epochs=1", "hydra.sweeper.n_trials=3"], tmp_path)
    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert len({t.params["optim.lr"] for t in study.trials}) == 3


def test_interrupted_trial_reruns_its_parameters_from_its_checkpoint(tmp_path):
    args = [*BASE, "trainer.epochs=4", "hydra.sweeper.n_trials=2"]
    proc = start_kdrun(args, cwd=tmp_path, start_new_session=True)
    # stop the sweep (SIGTERM, as a scheduler would) once trial 0 has checkpointed an epoch
    sweeps = tmp_path / "outputs" / "multiruns"
    wait_for_glob(sweeps, "*/0/checkpoints/last.ckpt", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    (interrupted_dir,) = sweeps.glob("*/0")
    assert json.loads((interrupted_dir / "run.json").read_text())["status"] == "preempted"
    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    params = study.trials[0].params
    reported = study.trials[0].intermediate_values

    run_kdrun(args, tmp_path)
    study = load_study(tmp_path)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.user_attrs[hpo.INTERRUPTED_ATTR] == [0]
    assert study.trials[1].params == params  # the interrupted configuration ran again ...
    info = json.loads((interrupted_dir / "run.json").read_text())
    # ... and continued in its own run dir from its checkpoint (kdrun's resume=auto)
    assert info["status"] == "finished" and info["restarts"] == 1
    assert study.trials[1].user_attrs["run_dir"] == str(interrupted_dir.resolve())
    assert study.trials[1].value == pytest.approx(last_validation_acc(interrupted_dir))
    epochs = logged_epochs(interrupted_dir)
    assert epochs == sorted(set(epochs)) and epochs[-1] == 4  # no epoch trained twice
    # the continuing trial carries the whole curve: the epochs before the kill, then its own
    assert sorted(study.trials[1].intermediate_values) == [1, 2, 3, 4]
    for epoch, value in reported.items():
        assert study.trials[1].intermediate_values[epoch] == pytest.approx(value)


def test_pruned_trials_stop_early_and_are_marked_pruned(tmp_path):
    # a threshold no trial reaches prunes every trial at the first epoch the pruner may
    # (n_warmup_steps=2 in the preset): deterministic, unlike the median of a few trials
    args = [
        *BASE,
        "trainer.epochs=3",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner=threshold",
        "+hydra.sweeper.pruner_options.lower=1.01",
    ]
    proc = run_kdrun(args, tmp_path)
    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    for trial, run_dir in zip(study.trials, trial_dirs(tmp_path)):
        assert json.loads((run_dir / "run.json").read_text())["status"] == "pruned"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["pruned"] is True and summary["pruned_epoch"] == 2
        assert logged_epochs(run_dir) == [1, 2]  # the third epoch never trained
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.value == pytest.approx(last_validation_acc(run_dir))
    _, results = sweep_results(tmp_path)
    assert results["pruned_trials"] == [0, 1]
    assert "best_params" not in results  # no trial completed
    assert "trials: 0 complete, 2 pruned [0, 1], 0 failed" in proc.stdout + proc.stderr
    # kdrun-report keeps pruned runs out of the tables and lists them apart
    report = subprocess.run(
        [sys.executable, "-m", "kdrun.report", str(tmp_path / "outputs" / "multiruns")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "status 'pruned'" in report.stdout + report.stderr


def _interval(run_dir: Path) -> tuple[datetime, datetime]:
    info = json.loads((run_dir / "run.json").read_text())
    fmt = "%Y-%m-%dT%H:%M:%S%z"
    return datetime.strptime(info["started"], fmt), datetime.strptime(info["ended"], fmt)


def test_two_trials_at_once_share_the_study_file(tmp_path):
    # launcher=local: submitit's local executor starts both trials of a batch as processes
    args = [
        *BASE,
        "launcher=local",
        "trainer.epochs=2",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
    ]
    run_kdrun(args, tmp_path, env={"OMP_NUM_THREADS": "1"})
    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    dirs = trial_dirs(tmp_path)
    assert len(dirs) == 2
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [1, 2]
    (a_start, a_end), (b_start, b_end) = (_interval(d) for d in dirs)
    assert a_start <= b_end and b_start <= a_end  # the two processes ran at the same time


@pytest.mark.slurm
def test_trials_as_slurm_jobs_report_and_prune_through_the_study_file(slurm_cluster, tmp_path):  # noqa: F811
    from tests.test_slurm import finish, submit

    sweep = tmp_path / "sweep"
    args = [
        *BASE,
        "launcher=slurm",
        "launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
        "trainer.epochs=3",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.pruner=threshold",
        "+hydra.sweeper.pruner_options.lower=1.01",
    ]
    out = finish(submit(slurm_cluster, args, tmp_path), slurm_cluster, timeout=400)
    study = load_study(tmp_path)
    # each job, a SLURM task, pruned its own trial in the shared study file
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2, out[-3000:]
    for trial in study.trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir.parent == sweep.resolve()
        info = json.loads((run_dir / "run.json").read_text())
        assert info["status"] == "pruned" and info["slurm_job_id"], info
        assert sorted(trial.intermediate_values) == [1, 2]
    assert "#SBATCH --array=0-1%" in next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
