"""Records of a Hilbert-space self-distillation run: one ``Round`` per round, one ``HilbertRun``
per ``eps``.

Contract: ``Round.to_dict()`` and ``HilbertRun.to_dict()`` are the JSON records written to
``hilbert.json``, with the keys ``ROUND_JSON_KEYS`` and ``RUN_JSON_KEYS`` in that order (the
arrays ``y``, ``f_grid``, ``d``, ``x``, ``y0``, ``x_grid`` and ``clean_grid`` stay in memory for
the plots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ROUND_JSON_KEYS", "RUN_JSON_KEYS", "HilbertRun", "Round"]

ROUND_JSON_KEYS = (
    "t",
    "c",
    "c_lower",
    "c_upper",
    "y_norm",
    "b",
    "n_effective",
    "train_mse",
    "test_mse",
)
RUN_JSON_KEYS = ("eps", "kernel", "width", "collapsed_at", "collapse_lower_bound", "rounds")


def _record(obj: Any, keys: Sequence[str]) -> dict[str, Any]:
    """``{key: obj.key}`` for ``keys``, in that order."""
    return {key: getattr(obj, key) for key in keys}


@dataclass
class Round:
    """One non-collapsed round ``t`` (counted from 1)."""

    t: int
    c: float
    c_lower: float
    c_upper: float
    y_norm: float  # ||y_t||, norm of the round-t training predictions f_t(X)
    b: np.ndarray  # diag(B_t), eigen-directions in decreasing order of d
    n_effective: int  # entries with b / max(b) > 0.1
    train_mse: float  # mean (f_t(X) - y_0)^2  (original noisy targets)
    target_mse: float  # mean (f_t(X) - y_{t-1})^2  (== eps: the constraint is active)
    test_mse: float | None  # mean (f_t - clean)^2 on the test grid, None without clean function
    y: np.ndarray = field(repr=False)  # y_t = f_t(X)
    f_grid: np.ndarray | None = field(default=None, repr=False)  # f_t on the test grid (1-D x)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of ``hilbert.json`` (keys ``ROUND_JSON_KEYS``)."""
        record = _record(self, ROUND_JSON_KEYS)
        record["b"] = [float(v) for v in self.b]
        return record


@dataclass
class HilbertRun:
    """All rounds of self-distillation at one ``eps``."""

    eps: float
    kernel: str
    width: float
    max_rounds: int
    rounds: list[Round]
    collapsed_at: int | None
    collapse_lower_bound: float
    d: np.ndarray = field(repr=False)  # eigenvalues of G, decreasing
    x: np.ndarray = field(repr=False)  # training points, [K, D]
    y0: np.ndarray = field(repr=False)
    x_grid: np.ndarray | None = field(default=None, repr=False)
    clean_grid: np.ndarray | None = field(default=None, repr=False)

    @property
    def cs(self) -> list[float]:
        return [r.c for r in self.rounds]

    @property
    def best_round(self) -> int | None:
        """Round with the lowest test MSE (``None`` without a clean function or rounds)."""
        scored = [r for r in self.rounds if r.test_mse is not None]
        if not scored:
            return None
        return min(scored, key=lambda r: r.test_mse).t

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of one ``eps`` in ``hilbert.json`` (keys ``RUN_JSON_KEYS``)."""
        record = _record(self, RUN_JSON_KEYS)
        record["rounds"] = [r.to_dict() for r in self.rounds]
        return record
