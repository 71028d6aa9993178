"""The scalar root solve of one Hilbert-space training round.

Contract: ``solve_c(z, d, K, eps)`` returns the unique ``c > 0`` with
``sum_k (c / (c + d_k))^2 z_k^2 = K eps`` and its analytic bracket as ``(c, lo, hi)``, or
``None`` when ``||z||^2 <= K eps`` (collapse: ``f = 0`` already meets the constraint);
``bracket(d, ||y||, K, eps)`` is that bracket,
``[d_min, d_max] * sqrt(K eps) / (||y|| - sqrt(K eps))``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["bracket", "solve_c"]


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
