"""Plots written next to a run (``kdrun.plots``).

Contract
--------
``save_reliability_diagram(logits, labels, n_bins, png_path, json_path, title=None) -> dict``
draws a reliability diagram -- per-bin accuracy bars over equal-width top-label-confidence bins
``(i/n, (i+1)/n]``, the gap to the bin's mean confidence shaded, the diagonal of perfect
calibration, ECE in the legend and title -- above a histogram of the confidences (share of
samples per bin, with the overall accuracy and mean confidence marked). It writes the PNG and the
bin data as JSON (keys ``n_bins``, ``n_samples``, ``edges``, ``counts``, ``accuracy``,
``confidence``, ``ece``, ``mce``; see :func:`kdrun.metrics.reliability_bins`; the ``ece`` equals
``classification_metrics(...)["ece"]`` for the same ``n_bins``), creating parent directories;
each file is written to a temporary name and renamed into place. Returns that dict.

``save_calibration_panel(curves, png_path, title)`` draws several reliability curves on one
figure (used by ``kdrun-report``): each curve is a dict with ``label`` (shown in the legend as
given, e.g. with its ECE), ``counts``, ``accuracy`` and ``confidence`` (per bin, the format of
the JSON above, typically pooled over seeds). Top: per-bin accuracy against mean confidence of the
non-empty bins, one line per curve, with the diagonal of perfect calibration; bottom: the share of
samples per confidence bin of each curve. Writes the PNG atomically.

matplotlib is imported lazily inside the functions. Drawing uses ``matplotlib.figure.Figure`` with
the Agg canvas directly, so no GUI backend is ever touched; ``matplotlib.use("Agg")`` is called
only if ``matplotlib.pyplot`` has not been imported yet (switching the backend of an already
imported pyplot would close the caller's figures).
"""

from __future__ import annotations

import os
import sys

from torch import Tensor

from kdrun.atomic import atomic_write, atomic_write_json
from kdrun.metrics import confidence_and_correct, reliability_bins

__all__ = ["save_calibration_panel", "save_reliability_diagram"]


def save_reliability_diagram(
    logits: Tensor,
    labels: Tensor,
    n_bins: int,
    png_path: str | os.PathLike,
    json_path: str | os.PathLike,
    title: str | None = None,
) -> dict:
    """Write the reliability diagram PNG and its bin data JSON; return the bin data dict."""
    conf, correct = confidence_and_correct(logits, labels)
    data = reliability_bins(conf, correct, n_bins)

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = data["n_samples"]
    nb = data["n_bins"]
    edges = data["edges"]
    counts = data["counts"]
    acc = data["accuracy"]
    cnf = data["confidence"]
    width = 1.0 / nb
    left = edges[:-1]
    full = [i for i in range(nb) if counts[i] > 0]
    overall_acc = sum(counts[i] * acc[i] for i in full) / n
    overall_conf = sum(counts[i] * cnf[i] for i in full) / n

    fig = Figure(figsize=(5.5, 6.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax, hx = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})

    ax.plot([0, 1], [0, 1], ls="--", color="0.45", lw=1.2, label="Perfect calibration", zorder=3)
    ax.bar(
        [left[i] for i in full],
        [acc[i] for i in full],
        width=width,
        align="edge",
        color="#4C72B0",
        edgecolor="#1f3b63",
        lw=0.8,
        label="Accuracy",
        zorder=2,
    )
    # gap between accuracy and mean confidence: filled above an over-confident bar, hatch-only
    # over the bar where the model is under-confident (so the accuracy bar stays visible)
    gap_face, gap_edge = (0.87, 0.52, 0.32, 0.35), "#C44E52"
    over = [i for i in full if cnf[i] >= acc[i]]
    under = [i for i in full if cnf[i] < acc[i]]
    for bins, face, edge, z in ((over, gap_face, gap_edge, 2), (under, "none", "#F4A582", 2.5)):
        ax.bar(
            [left[i] for i in bins],
            [abs(cnf[i] - acc[i]) for i in bins],
            bottom=[min(acc[i], cnf[i]) for i in bins],
            width=width,
            align="edge",
            facecolor=face,
            edgecolor=edge,
            hatch="//",
            lw=0.8,
            zorder=z,
        )
    handles, _ = ax.get_legend_handles_labels()
    handles.append(
        Patch(
            facecolor=gap_face,
            edgecolor=gap_edge,
            hatch="//",
            label=f"Gap (ECE = {100 * data['ece']:.2f}%)",
        )
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("auto")
    ax.set_ylabel("Accuracy")
    ax.grid(True, color="0.9", lw=0.6, zorder=0)
    ax.legend(handles=handles, loc="best", frameon=True, fontsize=9)
    head = title if title else "Reliability diagram"
    ax.set_title(
        f"{head}\nECE {100 * data['ece']:.2f}%  MCE {100 * data['mce']:.2f}%  (N = {n}, {nb} bins)",
        fontsize=10,
    )

    hx.bar(
        left,
        [100.0 * c / n for c in counts],
        width=width,
        align="edge",
        color="0.6",
        edgecolor="0.3",
        lw=0.8,
        zorder=2,
    )
    hx.axvline(overall_acc, color="#4C72B0", lw=1.5, ls="-", label=f"Accuracy {overall_acc:.3f}")
    hx.axvline(
        overall_conf, color="#C44E52", lw=1.5, ls="--", label=f"Mean confidence {overall_conf:.3f}"
    )
    hx.set_xlim(0, 1)
    hx.set_xlabel("Confidence (max softmax probability)")
    hx.set_ylabel("% of samples")
    hx.grid(True, axis="y", color="0.9", lw=0.6, zorder=0)
    hx.legend(loc="best", fontsize=8, framealpha=0.9)

    atomic_write(png_path, lambda p: fig.savefig(p, format="png"))
    atomic_write_json(json_path, data)
    return data


def save_calibration_panel(curves: list[dict], png_path: str | os.PathLike, title: str) -> None:
    """Write one figure with the reliability curve of every entry of ``curves``."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = colormaps["tab10" if len(curves) <= 10 else "tab20"].colors
    markers = "osD^vP*Xph"
    height = 8.0 + 0.22 * (len(curves) + 1)
    fig = Figure(figsize=(7.0, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax, hx = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.1]})
    ax.plot([0, 1], [0, 1], ls="--", color="0.45", lw=1.2, label="Perfect calibration")
    for i, curve in enumerate(curves):
        color, marker = colors[i % len(colors)], markers[i % len(markers)]
        counts = curve["counts"]
        full = [b for b, c in enumerate(counts) if c > 0]
        ax.plot(
            [curve["confidence"][b] for b in full],
            [curve["accuracy"][b] for b in full],
            color=color,
            marker=marker,
            ms=5,
            lw=1.6,
            label=curve["label"],
        )
        n_bins, total = len(counts), sum(counts)
        centers = [(b + 0.5) / n_bins for b in range(n_bins)]
        hx.plot(
            centers,
            [100.0 * c / total for c in counts],
            color=color,
            marker=marker,
            ms=3.5,
            lw=1.3,
            drawstyle="steps-mid",
        )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.01, 1.02)  # markers at 0 and 1 stay whole
    ax.set_ylabel("Accuracy in the confidence bin")
    ax.grid(True, color="0.9", lw=0.6)
    ax.set_title(title, fontsize=10)
    # below the axes, so that it never hides a curve (under-confident ones run top left,
    # over-confident ones bottom right)
    fig.legend(loc="outside lower center", fontsize=9, frameon=True, ncols=1)
    hx.set_xlabel("Confidence (max softmax probability); top: mean confidence of each bin")
    hx.set_ylabel("% of samples")
    hx.grid(True, color="0.9", lw=0.6)
    atomic_write(png_path, lambda p: fig.savefig(p, format="png"))
