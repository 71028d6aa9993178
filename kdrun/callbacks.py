"""Training callbacks: the events of :meth:`kdrun.engine.Trainer.fit`, so that checkpoints,
model selection, logging, plots, preemption and hyperparameter search live outside the loop.

A callback is an object with any of these methods (all optional, all called on every rank, in
the order of ``Trainer.callbacks``):

* ``on_fit_start(trainer)`` — after a resume state (if any) is loaded, before the first epoch;
* ``on_epoch_start(trainer)`` — before an epoch's first step (also a resumed, partial epoch);
* ``on_step_end(trainer, out, targets)`` — after each optimizer step (``out``: the method's
  :class:`~kdrun.methods.base.StepOutput`; counters already advanced). Runs inside the training
  step: no host synchronisation here except at logging intervals;
* ``on_predictions(trainer, split, logits, labels)`` — an evaluation the trainer plots;
* ``on_evaluate(trainer, split, metrics, figures)`` — after each scheduled evaluation on
  ``split`` (``val`` or ``test``); ``figures`` (the keys to log, stage prefix included) may be
  extended;
* ``on_epoch_end(trainer, record)`` — with the epoch's full ``record`` (train and eval figures,
  keyed as logged). Raising here ends ``fit`` with that exception;
* ``on_fit_end(trainer)`` — after the last epoch, when ``fit`` completes;
* ``on_fit_exit(trainer)`` — when ``fit`` returns or raises (clean-up).

A callback with state that must survive a resume defines ``checkpoint_state() -> dict`` (merged
into the trainer's checkpoint) and ``restore_state(state)``.

:func:`standard_callbacks` is the set a run uses: model selection, metric logging,
checkpoints, reliability plots, preemption — in that order, so an epoch is logged before its
checkpoint is written and a later callback (e.g. a search's pruning) sees both done.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Callback:
    """Base class with no-op events; subclass and override what you need."""

    def on_fit_start(self, trainer: Any) -> None:
        pass

    def on_epoch_end(self, trainer: Any, record: Mapping[str, Any]) -> None:
        pass

    def on_fit_end(self, trainer: Any) -> None:
        pass


def call(callbacks: list[Any], event: str, *args: Any) -> None:
    """Invoke ``event`` on every callback that defines it."""
    for cb in callbacks:
        handler = getattr(cb, event, None)
        if handler is not None:
            handler(*args)


def standard_callbacks(settings: Any, plots: bool = True) -> list[Any]:
    """The callbacks of a training run with :class:`~kdrun.settings.TrainerSettings`."""
    from kdrun.checkpoint import Checkpointer
    from kdrun.metric_logging import MetricLogger, ReliabilityPlots
    from kdrun.preemption import Preemption
    from kdrun.selection import ModelSelection

    out: list[Any] = [
        ModelSelection(settings.monitor),
        MetricLogger(settings.log_every),
        Checkpointer(settings.checkpoint_every_steps),
    ]
    if plots:
        out.append(ReliabilityPlots(settings.n_bins))
    out.append(Preemption())
    return out
