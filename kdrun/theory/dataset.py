"""Training data of the Hilbert-space experiment: the packaged toy set or a user's JSON file.

Contract: ``load_data(path=None)`` reads ``{"x": [K] or [K, D], "y": [K],
"clean_function": "sin(2*pi*x)" (optional), "description": "..." (optional)}`` into a
``Dataset`` (``None``: the packaged ``mobahi_toy.json``, 11 noisy samples of ``sin(2 pi x)`` on
[0, 1]), with a one-line ``ValueError`` for a missing file, bad JSON, missing keys, non-numeric or
mis-shaped arrays and invalid clean functions. ``default_test_interval(x)`` is the test interval
used when none is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .expression import parse_clean_function
from .kernels import as_points

TOY_DATA = "mobahi_toy.json"

__all__ = ["TOY_DATA", "Dataset", "default_test_interval", "load_data"]


@dataclass
class Dataset:
    """Training data for the kernel experiment."""

    x: np.ndarray  # [K] or [K, D]
    y: np.ndarray  # [K]
    clean_function: str | None = None
    source: str = ""
    description: str = ""

    @property
    def dim(self) -> int:
        return as_points(self.x).shape[1]


def load_data(path: str | Path | None = None) -> Dataset:
    """Load ``{"x": [...], "y": [...], "clean_function": "sin(2*pi*x)"?}`` from ``path``.

    ``path=None`` loads the packaged toy set (11 noisy samples of ``sin(2 pi x)`` on [0, 1]).
    """
    if path is None:
        text = resources.files("kdrun.theory").joinpath("data", TOY_DATA).read_text()
        source = f"packaged {TOY_DATA}"
    else:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"data file not found: {p}")
        text = p.read_text()
        source = str(p)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"data file {source} is not valid JSON: {err}") from err
    if not isinstance(raw, dict) or "x" not in raw or "y" not in raw:
        raise ValueError(f"data file {source} must be a JSON object with keys 'x' and 'y'")
    try:
        x = np.asarray(raw["x"], dtype=np.float64)
        y = np.asarray(raw["y"], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"data file {source}: x and y must be numeric arrays") from err
    if x.ndim not in (1, 2) or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"data file {source}: need x of shape [K] or [K, D] and y of shape [K], "
            f"got {x.shape} and {y.shape}"
        )
    clean = raw.get("clean_function")
    if clean is not None:
        parse_clean_function(clean)  # validate early
        if x.ndim == 2 and x.shape[1] != 1:
            raise ValueError(f"data file {source}: clean_function needs 1-D x")
    return Dataset(
        x=x, y=y, clean_function=clean, source=source, description=raw.get("description", "")
    )


def default_test_interval(x: np.ndarray) -> tuple[float, float]:
    """[0, 1] when all training points lie in it (the toy set), else the data range."""
    lo, hi = float(np.min(x)), float(np.max(x))
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    return lo, hi
