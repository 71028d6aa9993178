"""``HilbertModel``: loss-constrained kernel regression on fixed training points in closed form,
and the self-distillation rounds on it (the model is stated in ``kdrun.theory.hilbert``).

Contract: the constructor eigen-decomposes ``G = g(X, X)/K`` once (eigenvalues decreasing) and
rejects mismatched, non-finite or singular input with a ``ValueError``; ``fit`` is one training,
``run(eps, ...)`` the whole sequence of rounds as a ``HilbertRun``; the other methods are the
closed forms (``b_diag``, ``closed_form_targets``, the one-shot ``equivalent_kernel``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .kernels import as_points, kernel_matrix
from .results import HilbertRun, Round
from .solver import solve_c

EFFECTIVE_THRESHOLD = 0.1

__all__ = ["EFFECTIVE_THRESHOLD", "HilbertModel"]


class HilbertModel:
    """Loss-constrained kernel ridge regression on fixed training points, in closed form.

    ``G = g(X, X)/K`` is eigen-decomposed once at construction; every round is then a
    scalar root solve plus matrix-vector products.
    """

    def __init__(self, x: Any, y: Any, kernel: str = "rbf", width: float = 0.08) -> None:
        self.X = as_points(x)
        self.y0 = np.asarray(y, dtype=np.float64).reshape(-1)
        self.K = self.X.shape[0]
        if self.y0.shape[0] != self.K:
            raise ValueError(f"x has {self.K} points but y has {self.y0.shape[0]} values")
        if self.K < 2:
            raise ValueError("need at least 2 training points")
        if not (np.all(np.isfinite(self.X)) and np.all(np.isfinite(self.y0))):
            raise ValueError("x and y must be finite")
        self.kernel = kernel
        self.width = float(width)
        self.G = kernel_matrix(self.X, self.X, kernel, self.width) / self.K
        d, V = np.linalg.eigh(self.G)
        order = np.argsort(d)[::-1]
        self.d = d[order]
        self.V = V[:, order]
        if not self.d[-1] > 0:
            raise ValueError(
                f"Gram matrix is numerically singular (d_min = {self.d[-1]:.3g}): "
                "remove duplicate points or use a smaller kernel width"
            )

    # -- single pieces -----------------------------------------------------------------------
    @property
    def condition_number(self) -> float:
        return float(self.d[0] / self.d[-1])

    def gram_to(self, x_new: Any) -> np.ndarray:
        """``g(x_new, X) / K``, shape ``[M, K]``."""
        return kernel_matrix(x_new, self.X, self.kernel, self.width) / self.K

    def fit(self, y: Any, eps: float) -> tuple[np.ndarray, tuple[float, float, float]] | None:
        """One training on targets ``y``: ``(alpha, (c, lo, hi))`` with ``alpha = (cI+G)^{-1} y``
        (so ``f(x) = g(x, X)/K · alpha``), or ``None`` on collapse (``f = 0``)."""
        z = self.V.T @ np.asarray(y, dtype=np.float64)
        sol = solve_c(z, self.d, self.K, eps)
        if sol is None:
            return None
        c = sol[0]
        return self.V @ (z / (c + self.d)), sol

    def b_diag(self, cs: Sequence[float]) -> np.ndarray:
        """``diag(B_t) = prod_{i<=t} d / (c_i + d)`` for ``cs = [c_1, ..., c_t]``."""
        b = np.ones_like(self.d)
        for c in cs:
            b = b * (self.d / (c + self.d))
        return b

    def closed_form_targets(self, cs: Sequence[float]) -> np.ndarray:
        """``y_t = V B_t V^T y_0`` (``cs = []`` gives ``y_0``)."""
        return self.V @ (self.b_diag(cs) * (self.V.T @ self.y0))

    def equivalent_weights(self, cs: Sequence[float]) -> np.ndarray:
        """``1/(c_t + d) · prod_{i<t} d/(c_i + d)``: the spectrum of the one-shot round-t solve."""
        if len(cs) == 0:
            raise ValueError("need at least one round")
        return self.b_diag(cs[:-1]) / (cs[-1] + self.d)

    def equivalent_kernel(self, x_new: Any, cs: Sequence[float]) -> np.ndarray:
        """Matrix ``k_t(x_new, X) = g(x_new, X)/K · V diag(w_t) V^T`` with ``f_t(x) = k_t(x, X) y_0``."""
        return self.gram_to(x_new) @ (self.V * self.equivalent_weights(cs)) @ self.V.T

    def predict_equivalent(self, x_new: Any, cs: Sequence[float]) -> np.ndarray:
        """``f_t(x_new)`` from the one-shot equivalent kernel applied to ``y_0``."""
        return self.equivalent_kernel(x_new, cs) @ self.y0

    def collapse_lower_bound(self, eps: float) -> float:
        """``(||y_0|| / sqrt(K eps) - 1) / (d_max / d_min)``."""
        s = math.sqrt(self.K * eps)
        return float((np.linalg.norm(self.y0) / s - 1.0) / self.condition_number)

    # -- the whole self-distillation run ----------------------------------------------------
    def run(
        self,
        eps: float,
        max_rounds: int = 20,
        x_grid: Any = None,
        clean: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> HilbertRun:
        """Rounds ``t = 1..max_rounds`` (stopping at collapse) of self-distillation at ``eps``.

        ``x_grid``: optional test points (any shape accepted by the kernel); ``clean``: the clean
        function evaluated on ``x_grid`` (as a 1-D array) for ``test_mse``.
        """
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if int(max_rounds) < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        g_grid = None if x_grid is None else self.gram_to(x_grid)
        clean_grid = None
        if clean is not None:
            if x_grid is None:
                raise ValueError("a clean function needs test points x_grid")
            grid = as_points(x_grid)
            arg = grid[:, 0] if grid.shape[1] == 1 else grid
            clean_grid = np.broadcast_to(np.asarray(clean(arg), dtype=np.float64), (len(grid),))
        rounds: list[Round] = []
        collapsed_at: int | None = None
        y_prev = self.y0.copy()
        cs: list[float] = []
        for t in range(1, int(max_rounds) + 1):
            sol = self.fit(y_prev, eps)
            if sol is None:
                collapsed_at = t
                break
            alpha, (c, lo, hi) = sol
            cs.append(c)
            y_t = self.G @ alpha
            b = self.b_diag(cs)
            f_grid = None if g_grid is None else g_grid @ alpha
            test_mse = None
            if clean_grid is not None and f_grid is not None:
                test_mse = float(np.mean((f_grid - clean_grid) ** 2))
            rounds.append(
                Round(
                    t=t,
                    c=c,
                    c_lower=lo,
                    c_upper=hi,
                    y_norm=float(np.linalg.norm(y_t)),
                    b=b,
                    n_effective=int(np.sum(b / b.max() > EFFECTIVE_THRESHOLD)),
                    train_mse=float(np.mean((y_t - self.y0) ** 2)),
                    target_mse=float(np.mean((y_t - y_prev) ** 2)),
                    test_mse=test_mse,
                    y=y_t,
                    f_grid=f_grid,
                )
            )
            y_prev = y_t
        return HilbertRun(
            eps=float(eps),
            kernel=self.kernel,
            width=self.width,
            max_rounds=int(max_rounds),
            rounds=rounds,
            collapsed_at=collapsed_at,
            collapse_lower_bound=self.collapse_lower_bound(eps),
            d=self.d.copy(),
            x=self.X.copy(),
            y0=self.y0.copy(),
            x_grid=None if x_grid is None else np.asarray(x_grid, dtype=np.float64),
            clean_grid=clean_grid,
        )
