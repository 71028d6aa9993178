"""`hparams_search=ps_kd_alpha`: a real Optuna study (sqlite) driven through Hydra, that resumes.

The studies are read back with Optuna itself from the sqlite file the sweep wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import run_kdrun
from tests.test_cli import wait_for_glob

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

BASE = [
    "hparams_search=ps_kd_alpha",
    "dataset=digits",
    "logger=none",
    "trainer.log_every=1000",
]
STUDY = "ps_kd_alpha-digits"


def load_study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(
        study_name=STUDY, storage=f"sqlite:///{tmp_path / 'outputs' / 'optuna' / 'ps_kd_alpha.db'}"
    )


def trial_dirs(tmp_path: Path) -> list[Path]:
    jobs = (tmp_path / "outputs" / "multiruns").glob("*/*")
    return sorted((p for p in jobs if p.name.isdigit()), key=lambda p: int(p.name))


def test_study_runs_scores_on_validation_and_resumes_to_its_total(tmp_path):
    proc = run_kdrun([*BASE, "trainer.epochs=1", "hydra.sweeper.n_trials=2"], tmp_path)
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
        assert trial.value == pytest.approx(summary["test/acc1"])
        # scored on the held-out validation share of the training set, not the test set
        assert summary["eval_split"] == "validation"
        assert cfg.dataset.val_fraction == 0.1
    results = OmegaConf.load(
        next((tmp_path / "outputs" / "multiruns").glob("*/optimization_results.yaml"))
    )
    assert results.best_value == pytest.approx(max(t.value for t in complete))
    assert "final validation metrics" in proc.stdout

    # the same command again: the study already has its 2 trials, nothing runs
    proc = run_kdrun([*BASE, "trainer.epochs=1", "hydra.sweeper.n_trials=2"], tmp_path)
    assert "0 of 2 trials to run" in proc.stdout + proc.stderr
    assert len(load_study(tmp_path).trials) == 2
    # a larger total adds only the missing trial, which the sampler draws knowing the others
    run_kdrun([*BASE, "trainer.epochs=1", "hydra.sweeper.n_trials=3"], tmp_path)
    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3


def test_interrupted_trial_reruns_its_parameters_from_its_checkpoint(tmp_path):
    args = [*BASE, "trainer.epochs=4", "hydra.sweeper.n_trials=2"]
    env = {**os.environ, "KDRUN_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdrun", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
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

    run_kdrun(args, tmp_path)
    study = load_study(tmp_path)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.user_attrs["kdrun_interrupted"] == [0]
    assert study.trials[1].params == params  # the interrupted configuration ran again ...
    info = json.loads((interrupted_dir / "run.json").read_text())
    # ... and continued in its own run dir from its checkpoint (kdrun's resume=auto)
    assert info["status"] == "finished" and info["restarts"] == 1
    summary = json.loads((interrupted_dir / "summary.json").read_text())
    assert study.trials[1].value == pytest.approx(summary["test/acc1"])
    epochs = [
        json.loads(line)["epoch"]
        for line in (interrupted_dir / "metrics.jsonl").read_text().splitlines()
        if '"test/acc1"' in line
    ]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 4  # no epoch trained twice


def test_prepare_resume_counts_only_trials_that_ended_on_their_own():
    from hydra_plugins.kdrun_optuna_sweeper import prepare_resume

    study = optuna.create_study()  # in memory
    done = study.ask()
    done.suggest_float("lr", 0.01, 0.1)
    study.tell(done, 1.0)
    crashed = study.ask()
    crashed.suggest_float("lr", 0.01, 0.1)
    study.tell(crashed, state=TrialState.FAIL)
    killed = study.ask()  # left RUNNING, as by a killed sweep
    lr = killed.suggest_float("lr", 0.01, 0.1)

    assert prepare_resume(study, 5) == 3  # the completed and the crashed trial count
    assert [t.state for t in study.trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.FAIL,
        TrialState.WAITING,  # the killed trial's parameters, queued again
    ]
    assert study.trials[3].system_attrs["fixed_params"] == {"lr": lr}
    assert study.user_attrs["kdrun_interrupted"] == [2]
    # a second rerun before anything ran changes nothing
    assert prepare_resume(study, 5) == 3
    assert study.user_attrs["kdrun_interrupted"] == [2]
    assert prepare_resume(study, 1) == 0
