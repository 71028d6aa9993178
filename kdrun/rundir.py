"""Run directories: identity, locking, status and ``resume=auto``.

Every run dir holds ``run.json``: the config fingerprint, the status (``running``, ``finished``,
``failed``, ``preempted``), the command line, the git SHA, host and times. While a process works in
a run dir it holds an exclusive ``flock`` on ``run_dir/.lock`` (released by the kernel even on
``kill -9``).

``resume=auto`` with the same command as an interrupted run: Hydra has just made a fresh,
timestamped dir; :func:`find_resumable` looks among its siblings (``outputs/runs/*`` for single
runs, ``outputs/multiruns/*/*`` for sweep jobs) for the newest dir with the same fingerprint that
did not finish, has a checkpoint and is not locked by a live process. The run then continues
there (same dir, same W&B run id) and the fresh dir is removed. A requeued SLURM job gets its own
dir back from the launcher, so it resumes in place.

The fingerprint hashes the resolved config without the keys that do not change results (paths,
``resume``, logging, worker counts) — so the same command, or the same command with another
``logger``, maps to the same run. Keys added to the config after runs existed are left out at the
value that reproduces the old behaviour (:data:`NEUTRAL_WHEN`), so such runs still resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdrun.atomic import atomic_write_json

IGNORED_KEYS = ("paths", "resume", "logger", "launcher", "tags", "name")
IGNORED_NESTED = (("hardware", "num_workers"), ("trainer", "log_every"))
#: (outer, inner, value): keys introduced later, hashed only when they differ from the value
#: that behaves as before they existed
NEUTRAL_WHEN = (
    ("dataset", "val_fraction", 0.0),
    ("dataset", "val_split", "none"),
    ("eval", "monitor", "val/acc1"),
)


def fingerprint(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    for key in IGNORED_KEYS:
        data.pop(key, None)
    for outer, inner in IGNORED_NESTED:
        if isinstance(data.get(outer), dict):
            data[outer].pop(inner, None)
    for outer, inner, neutral in NEUTRAL_WHEN:
        section = data.get(outer)
        if isinstance(section, dict) and inner in section and section[inner] == neutral:
            del section[inner]
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class RunLock:
    """An exclusive, non-blocking flock on ``run_dir/.lock`` held for the process's life."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.fh = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open on purpose
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self.fh = fh
        return True

    def release(self) -> None:
        if self.fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def is_locked(run_dir: Path) -> bool:
    lock = RunLock(run_dir)
    if lock.acquire():
        lock.release()
        return False
    return True


def read_run_info(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / "run.json", info, sort_keys=True, default=str)


def new_run_info(fp: str) -> dict[str, Any]:
    return {
        "fingerprint": fp,
        "status": "running",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_sha": git_sha(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Training checkpoints of the run and of its stages (``<stage>/checkpoints``)."""
    run_dir = Path(run_dir)
    found = []
    for pattern in (
        "checkpoints/last.ckpt",
        "checkpoints/prev.ckpt",
        "*/checkpoints/last.ckpt",
        "*/checkpoints/prev.ckpt",
    ):
        found.extend(run_dir.glob(pattern))
    return found


def has_checkpoint(run_dir: Path) -> bool:
    return bool(checkpoint_files(run_dir))


def last_logged_step(run_dir: Path) -> int | None:
    """The logging step of the newest readable checkpoint (events after it are stale)."""
    import torch

    steps = []
    for path in checkpoint_files(run_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            continue
        steps.append(int(state.get("log_step", state.get("global_step", 0))))
    return max(steps) if steps else None


def last_jsonl_step(run_dir: Path) -> int | None:
    """The highest step in ``metrics.jsonl`` (what earlier launches logged, stale tail included)."""
    import json

    steps = []
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    return max(steps) if steps else None


def find_resumable(run_dir: Path, fp: str, multirun: bool) -> Path | None:
    """The newest unfinished, unlocked sibling run with fingerprint ``fp`` and a checkpoint."""
    run_dir = Path(run_dir).resolve()
    pattern_root = run_dir.parent.parent if multirun else run_dir.parent
    candidates = pattern_root.glob("*/*") if multirun else pattern_root.glob("*")
    found = []
    for cand in candidates:
        if cand.resolve() == run_dir or not cand.is_dir():
            continue
        info = read_run_info(cand)
        if info.get("fingerprint") != fp or info.get("status") == "finished":
            continue
        if not has_checkpoint(cand) or is_locked(cand):
            continue
        found.append((cand.stat().st_mtime, cand))
    return max(found)[1] if found else None


def discard_fresh_dir(run_dir: Path) -> None:
    """Remove the dir Hydra just created when the run continues elsewhere (only if it holds
    nothing but Hydra's files)."""
    run_dir = Path(run_dir)
    allowed = {".hydra", ".lock", "kdrun.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= allowed:
        shutil.rmtree(run_dir, ignore_errors=True)
