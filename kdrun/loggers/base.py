"""The logger protocol and the fan-out to several loggers.

Contract
--------
Every backend implements :class:`Logger`::

    log_metrics(metrics, step)            one event: {"epoch": ..., "train/loss": ..., ...}
    log_image(key, path, step, caption)   an image file (e.g. the reliability diagram)
    log_summary(summary)                  final results
    finish(exit_code=0)                   idempotent; safe to call twice

:class:`MultiLogger` calls every logger in order; ``finish`` reaches every logger even if one
raises (the first exception is re-raised afterwards). Backends that derive from
:class:`FinishOnExit` (all of kdrun's) work as context managers: leaving the ``with`` block calls
``finish``, with ``exit_code=1`` when the block raised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["FinishOnExit", "Logger", "MultiLogger"]

_Self = TypeVar("_Self", bound="FinishOnExit")


@runtime_checkable
class Logger(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_image(
        self, key: str, path: str | Path, step: int, caption: str | None = None
    ) -> None: ...

    def log_summary(self, summary: Mapping[str, Any]) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class FinishOnExit:
    """``with logger: ...`` finishes the logger on the way out (``exit_code=1`` on an exception)."""

    def finish(self, exit_code: int = 0) -> None:
        raise NotImplementedError

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


class MultiLogger(FinishOnExit):
    """Calls every logger in order."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers = list(loggers)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_image(self, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
        for lg in self.loggers:
            lg.log_image(key, path, step, caption)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_summary(summary)

    def finish(self, exit_code: int = 0) -> None:
        first: BaseException | None = None
        for lg in self.loggers:
            try:
                lg.finish(exit_code)
            except BaseException as exc:  # finish the others first, then re-raise
                first = first or exc
        if first is not None:
            raise first
