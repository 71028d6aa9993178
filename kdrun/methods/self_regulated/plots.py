"""The files a student writes into the run dir (main rank): ``significance.pt`` (``{"significance":
int32 [N], "epochs": E_T, "num_samples": N, "beta", "reduction"}``, reusable as
``method.significance_file``) and the teacher's significance histogram,
``plots/significance_hist.png`` and ``.json``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("kdrun")


def write_significance_files(
    counts_file: Path, png: Path, counts: torch.Tensor, data: dict[str, Any]
) -> bool:
    """``significance.pt`` (the counts and how they were made) and the histogram ``png`` with
    its ``.json`` (``data``: :func:`save_significance_hist`'s); a failure is a warning, never
    fatal. True when both were written."""
    try:
        from kdrun import checkpoint as ckpt

        ckpt.atomic_save(
            {
                "significance": counts.to(torch.int32),
                "epochs": data["epochs"],
                "num_samples": data["num_samples"],
                "beta": data["beta"],
                "reduction": data["reduction"],
            },
            counts_file,
        )
        save_significance_hist(data, png, png.with_suffix(".json"))
        return True
    except Exception as exc:  # an output file never kills training
        log.warning("significance files failed: %s", exc)
        return False


def save_significance_hist(data: dict[str, Any], png_path: Path, json_path: Path) -> None:
    """Bar chart of the number of training samples per significance value ``s = 0..E_T`` (PNG)
    and its data (JSON), each written to a temporary name and renamed into place."""
    from kdrun.atomic import atomic_write, atomic_write_json

    atomic_write_json(json_path, data, indent=1)

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values, counts = data["values"], data["counts"]
    fig = Figure(figsize=(6, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = ["#C44E52" if v == 0 else "#4C72B0" for v in values]
    ax.bar(values, counts, width=0.8, color=colors, edgecolor="#1f3b63", lw=0.6)
    ax.set_xlabel(f"significance s (participations in {data['epochs']} teacher epochs)")
    ax.set_ylabel("training samples")
    n = max(int(data["num_samples"]), 1)
    ax.set_title(
        f"teacher significance (beta={data['beta']:g}, {data['reduction']}): "
        f"{data['distinct_samples']}/{n} samples used, "
        f"{100 * data['participation']:.1f}% of N*E"
    )
    ax.title.set_fontsize(9)
    if len(values) <= 30:
        ax.set_xticks(values)
    atomic_write(png_path, lambda p: fig.savefig(p, format="png"))
