"""Training callbacks: the events of :meth:`kdrun.engine.Trainer.fit` that code outside the loop
can hook into, without the loop knowing what they do.

A callback is an object with any of these methods (all optional, all called on every rank, in
the order the callbacks were given):

* ``on_fit_start(trainer)`` — after a resume state (if any) is loaded, before the first epoch;
* ``on_epoch_end(trainer, record)`` — after an epoch's ``record`` (train/eval figures, keyed as
  logged) was logged and the end-of-epoch checkpoint written. Raising here ends ``fit`` with
  that exception (e.g. an early stop whose checkpoint is already on disk);
* ``on_fit_end(trainer)`` — after the last epoch, when ``fit`` returns normally.
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
