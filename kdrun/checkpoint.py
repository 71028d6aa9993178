"""Atomic, safe checkpoints.

A checkpoint is one dict of tensors and plain values (model, method state, optimizer, scheduler,
grad scaler, epoch/step counters, RNG states, best-so-far, meters), so it loads with
``torch.load(weights_only=True)``: no code runs from a checkpoint file. Checkpoints are always
loaded into host memory (``map_location="cpu"``) and copied into the live modules, optimizer and
RNGs from there, so a checkpoint saved on a GPU resumes on a CPU, on another GPU or on a different
number of GPUs (the batch order is defined on the global batch, not per rank).

Writes go to a temporary file in the same directory, are fsynced and then ``os.replace``d over the
target (:mod:`kdrun.atomic`), so a crash mid-write never leaves a truncated ``last.ckpt``. The
previous ``last.ckpt`` is kept as ``prev.ckpt``; when ``last.ckpt`` is unreadable, loading reports
it (naming the file) and falls back to ``prev.ckpt`` if that one is good.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from kdrun.atomic import atomic_write
from kdrun.errors import CheckpointError

log = logging.getLogger("kdrun")

FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically and durably (:func:`kdrun.atomic.atomic_write`)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), durable=True)


def save_last(state: dict[str, Any], ckpt_dir: str | Path) -> Path:
    """Write ``last.ckpt``, keeping the previous one as ``prev.ckpt``."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    state = {**state, "format_version": FORMAT_VERSION}
    if last.exists():
        os.replace(last, ckpt_dir / "prev.ckpt")
    atomic_save(state, last)
    return last


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a bad file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check resume=PATH")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, unpickling error, disallowed global, ...
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({reason}); delete it or pass "
            "resume=never to start over"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a kdrun checkpoint (no 'model' entry)")
    return state


def load_latest(ckpt_dir: str | Path, map_location: str | torch.device = "cpu") -> dict | None:
    """The newest readable checkpoint in ``ckpt_dir``: ``last.ckpt``, else ``prev.ckpt``.

    Returns None when the directory has no checkpoint. If ``last.ckpt`` is corrupt and no good
    ``prev.ckpt`` exists, the :class:`CheckpointError` for ``last.ckpt`` is raised.
    """
    ckpt_dir = Path(ckpt_dir)
    last, prev = ckpt_dir / "last.ckpt", ckpt_dir / "prev.ckpt"
    if not last.exists() and not prev.exists():
        return None
    first_error: CheckpointError | None = None
    for path in (last, prev):
        if not path.exists():
            continue
        try:
            return load(path, map_location)
        except CheckpointError as err:
            first_error = first_error or err
            log.warning("%s", err)
    assert first_error is not None
    raise first_error


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states saved by :func:`rng_state`, wherever the checkpoint came from: the
    states are CPU byte tensors whatever device the checkpoint was mapped to, and CUDA states
    are restored for the GPUs both machines have (a run saved on 4 GPUs resumes on 1, or on a
    CPU, and the other way round)."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


class Checkpointer:
    """The callback (:mod:`kdrun.callbacks`) that writes ``last.ckpt``: at every epoch end and,
    with ``every_steps``, every that many training steps (after a finiteness check, so a NaN
    never replaces the last good checkpoint)."""

    def __init__(self, every_steps: int | None = None) -> None:
        self.every_steps = int(every_steps) if every_steps else None

    def on_step_end(self, trainer: Any, out: Any, targets: Any) -> None:
        if self.every_steps and trainer.global_step % self.every_steps == 0:
            trainer.check_finite()
            trainer.save_checkpoint()

    def on_epoch_end(self, trainer: Any, record: Any) -> None:
        trainer.save_checkpoint()
