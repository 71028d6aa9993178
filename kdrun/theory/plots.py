"""Plots of the Hilbert-space self-distillation experiment (docs/theory.md).

Contract: ``plot_all(runs, out_dir)`` writes four PNGs into ``out_dir`` and returns their paths:

* ``fitted_functions.png`` — one panel per eps: training data, clean function (if known) and
  ``f_t`` for every round, coloured by round (1-D inputs; for n-D inputs, ``f_t(X)`` against ``y_0``);
* ``b_diag.png`` — one panel per eps: ``diag(B_t)`` as grouped bars per eigen-direction (ordered by
  decreasing eigenvalue ``d_k``), one bar per round, log scale;
* ``c_bracket.png`` — one panel per eps: ``c_t`` with its analytic bracket, log scale;
* ``test_error.png`` — test MSE against round for every eps (train MSE against ``y_0`` when the
  clean function is unknown), and ``||y_t||`` with the collapse threshold ``sqrt(K eps)``.

matplotlib is imported lazily (Agg backend), so importing this module costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .hilbert import HilbertRun

MAX_BAR_DIRECTIONS = 40
DPI = 100
# figure margins and the gap between rows of panels, in inches
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_BOTTOM, ROW_GAP = 0.85, 0.25, 0.65, 1.0


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(
    plt: Any, n: int, panel: tuple[float, float] = (6.4, 4.2), top: float = 0.75
) -> tuple[Any, list[Any]]:
    """Figure with ``n`` panels in up to two columns and fixed margins (in inches).

    Fixed margins instead of ``tight_layout``: the latter measures every tick label and costs
    about a second per figure on a slow CPU (the CLI must finish in a few seconds).
    """
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    width, height = panel[0] * ncols, panel[1] * nrows + top
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    _margins(fig, width, height, top=top, nrows=nrows)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _margins(fig: Any, width: float, height: float, *, top: float, nrows: int = 1) -> None:
    """Fixed margins in inches: ``top`` as given, the others ``MARGIN_*``, ``ROW_GAP`` between
    rows of panels."""
    # hspace is a fraction of the axes height; convert the wanted gap in inches.
    ax_h = (height - top - MARGIN_BOTTOM - (nrows - 1) * ROW_GAP) / nrows
    fig.subplots_adjust(
        left=MARGIN_LEFT / width,
        right=1 - MARGIN_RIGHT / width,
        bottom=MARGIN_BOTTOM / height,
        top=1 - top / height,
        wspace=0.28,
        hspace=ROW_GAP / ax_h if nrows > 1 else 0.0,
    )


def _finish(plt: Any, fig: Any, path: Path, title: str, **suptitle_kw: Any) -> Path:
    """Title the figure, write it to ``path``, close it; return ``path``."""
    fig.suptitle(title, **suptitle_kw)
    # zlib level 1: ~4x faster PNG encoding than the default 6, files ~1.5x larger.
    fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return path


def _per_eps_figure(
    runs: list[HilbertRun],
    path: Path,
    draw_panel: Callable[[Any, Any, HilbertRun], None],
    title: str,
    *,
    panel: tuple[float, float] = (6.4, 4.2),
    top: float = 0.75,
    **suptitle_kw: Any,
) -> Path:
    """One panel per eps, filled by ``draw_panel(plt, ax, run)``; then ``_finish``."""
    plt = _plt()
    fig, axes = _grid(plt, len(runs), panel=panel, top=top)
    for ax, run in zip(axes, runs):
        draw_panel(plt, ax, run)
    return _finish(plt, fig, path, title, **suptitle_kw)


def _sparse_log_ticks(ax: Any, minor: bool = False) -> None:
    """Log y-axis with at most ~7 labelled decades and minor ticks only at 2x and 5x (or none).

    Matplotlib's default eight minor ticks per decade dominate the drawing time of these small
    figures; 2 and 5 keep short ranges readable.
    """
    import matplotlib.ticker as mticker

    ax.yaxis.set_major_locator(mticker.LogLocator(base=10, numticks=7))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(_plain_label))
    if minor:
        ax.yaxis.set_minor_locator(mticker.LogLocator(base=10, subs=(2.0, 5.0), numticks=7))
        ax.yaxis.set_minor_formatter(mticker.FuncFormatter(_plain_label))
    else:
        ax.yaxis.set_minor_locator(mticker.NullLocator())


def _plain_label(value: float, _pos: Any = None) -> str:
    """Tick label without mathtext (``0.01``, ``2e-05``): mathtext parsing is slow."""
    return f"{value:g}"


def _title(run: HilbertRun) -> str:
    end = (
        f"collapse at round {run.collapsed_at}"
        if run.collapsed_at is not None
        else f"no collapse in {run.max_rounds} rounds"
    )
    return f"eps = {run.eps:g}: {len(run.rounds)} rounds, {end}"


def _round_colors(plt: Any, n: int) -> list[Any]:
    cmap = plt.get_cmap("viridis")
    return [cmap(0.9 * (t - 1) / max(n - 1, 1)) for t in range(1, n + 1)]


def _round_handles(colors: list[Any], kind: str = "line") -> list[Any]:
    """Legend entries for the round colour scale: first, middle and last round.

    (A legend instead of a colorbar: a colorbar is an extra axes and costs ~0.1 s per panel.)
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(colors)
    shown = sorted({1, (n + 1) // 2, n}) if n else []
    if kind == "line":
        return [Line2D([], [], color=colors[t - 1], lw=1.6, label=f"round t = {t}") for t in shown]
    return [Patch(color=colors[t - 1], label=f"round t = {t}") for t in shown]


def _kernel_label(run: HilbertRun) -> str:
    return f"{run.kernel} kernel, width {run.width:g}"


def _draw_fitted_functions(plt: Any, ax: Any, run: HilbertRun) -> None:
    colors = _round_colors(plt, len(run.rounds))
    one_d = run.x.shape[1] == 1 and run.x_grid is not None
    if one_d:
        xg = np.asarray(run.x_grid).reshape(-1)
        if run.clean_grid is not None:
            ax.plot(xg, run.clean_grid, "k--", lw=1.5, label="clean function", zorder=3)
        for r, col in zip(run.rounds, colors):
            ax.plot(xg, r.f_grid, color=col, lw=1.4)
        best = run.best_round
        if best is not None:
            ax.plot(
                xg,
                run.rounds[best - 1].f_grid,
                color="darkorange",
                lw=2.6,
                alpha=0.9,
                label=f"best round t = {best}",
                zorder=4,
            )
        ax.plot(run.x[:, 0], run.y0, "o", color="crimson", ms=6, label="training data y_0")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.3 * (hi - lo))  # headroom for the legend
        ax.set_xlabel("x")
        ax.set_ylabel("f_t(x)")
    else:
        lim = float(np.max(np.abs(run.y0))) * 1.1
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=1, label="f = y_0")
        for r, col in zip(run.rounds, colors):
            ax.plot(run.y0, r.y, "o", color=col, ms=4)
        ax.set_xlabel("training target y_0")
        ax.set_ylabel("f_t at training points")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_title(_title(run), fontsize=10, y=1.0)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + _round_handles(colors), loc="upper right", fontsize=7, ncols=2)
    ax.grid(alpha=0.3)


def plot_fitted_functions(runs: list[HilbertRun], path: Path) -> Path:
    title = f"Self-distillation rounds f_t ({_kernel_label(runs[0])})"
    return _per_eps_figure(runs, path, _draw_fitted_functions, title)


def _draw_b_diag(plt: Any, ax: Any, run: HilbertRun) -> None:
    n_dir = min(len(run.d), MAX_BAR_DIRECTIONS)
    n_rounds = len(run.rounds)
    colors = _round_colors(plt, n_rounds)
    width = 0.85 / max(n_rounds, 1)
    idx = np.arange(n_dir)
    if n_rounds:
        # One PolyCollection instead of n_rounds * n_dir Rectangle patches (much faster).
        from matplotlib.collections import PolyCollection

        heights = np.array([r.b[:n_dir] for r in run.rounds])  # [rounds, directions]
        positive = heights[heights > 0]  # entries can underflow after very many rounds
        floor = float(positive.min()) / 3.0 if positive.size else 1e-300
        verts, facecolors = [], []
        for i, col in enumerate(colors):
            left = idx + (i - n_rounds / 2) * width
            for x0, h in zip(left, heights[i]):
                verts.append([(x0, floor), (x0, h), (x0 + width, h), (x0 + width, floor)])
                facecolors.append(col)
        ax.add_collection(PolyCollection(verts, facecolors=facecolors, edgecolors="none"))
        ax.set_xlim(-0.6, n_dir - 0.4)
        ax.set_ylim(floor, 1.6)
    ax.set_yscale("log")
    _sparse_log_ticks(ax)
    ax.set_xticks(idx)
    ax.set_xticklabels([str(k + 1) for k in idx], fontsize=7 if n_dir > 20 else 9)
    ax.set_xlabel("eigen-direction k (decreasing eigenvalue d_k)")
    ax.set_ylabel("diag(B_t)_k")
    ax.axhline(1.0, color="grey", lw=0.6)
    shown = "" if n_dir == len(run.d) else f" (first {n_dir} of {len(run.d)} directions)"
    neff = ", ".join(str(r.n_effective) for r in run.rounds)
    ax.set_title(f"{_title(run)}{shown}\nn_effective (b/b_max > 0.1): {neff}", fontsize=9, y=1.0)
    ax.grid(alpha=0.3, axis="y")
    if n_rounds:
        ax.legend(handles=_round_handles(colors, "patch"), loc="lower left", fontsize=7)


def plot_b_diag(runs: list[HilbertRun], path: Path) -> Path:
    title = f"Spectral shrinkage diag(B_t) = prod d/(c_i+d) ({_kernel_label(runs[0])})"
    return _per_eps_figure(runs, path, _draw_b_diag, title, panel=(7.0, 4.4), top=1.0)


def _draw_c_bracket(plt: Any, ax: Any, run: HilbertRun) -> None:
    t = np.array([r.t for r in run.rounds])
    c = np.array([r.c for r in run.rounds])
    lo = np.array([r.c_lower for r in run.rounds])
    hi = np.array([r.c_upper for r in run.rounds])
    if len(t):
        ax.fill_between(t, lo, hi, color="tab:blue", alpha=0.18, label="bracket [lower, upper]")
        ax.plot(t, lo, "-", color="tab:blue", lw=0.8, alpha=0.6)
        ax.plot(t, hi, "-", color="tab:blue", lw=0.8, alpha=0.6)
        ax.plot(t, c, "o-", color="tab:red", label="c_t (root)")
    ax.set_yscale("log")
    _sparse_log_ticks(ax, minor=True)
    ax.set_xlabel("round t")
    ax.set_ylabel("c_t")
    ax.set_title(_title(run), fontsize=10, y=1.0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def plot_c_bracket(runs: list[HilbertRun], path: Path) -> Path:
    title = (
        "Regularisation c_t and its bracket [d_min, d_max]·sqrt(K eps)/(||y_(t-1)|| - sqrt(K eps))"
        f"\n({_kernel_label(runs[0])})"
    )
    return _per_eps_figure(
        runs, path, _draw_c_bracket, title, panel=(5.6, 3.8), top=0.9, fontsize=11
    )


def plot_test_error(runs: list[HilbertRun], path: Path) -> Path:
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    _margins(fig, 12.5, 4.8, top=0.75)
    has_clean = any(r.test_mse is not None for run in runs for r in run.rounds)
    cmap = plt.get_cmap("plasma")
    K = runs[0].x.shape[0]
    for i, run in enumerate(runs):
        col = cmap(0.85 * i / max(len(runs) - 1, 1))
        t = [r.t for r in run.rounds]
        err = [r.test_mse if has_clean else r.train_mse for r in run.rounds]
        label = f"eps = {run.eps:g}"
        if run.collapsed_at is not None:
            label += f" (collapse at {run.collapsed_at})"
        ax.plot(t, err, "o-", color=col, label=label, ms=4)
        best = run.best_round if has_clean else None
        if best is not None:
            ax.plot([best], [run.rounds[best - 1].test_mse], "*", color=col, ms=15, mec="k")
        if run.collapsed_at is not None and run.rounds and has_clean and run.clean_grid is not None:
            # The collapsed round returns f = 0, whose test MSE is mean(clean^2).
            zero_mse = float(np.mean(run.clean_grid**2))
            ax.plot([t[-1], run.collapsed_at], [err[-1], zero_mse], ":", color=col)
            ax.plot([run.collapsed_at], [zero_mse], "X", color=col, ms=8, mec="k")
        ax2.plot(
            [0, *t],
            [float(np.linalg.norm(run.y0)), *[r.y_norm for r in run.rounds]],
            "o-",
            color=col,
            ms=4,
            label=label,
        )
        ax2.axhline(math.sqrt(K * run.eps), color=col, ls=":", lw=1.2)
    ax.set_xlabel("round t")
    if has_clean:
        ax.set_ylabel("test MSE vs clean function")
        ax.set_title("Test error per round (star: best round; X: collapse, f = 0)", y=1.0)
    else:
        ax.set_ylabel("train MSE vs y_0")
        ax.set_title("Training error against y_0 per round (no clean function)", y=1.0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.3 * (hi - lo))  # headroom for the legend
    ax.legend(fontsize=8, loc="upper right", ncols=2)
    ax2.set_yscale("log")
    _sparse_log_ticks(ax2, minor=True)
    ax2.set_xlabel("round t (0 = data)")
    ax2.set_ylabel("||y_t||")
    ax2.set_title("||y_t|| = ||f_t(X)||  (dotted: collapse threshold sqrt(K eps))", y=1.0)
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return _finish(plt, fig, path, f"Self-distillation in Hilbert space ({_kernel_label(runs[0])})")


def plot_all(runs: list[HilbertRun], out_dir: str | Path) -> list[Path]:
    """Write the four plots (listed above) into ``out_dir`` (created) and return their paths."""
    if not runs:
        raise ValueError("no runs to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_fitted_functions(runs, out / "fitted_functions.png"),
        plot_b_diag(runs, out / "b_diag.png"),
        plot_c_bracket(runs, out / "c_bracket.png"),
        plot_test_error(runs, out / "test_error.png"),
    ]
