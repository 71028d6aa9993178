"""Figures of ``kdrun-report``: comparison bars and per-dataset calibration panels.

Contract
--------
* :func:`write_compare_plots` — ``plots/compare_<metric>.png`` for each metric of
  :data:`PLOT_METRICS` some configuration has: one bar per configuration that has it (mean, std
  error bar over seeds); overrides shared by all bars go into the title.
* :func:`write_calibration_panels` — ``plots/calibration_<dataset>.png`` for every dataset of the
  report: the reliability curve of every configuration of that dataset on one figure
  (:func:`kdrun.plots.save_calibration_panel`). Curves come from the diagram data each run saved
  at its last evaluation (``plots/reliability_test.json``; ``plots/reliability_val.json`` for
  the validation split; in the ``validation`` protocol ``reliability_test.json`` is on the
  validation split). Per configuration the bins are pooled over seeds (counts summed, accuracy
  and confidence count-weighted: the diagram of all seeds' predictions together); the legend
  gives the mean ± std over seeds of the saved ECE. The test split is drawn when any
  configuration of the dataset has it; a dataset that also has validation diagrams gets
  ``calibration_<dataset>_val.png`` too. A dataset without any diagram gets a panel saying so.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from kdrun.report.runs import Configuration, Run
from kdrun.report.stats import summarize

PLOT_METRICS = [
    "test/acc1",
    "test_at_best/acc1",
    "val/acc1",
    "test/ece",
    "val/ece",
    "test/nll",
    "test/aurc",
]
SPLIT_NAMES = {"test": "test set", "val": "validation split"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def distinguishing_labels(configs: list[Configuration]) -> tuple[list[str], str]:
    """Per configuration its method plus the overrides (and model) not shared by all; the shared
    overrides as one string."""
    token_sets = [set(c.overrides.split()) for c in configs]
    common = set.intersection(*token_sets) if token_sets else set()
    several_models = len({c.model for c in configs}) > 1
    labels = []
    for c, tokens in zip(configs, token_sets):
        extra = sorted(tokens - common)
        head = f"{c.method} ({c.model})" if several_models else c.method
        labels.append(" ".join([head, *extra]))
    return labels, " ".join(sorted(common))


def write_compare_plots(configs: list[Configuration], out: Path) -> list[Path]:
    plt = _pyplot()
    written = []
    for key in PLOT_METRICS:
        rows = [c for c in configs if key in c.metrics]
        if not rows:
            continue
        labels, subtitle = distinguishing_labels(rows)
        labels = [label.replace(" ", "\n") for label in labels]
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 1), 3.5))
        means = [c.metrics[key].mean for c in rows]
        stds = [c.metrics[key].std if c.n > 1 else 0.0 for c in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(rows)), labels, fontsize=8, rotation=30 if len(rows) > 6 else 0)
        ax.set_ylabel(key)
        title = f"{key} (mean ± std over seeds)"
        ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
        if key.endswith("acc1"):
            ax.set_ylim(max(0.0, min(means) - 0.05), min(1.0, max(means) + 0.03))
        fig.tight_layout()
        path = out / "plots" / f"compare_{key.replace('/', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def run_diagrams(run: Run) -> dict[str, Path]:
    """Saved reliability data of a run by split (``test`` / ``val``)."""
    plots = run.path / "plots"
    found = {}
    last_eval = plots / "reliability_test.json"
    if last_eval.is_file():
        found["val" if run.protocol == "validation" else "test"] = last_eval
    if (plots / "reliability_val.json").is_file():
        found["val"] = plots / "reliability_val.json"
    return found


def read_diagram(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        n_bins = int(data["n_bins"])
        if not all(len(data[k]) == n_bins for k in ("counts", "accuracy", "confidence")):
            return None
        return data
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pool_diagrams(diagrams: list[dict[str, Any]]) -> dict[str, Any]:
    """Bins of all seeds together: counts summed, accuracy and confidence count-weighted."""
    n_bins = diagrams[0]["n_bins"]
    counts = [sum(d["counts"][b] for d in diagrams) for b in range(n_bins)]

    def weighted(key: str, b: int) -> float:
        if counts[b] == 0:
            return 0.0
        return math.fsum(d["counts"][b] * d[key][b] for d in diagrams) / counts[b]

    return {
        "n_bins": n_bins,
        "counts": counts,
        "accuracy": [weighted("accuracy", b) for b in range(n_bins)],
        "confidence": [weighted("confidence", b) for b in range(n_bins)],
        "ece": summarize([d["ece"] for d in diagrams]),
    }


def curve_label(label: str, pooled: dict[str, Any]) -> str:
    ece = pooled["ece"]
    seeds = f"{ece.n} seed" + ("s" if ece.n != 1 else "")
    if ece.n > 1:
        return f"{label}: ECE {100 * ece.mean:.2f} ± {100 * ece.std:.2f} % ({seeds})"
    return f"{label}: ECE {100 * ece.mean:.2f} % ({seeds})"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def panel_curves(configs: list[Configuration], split: str) -> tuple[list[dict], list[str]]:
    """The pooled, labelled curve of every configuration with diagrams of ``split``; notes about
    diagrams left out."""
    notes = []
    labels, _ = distinguishing_labels(configs)
    curves = []
    for config, label in zip(configs, labels):
        diagrams = []
        for run in config.runs:
            source = run_diagrams(run).get(split)
            data = read_diagram(source) if source else None
            if data is None:
                continue
            if diagrams and data["n_bins"] != diagrams[0]["n_bins"]:
                notes.append(f"{source}: {data['n_bins']} bins, not {diagrams[0]['n_bins']}")
                continue
            diagrams.append(data)
        if diagrams:
            pooled = pool_diagrams(diagrams)
            curves.append({**pooled, "label": curve_label(label, pooled)})
    return curves, notes


def calibration_panel(
    configs: list[Configuration], dataset: str, split: str, path: Path
) -> list[str]:
    """Draw one panel; return notes about diagrams left out."""
    from kdrun.plots import save_calibration_panel

    curves, notes = panel_curves(configs, split)
    title = f"{dataset}: reliability on the {SPLIT_NAMES[split]} (last model), pooled over seeds"
    common = distinguishing_labels(configs)[1]
    if common:
        title += f"\n{common}"
    if not curves:
        title += "\nno run of this dataset saved reliability data (plots/reliability_*.json)"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_calibration_panel(curves, path, title)
    return notes


def write_calibration_panels(
    configs: list[Configuration], out: Path
) -> tuple[list[Path], list[str]]:
    written, notes = [], []
    datasets = list(dict.fromkeys(c.dataset for c in configs))
    for dataset in datasets:
        members = [c for c in configs if c.dataset == dataset]
        splits = {s for c in members for r in c.runs for s in run_diagrams(r)}
        primary = "test" if "test" in splits or not splits else "val"
        path = out / "plots" / f"calibration_{safe_name(dataset)}.png"
        notes += calibration_panel(members, dataset, primary, path)
        written.append(path)
        if primary == "test" and "val" in splits:
            path = out / "plots" / f"calibration_{safe_name(dataset)}_val.png"
            notes += calibration_panel(members, dataset, "val", path)
            written.append(path)
    return written, notes
