"""Kernels of the Hilbert-space model: ``g(a, b)`` for ``rbf`` and ``laplace`` on point sets.

Contract: ``as_points(x)`` turns ``[N]`` or ``[N, D]`` input into float64 ``[N, D]``;
``kernel_matrix(a, b, kernel, width)`` is the un-normalised ``[len(a), len(b)]`` matrix
(``rbf``: ``exp(-|a-b|^2 / (2 w^2))``, ``laplace``: ``exp(-|a-b| / w)``, ``|.|`` the Euclidean
norm), computed from exact pairwise differences so identical points give exactly 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KERNELS: tuple[str, ...] = ("rbf", "laplace")

__all__ = ["KERNELS", "as_points", "kernel_matrix"]


def as_points(x: Any) -> np.ndarray:
    """Return ``x`` as a float64 array of shape ``[N, D]`` (a 1-D input becomes ``[N, 1]``)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"x must have shape [K] or [K, D], got shape {a.shape}")
    return a


def _pairwise_sq_dist(a: np.ndarray, b: np.ndarray, chunk_elems: int = 1 << 22) -> np.ndarray:
    """Exact squared Euclidean distances (differences first, so identical points give 0)."""
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float64)
    rows = max(1, chunk_elems // max(1, b.shape[0] * a.shape[1]))
    for i in range(0, a.shape[0], rows):
        diff = a[i : i + rows, None, :] - b[None, :, :]
        out[i : i + rows] = np.einsum("ijk,ijk->ij", diff, diff)
    return out


def kernel_matrix(a: Any, b: Any, kernel: str, width: float) -> np.ndarray:
    """Un-normalised kernel matrix ``g(a, b)`` of shape ``[len(a), len(b)]``.

    ``rbf``: ``exp(-||a - b||^2 / (2 width^2))``; ``laplace``: ``exp(-||a - b|| / width)``.
    Distances are computed pairwise (exactly zero on identical points).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r} (allowed: {', '.join(KERNELS)})")
    if not width > 0:
        raise ValueError(f"kernel width must be > 0, got {width}")
    pa, pb = as_points(a), as_points(b)
    if pa.shape[1] != pb.shape[1]:
        raise ValueError(f"dimension mismatch: {pa.shape[1]} vs {pb.shape[1]}")
    sq = _pairwise_sq_dist(pa, pb)
    if kernel == "rbf":
        return np.exp(-sq / (2.0 * width * width))
    return np.exp(-np.sqrt(sq) / width)
