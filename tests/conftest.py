"""Shared test setup: markers, an isolated W&B/HOME environment, and the CLI runner.

Tests marked ``slow`` run only with ``--runslow``; ``gpu`` tests skip without CUDA. Under
pytest-xdist (``make test`` runs one worker per CPU, at most 4) each worker and the runs it starts
get an equal share of the CPUs as their thread count, unless ``OMP_NUM_THREADS`` is set. Every test
runs with HOME, W&B dirs and KDRUN_DATA_DIR pointed into a temp dir, W&B forced offline with no
credentials, so nothing reads the user's files or touches the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        # N workers with all-CPU thread pools each would oversubscribe the CPUs N times over
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: use --runslow (make test-all)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / ".local" / "wandb"))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    yield


def run_kdrun(
    args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python -m kdrun ARGS`` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("KDRUN_DATA_DIR", str(cwd / "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "kdrun", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kdrun {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def start_kdrun(
    args: list[str], cwd: Path, env: dict | None = None, **popen: object
) -> subprocess.Popen:
    """Start ``python -m kdrun ARGS`` in the background (stdout and stderr together, as text);
    ``env`` is added to the environment, with ``KDRUN_DATA_DIR`` under ``cwd`` unless given."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("KDRUN_DATA_DIR", str(cwd / "data"))
    return subprocess.Popen(
        [sys.executable, "-m", "kdrun", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.fixture
def kdrun_cli():
    return run_kdrun
