"""Preemption: SIGTERM / SIGUSR1 end a fit with a checkpoint at a step boundary.

:class:`Preemption` is a callback (see :mod:`kdrun.callbacks`). It records the signal when it
arrives and, after every training step, asks :class:`kdrun.distributed.StopAgreement` whether
any rank has seen one: every rank then writes the checkpoint at the same step and raises
:class:`Preempted` (the CLI exits with ``128 + signum``, and asks SLURM to requeue on SIGUSR1).
Nothing here synchronises with the device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from typing import Any

from kdrun import distributed
from kdrun.callbacks import Callback


class Preempted(Exception):
    """Raised after the checkpoint was written because SIGTERM/SIGUSR1 arrived."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


class SignalFlag:
    """Records SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._old.clear()


class Preemption(Callback):
    def __init__(self) -> None:
        self.signals = SignalFlag()
        self.stopper = distributed.StopAgreement()  # built where the trainer is: every rank

    def on_fit_start(self, trainer: Any) -> None:
        self.signals.install()

    def on_step_end(self, trainer: Any, out: Any, targets: Any) -> None:
        signum = self.stopper.poll(self.signals.signum)
        if signum is None:
            return
        trainer.check_finite()
        trainer.save_checkpoint()
        who = f"rank {trainer.dist.rank}: " if trainer.dist.enabled else ""
        raise Preempted(
            f"{who}signal {signum}: checkpoint written at epoch {trainer.epoch} step "
            f"{trainer.step_in_epoch} (global step {trainer.global_step})",
            signum=signum,
        )

    def on_fit_end(self, trainer: Any) -> None:
        self.stopper.close()

    def on_fit_exit(self, trainer: Any) -> None:
        self.signals.restore()


def request_requeue(signum: int | None) -> None:
    """Ask SLURM to run this job again after a SIGUSR1 checkpoint (the checkpoint is written).

    SIGUSR1 is SLURM's warning before the time limit (``sbatch --signal=USR1@T``; the SLURM
    launcher asks for it) or a manual ``scancel --signal=USR1``. In a hydra-submitit job,
    submitit's own handler (restored by ``Trainer.fit``) resubmits the same job — same job number,
    same run dir — with ``scontrol requeue`` and exits; in a plain ``sbatch`` job kdrun requeues
    it itself and ``resume=auto`` finds the run again. SIGTERM needs nothing: SLURM sends it when
    it preempts or requeues the job itself (and on ``scancel``, which must not requeue).
    """
    if signum != signal.SIGUSR1:
        return
    if os.environ.get("SUBMITIT_EXECUTOR"):
        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, None)  # submitit: checkpoint() + requeue + sys.exit
        return
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id and os.environ.get("SLURM_PROCID", "0") == "0":
        logging.getLogger("kdrun").warning("requeueing SLURM job %s", job_id)
        subprocess.run(["scontrol", "requeue", job_id], check=False, timeout=60)
