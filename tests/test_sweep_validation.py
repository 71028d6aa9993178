"""A sweep of Hydra's basic sweeper (``kdrun -m``) is validated job by job before anything is
written or submitted: one job with a bad value rejects the whole sweep with one line naming that
job's overrides, and no sweep dir, job dir or SLURM submission exists afterwards."""

from __future__ import annotations

import pytest

from tests.conftest import run_kdrun

FAST = ["logger=none", "trainer.epochs=1", "trainer.limit_train_batches=1"]


@pytest.mark.parametrize(
    ("sweep", "job", "message"),
    [
        (
            ["method=byot", "method.T=1,0"],
            "sweep job 1 (method=byot method.T=0 logger=none trainer.epochs=1 "
            "trainer.limit_train_batches=1)",
            "method.T=0 is out of range: must be a number > 0",
        ),
        (
            ["trainer.batch_size=0,64"],
            "sweep job 0 (trainer.batch_size=0 logger=none trainer.epochs=1 "
            "trainer.limit_train_batches=1)",
            "trainer.batch_size=0",
        ),
        (
            ["model=resnet8,nonexistent"],
            "sweep job 1 (model=nonexistent logger=none trainer.epochs=1 "
            "trainer.limit_train_batches=1)",
            "Could not find 'model/nonexistent' Available options in 'model': ",
        ),
    ],
)
def test_a_bad_job_rejects_the_sweep_before_any_dir(tmp_path, sweep, job, message):
    proc = run_kdrun(["-m", *sweep, *FAST], cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"kdrun: error: {job}: ") and message in line, line
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_a_bad_slurm_sweep_is_rejected_before_submission(tmp_path):
    """The check runs before the launcher: nothing reaches sbatch (none needs to be installed)."""
    args = ["-m", "launcher=slurm", "method=ps_kd", "method.alpha_T=0.5,1.5", *FAST]
    proc = run_kdrun(args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        "kdrun: error: sweep job 1 (launcher=slurm method=ps_kd method.alpha_T=1.5"
    )
    assert "method.alpha_T=1.5" in line.split("): ", 1)[1]
    assert not list(tmp_path.rglob("*_submission.sh")) and not (tmp_path / "outputs").exists()
