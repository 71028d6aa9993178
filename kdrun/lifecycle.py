"""The life of one run around its training: device and process group, console and file logging,
the run dir (a fresh one, or an interrupted run to continue with ``resume=auto``, see
:mod:`kdrun.rundir`), its lock, its ``run.json`` status, the logger, and the clean-up.

:class:`RunLifecycle` is a context manager: entering it sets all of that up (rank 0 chooses and
locks the run dir; every rank learns it), leaving it records how the run ended in ``run.json``
(``finished``, ``pruned``, ``preempted`` or ``failed``), finishes the W&B run and destroys the
process group — whatever happened inside.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun import checkpoint as ckpt
from kdrun import distributed, rundir
from kdrun.build import build_logger
from kdrun.errors import KdrunError
from kdrun.preemption import Preempted

log = logging.getLogger("kdrun")

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"


def setup_console_logging(rank: int) -> None:
    """kdrun's messages go to stdout (and kdrun.log) through the ``kdrun`` logger only, so they
    are not doubled by the handlers Hydra installs on the root logger."""
    if not any(getattr(h, "_kdrun", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._kdrun = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def add_file_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "kdrun.log", mode="a")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log.addHandler(handler)
    return handler


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise KdrunError("hardware=gpu needs a CUDA GPU and none is visible: use hardware=cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise KdrunError(f"hardware.device={name!r} must be auto, cpu or cuda")


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def choose_run_dir(cfg: DictConfig, fresh_dir: Path, multirun: bool, fp: str) -> Path:
    """Rank 0 decides: the fresh Hydra dir, or an interrupted run to continue (resume=auto)."""
    if cfg.resume != "auto" or rundir.has_checkpoint(fresh_dir):
        return fresh_dir
    previous = rundir.find_resumable(fresh_dir, fp, multirun)
    if previous is None:
        return fresh_dir
    rundir.discard_fresh_dir(fresh_dir)
    return previous


def load_resume_state(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The checkpoint to resume from, in host memory (the trainer copies it to its device)."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return ckpt.load_latest(run_dir / "checkpoints")
    return ckpt.load(cfg.resume)


class RunLifecycle:
    """Set-up and tear-down of one run (see the module docstring). Attributes after entering:
    ``device``, ``info`` (:class:`~kdrun.distributed.DistInfo`), ``run_dir``, ``logger``;
    ``status`` is what ``run.json`` gets on a normal exit (set it to ``pruned`` if so)."""

    def __init__(self, cfg: DictConfig, fresh_dir: Path, multirun: bool, group: str | None):
        self.cfg, self.fresh_dir, self.multirun, self.group = cfg, fresh_dir, multirun, group
        self.status = "finished"
        self.logger: Any = None
        self._lock: rundir.RunLock | None = None
        self._file_handler: logging.Handler | None = None

    def __enter__(self) -> RunLifecycle:
        cfg = self.cfg
        env_dist = distributed.env_dist_info()
        if cfg.hardware.distributed and env_dist is None:
            raise KdrunError(
                "hardware=ddp needs a distributed launch: use torchrun "
                "--nproc_per_node=K -m kdrun hardware=ddp ... or SLURM tasks"
            )
        self.device = resolve_device(cfg.hardware.device, env_dist.local_rank if env_dist else 0)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # this rank's GPU for NCCL, broadcasts, pinning
        self.info = distributed.DistInfo()
        if env_dist is not None and env_dist.world_size > 1:
            self.info = distributed.init_distributed(self.device.type)
        setup_console_logging(self.info.rank)
        fp = rundir.fingerprint(cfg)
        chosen = (
            choose_run_dir(cfg, self.fresh_dir, self.multirun, fp) if self.info.is_main else None
        )
        self.run_dir = Path(distributed.broadcast_object(str(chosen)))
        if not self.info.is_main and self.run_dir != self.fresh_dir:
            rundir.discard_fresh_dir(self.fresh_dir)
        self._lock = rundir.RunLock(self.run_dir)
        try:
            if self.info.is_main:
                self._start_run_record(fp)
            resumed_step = rundir.last_logged_step(self.run_dir) if cfg.resume != "never" else None
            self.logger = build_logger(
                cfg, self.run_dir, self.info.is_main, self.group, resumed_step
            )
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _start_run_record(self, fp: str) -> None:
        if not self._lock.acquire():
            raise KdrunError(f"run dir {self.run_dir} is in use by another kdrun process")
        self._file_handler = add_file_logging(self.run_dir)
        existing = rundir.read_run_info(self.run_dir)
        run_info = existing or rundir.new_run_info(fp)
        run_info.update(
            status="running",
            pid=os.getpid(),
            restarts=run_info.get("restarts", 0) + int(bool(existing)),
        )
        rundir.write_run_info(self.run_dir, run_info)
        log.info("run dir: %s%s", self.run_dir, " (resumed)" if existing else "")
        log.info("config:\n%s", OmegaConf.to_yaml(self.cfg, resolve=True))

    def __exit__(self, exc_type, exc, tb) -> None:
        status = self.status if exc is None else "failed"
        if isinstance(exc, Preempted):
            status = "preempted"
            log.warning("%s", exc)
        if self.logger is not None:
            self.logger.finish(0 if exc is None else 1)
            self.logger = None
        if self.info.is_main and self._lock is not None and self._lock.fh is not None:
            run_info = rundir.read_run_info(self.run_dir)
            run_info.update(status=status, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            rundir.write_run_info(self.run_dir, run_info)
            self._lock.release()
        if self._file_handler is not None:
            log.removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None
        distributed.cleanup()
