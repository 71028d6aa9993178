"""Local log files: ``metrics.jsonl`` and ``summary.json`` in the run dir (the source of truth).

Contract
--------
* ``<run_dir>/metrics.jsonl``: one JSON object per :meth:`JsonlLogger.log_metrics` call,
  ``{"step": step, **metrics}`` with the metric keys exactly as given. The file is opened in
  append mode (a resumed run continues it), line-buffered and flushed after every line.
  ``metrics`` must not contain a ``"step"`` key (``ValueError``).
  On open, an incomplete last line (a run killed mid-write) is cut off so the file stays valid
  JSONL; ``drop_after_step=N`` additionally drops events with ``step > N`` (for a run resumed
  from a checkpoint taken at step N, so no event is duplicated).
* ``<run_dir>/summary.json``: written atomically and durably (:mod:`kdrun.atomic`) on every
  :meth:`JsonlLogger.log_summary` call with exactly the given dict (no merging with an existing
  file: the caller passes the complete summary).
* Output is strict JSON (:func:`to_jsonable`): NaN and +-inf are written as ``null``; numpy/torch
  scalars become Python numbers; nested mappings/sequences are converted recursively.
* :meth:`JsonlLogger.log_image` is a no-op (the image already lives in the run dir).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdrun.atomic import atomic_write_bytes, atomic_write_json
from kdrun.loggers.base import FinishOnExit

__all__ = ["JsonlLogger", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Convert ``value`` to plain JSON types; NaN/inf -> None; numpy/torch scalars -> numbers."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy / torch scalars and arrays
    if callable(tolist):
        return to_jsonable(tolist())
    if isinstance(value, Sequence):
        return [to_jsonable(v) for v in value]
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} as JSON")


class JsonlLogger(FinishOnExit):
    """``metrics.jsonl`` (append, one object per event) and atomic ``summary.json``."""

    def __init__(
        self,
        run_dir: str | Path,
        metrics_file: str = "metrics.jsonl",
        summary_file: str = "summary.json",
        drop_after_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / metrics_file
        self.summary_path = self.run_dir / summary_file
        self._fh: Any = None
        self._repair(drop_after_step)

    def _repair(self, drop_after_step: int | None) -> None:
        """Cut an incomplete last line; optionally drop events after ``drop_after_step``."""
        if not self.metrics_path.exists():
            return
        data = self.metrics_path.read_bytes()
        if drop_after_step is None:
            if data and not data.endswith(b"\n"):
                with open(self.metrics_path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
            return
        kept = []
        for line in data.split(b"\n"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # empty or torn line
            if isinstance(obj, dict) and obj.get("step", -math.inf) <= drop_after_step:
                kept.append(line + b"\n")
        atomic_write_bytes(self.metrics_path, b"".join(kept))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if "step" in metrics:
            raise ValueError("metrics must not contain a 'step' key; pass it as `step`")
        record = {"step": int(step), **{str(k): to_jsonable(v) for k, v in metrics.items()}}
        line = json.dumps(record, allow_nan=False)
        if self._fh is None:
            self._fh = open(self.metrics_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._fh.write(line + "\n")
        self._fh.flush()

    def log_image(self, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
        """No-op: the image file already lives in the run dir."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(
            self.summary_path, to_jsonable(dict(summary)), allow_nan=False, durable=True
        )

    def finish(self, exit_code: int = 0) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
