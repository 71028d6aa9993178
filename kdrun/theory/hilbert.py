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

Everything is float64 numpy; nothing here imports matplotlib, hydra or rich.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

KERNELS: tuple[str, ...] = ("rbf", "laplace")
EFFECTIVE_THRESHOLD = 0.1
TOY_DATA = "mobahi_toy.json"

__all__ = [
    "KERNELS",
    "Dataset",
    "HilbertModel",
    "HilbertRun",
    "Round",
    "as_points",
    "bracket",
    "kernel_matrix",
    "load_data",
    "parse_clean_function",
    "self_distill",
    "solve_c",
]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# The root solve for c
# --------------------------------------------------------------------------------------------
def bracket(d: np.ndarray, y_norm: float, K: int, eps: float) -> tuple[float, float]:
    """``[d_min, d_max] * sqrt(K eps) / (||y|| - sqrt(K eps))`` (requires ``||y||^2 > K eps``)."""
    s = math.sqrt(K * eps)
    scale = s / (y_norm - s)
    return float(np.min(d) * scale), float(np.max(d) * scale)


def solve_c(z: np.ndarray, d: np.ndarray, K: int, eps: float) -> tuple[float, float, float] | None:
    """Root ``c`` of ``sum_k (c/(c+d_k))^2 z_k^2 = K eps`` and its bracket ``(c, lo, hi)``.

    ``z = V^T y`` are the targets in the eigenbasis of ``G`` (eigenvalues ``d > 0``). Returns
    ``None`` when ``||z||^2 <= K eps`` (the constraint is met by ``f = 0``: collapse). The left-hand
    side increases strictly in ``c`` from 0 to ``||z||^2``, so the root is unique. It is found in
    ``u = log c`` inside the analytic bracket ``[lo, hi]`` (widened by 1e-9 relative against
    rounding) by a safeguarded Newton iteration (``rtsafe``): a Newton step on the monotone, smooth
    function is taken when it stays inside the current sign-change bracket and converges fast
    enough, otherwise the bracket is bisected. It stops when the step falls below ~2 ulp of
    ``u``, so ``c`` is accurate to ~1e-14 relative (the tests compare it with scipy's brentq).
    (A hand-written solver instead of ``scipy.optimize.brentq`` keeps the CLI's start-up fast:
    importing scipy.optimize costs about a second on a loaded machine; the tests compare both.)
    """
    z = np.asarray(z, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    target = K * eps
    z2 = z * z
    y_norm = math.sqrt(float(np.sum(z2)))
    if y_norm * y_norm <= target:
        return None
    lo, hi = bracket(d, y_norm, K, eps)

    def h_and_slope(u: float) -> tuple[float, float]:
        c = math.exp(u)
        r = c / (c + d)
        w = r * r * z2
        # h(u) = sum r^2 z^2 / (K eps) - 1;  dh/du = sum 2 r^2 z^2 d/(c+d) / (K eps) > 0
        return float(np.sum(w)) / target - 1.0, 2.0 * float(np.sum(w * (d / (c + d)))) / target

    a, b = math.log(lo) - 1e-9, math.log(hi) + 1e-9
    ha, hb = h_and_slope(a)[0], h_and_slope(b)[0]
    # In exact arithmetic h(lo) <= 0 <= h(hi); widen only if rounding says otherwise.
    for _ in range(200):
        if ha <= 0.0 <= hb:
            break
        if ha > 0.0:
            a -= 1e-6 * (1.0 + abs(a))
            ha = h_and_slope(a)[0]
        if hb < 0.0:
            b += 1e-6 * (1.0 + abs(b))
            hb = h_and_slope(b)[0]
    else:  # pragma: no cover - defensive
        raise RuntimeError("could not bracket the root for c")
    if ha == 0.0:
        return math.exp(a), lo, hi
    if hb == 0.0:
        return math.exp(b), lo, hi
    # rtsafe (Numerical Recipes): Newton when it stays inside the bracket and converges fast
    # enough, bisection otherwise; the bracket [a, b] always keeps h(a) < 0 < h(b).
    u = 0.5 * (a + b)
    dx_old = dx = b - a
    hu, slope = h_and_slope(u)
    for _ in range(200):
        if hu == 0.0:
            break
        if hu < 0.0:
            a = u
        else:
            b = u
        newton_leaves = ((u - b) * slope - hu) * ((u - a) * slope - hu) > 0.0
        if newton_leaves or abs(2.0 * hu) > abs(dx_old * slope):
            dx_old, dx = dx, 0.5 * (b - a)
            u = a + dx
        else:
            dx_old, dx = dx, hu / slope
            u = u - dx
        if abs(dx) <= 2.0 * np.finfo(np.float64).eps * max(1.0, abs(u)):
            break
        hu, slope = h_and_slope(u)
    else:  # pragma: no cover - defensive
        raise RuntimeError("root solve for c did not converge")
    return math.exp(u), lo, hi


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
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
        """The JSON record of ``hilbert.json``."""
        return {
            "t": self.t,
            "c": self.c,
            "c_lower": self.c_lower,
            "c_upper": self.c_upper,
            "y_norm": self.y_norm,
            "b": [float(v) for v in self.b],
            "n_effective": self.n_effective,
            "train_mse": self.train_mse,
            "test_mse": self.test_mse,
        }


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
        return {
            "eps": self.eps,
            "kernel": self.kernel,
            "width": self.width,
            "collapsed_at": self.collapsed_at,
            "collapse_lower_bound": self.collapse_lower_bound,
            "rounds": [r.to_dict() for r in self.rounds],
        }


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
_SAFE_FUNCS: dict[str, Any] = {
    name: getattr(np, name)
    for name in (
        "sin",
        "cos",
        "tan",
        "exp",
        "log",
        "sqrt",
        "abs",
        "tanh",
        "sinh",
        "cosh",
        "arctan",
        "sign",
    )
}
_SAFE_CONSTS = {"pi": math.pi, "e": math.e}
_SAFE_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Call,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.Pow,
    ast.USub,
    ast.UAdd,
)


def parse_clean_function(expr: str) -> Callable[[np.ndarray], np.ndarray]:
    """Turn an arithmetic expression in ``x`` (e.g. ``"sin(2*pi*x)"``) into a vectorised function.

    Only numbers, ``x``, ``pi``, ``e``, ``+ - * / **`` and the numpy functions
    ``sin cos tan exp log sqrt abs tanh sinh cosh arctan sign`` are accepted: the string is parsed
    and checked, never executed as arbitrary Python.
    """
    try:
        tree = ast.parse(str(expr).strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"clean_function {expr!r} is not a valid expression") from err
    for node in ast.walk(tree):
        if not isinstance(node, _SAFE_NODES):
            raise ValueError(f"clean_function {expr!r}: {type(node).__name__} is not allowed")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
            raise ValueError(f"clean_function {expr!r}: only numeric constants are allowed")
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in _SAFE_FUNCS and not node.keywords
        ):
            raise ValueError(
                f"clean_function {expr!r}: allowed functions are {', '.join(_SAFE_FUNCS)}"
            )
        if isinstance(node, ast.Name) and node.id not in {"x", *_SAFE_CONSTS, *_SAFE_FUNCS}:
            raise ValueError(f"clean_function {expr!r}: unknown name {node.id!r}")
    code = compile(tree, "<clean_function>", "eval")

    def f(x: np.ndarray) -> np.ndarray:
        env = {"__builtins__": {}, **_SAFE_FUNCS, **_SAFE_CONSTS, "x": np.asarray(x, np.float64)}
        return np.asarray(eval(code, env), dtype=np.float64)  # noqa: S307 - checked AST above

    return f


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
