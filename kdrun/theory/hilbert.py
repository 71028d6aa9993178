"""Self-distillation in Hilbert space: the exact kernel model of Mobahi, Farajtabar & Bartlett (2020).

Contract (the model and its properties are described in docs/theory.md):

* Training points ``x`` (shape ``[K]`` or ``[K, D]``) with scalar targets ``y_0`` (shape ``[K]``),
  a positive-definite kernel ``g`` (``rbf``: ``exp(-|x-x'|^2 / (2 w^2))``, ``laplace``:
  ``exp(-|x-x'| / w)``, ``|.|`` the Euclidean norm) and the normalised Gram matrix
  ``G = g(X, X) / K = V diag(d) V^T``, eigen-decomposed once. Eigenvalues are stored in
  *decreasing* order, so ``d[0] = d_max`` and every per-direction vector (``b``) follows that order.
* One round ("training") returns the smoothest function (RKHS norm) whose training mean-squared
  error against the current targets ``y`` is at most ``eps``:
  ``f(x) = g(x, X)/K · (c I + G)^{-1} y`` where ``c > 0`` is the unique root of
  ``sum_k (c / (c + d_k))^2 z_k^2 = K eps`` with ``z = V^T y``. The root is bracketed by
  ``[d_min, d_max] · sqrt(K eps) / (||y|| - sqrt(K eps))`` and found with Brent's method on
  ``log c`` (relative accuracy ~1e-15). If ``||y||^2 <= K eps`` the answer is ``f = 0``
  ("collapse").
* Round ``t`` (counted from 1) fits the previous round's training predictions:
  ``y_t = f_t(X) = G (c_t I + G)^{-1} y_{t-1} = V B_t V^T y_0`` with
  ``B_t = prod_{i<=t} diag(d / (c_i + d))``; the equivalent one-shot kernel is
  ``f_t(x) = g(x, X)/K · V diag(1/(c_t + d) prod_{i<t} d/(c_i + d)) V^T y_0``.
* Per round the run records ``c_t``, its bracket, ``||y_t||`` (the norm of the round-t training
  predictions), ``diag(B_t)``, the number of effective basis functions (entries with
  ``b / b_max > 0.1``), ``train_mse`` (MSE of ``f_t`` at the training points against the ORIGINAL
  noisy targets ``y_0``), ``target_mse`` (MSE against the round's own targets ``y_{t-1}``; equals
  ``eps`` because the constraint is active) and ``test_mse`` (MSE of ``f_t`` against the clean
  function on ``n_test`` equally spaced points of the test interval, ``None`` when the clean function
  is unknown). ``collapsed_at`` is the first round that returns ``f = 0`` (``None`` if
  ``max_rounds`` rounds ran without collapse); ``collapse_lower_bound`` is
  ``(||y_0|| / sqrt(K eps) - 1) / (d_max / d_min)``: the number of non-collapsed rounds is at least
  this.

The pieces live in one module each: ``kernels`` (``g`` and ``as_points``), ``solver`` (the root
solve for ``c``), ``model`` (``HilbertModel``), ``results`` (``Round``, ``HilbertRun``),
``expression`` (clean functions as checked expressions) and ``dataset`` (``load_data``). This
module is their public face, plus ``self_distill``, the one-call wrapper. Everything is float64
numpy; nothing here imports matplotlib, hydra or rich.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .dataset import TOY_DATA, Dataset, default_test_interval, load_data
from .expression import parse_clean_function
from .kernels import KERNELS, as_points, kernel_matrix
from .model import EFFECTIVE_THRESHOLD, HilbertModel
from .results import HilbertRun, Round
from .solver import bracket, solve_c

__all__ = [
    "EFFECTIVE_THRESHOLD",
    "KERNELS",
    "TOY_DATA",
    "Dataset",
    "HilbertModel",
    "HilbertRun",
    "Round",
    "as_points",
    "bracket",
    "default_test_interval",
    "kernel_matrix",
    "load_data",
    "parse_clean_function",
    "self_distill",
    "solve_c",
]


def self_distill(
    x: Any,
    y: Any,
    *,
    kernel: str = "rbf",
    width: float = 0.08,
    eps: float = 0.01,
    max_rounds: int = 20,
    clean_function: str | Callable[[np.ndarray], np.ndarray] | None = None,
    n_test: int = 1001,
    test_interval: tuple[float, float] | None = None,
) -> HilbertRun:
    """Convenience wrapper: build the model and run it at one ``eps``.

    For 1-D ``x`` the rounds are evaluated on ``n_test`` equally spaced points of ``test_interval``
    (default: [0, 1] when the data lie in it, else the data range); ``test_mse`` needs
    ``clean_function`` (an expression string or a callable).
    """
    model = HilbertModel(x, y, kernel=kernel, width=width)
    x_grid = None
    if model.X.shape[1] == 1:
        lo, hi = test_interval or default_test_interval(model.X[:, 0])
        x_grid = np.linspace(lo, hi, int(n_test))
    clean = parse_clean_function(clean_function) if isinstance(clean_function, str) else None
    if callable(clean_function):
        clean = clean_function
    return model.run(eps, max_rounds=max_rounds, x_grid=x_grid, clean=clean)
