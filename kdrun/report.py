"""``kdrun-report PATH...`` — aggregate finished runs into a comparison table.

PATHs may be run dirs, multirun dirs or ``outputs/``: every ``summary.json`` below them is a run.
Runs are grouped into configurations by method, dataset, model and their command-line overrides
other than ``seed`` (read from ``.hydra/overrides.yaml``; launcher and bookkeeping keys are
ignored). Each configuration gets one row: the seed count and mean ± std (sample std, ddof=1)
over seeds of every metric at the last epoch, plus best-epoch accuracy; method-specific figures
(e.g. ``data/participation``) are aggregated the same way.

Outputs: a rich table on the terminal (accuracy, ECE, AURC shown as percent / x1000 as in the
PS-KD paper), ``report.md``, ``report.csv`` (every aggregated key, mean and std columns) and
``plots/compare_<metric>.png`` (bars with std error bars) in ``--out`` (default: the first PATH
if it is a directory).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

#: shown on the terminal and in report.md: (key, header, scale)
MAIN_COLUMNS = [
    ("test/acc1", "acc1 %", 100),
    ("test/acc1_best", "best acc1 %", 100),
    ("test/nll", "NLL", 1),
    ("test/ece", "ECE %", 100),
    ("test/ece_adaptive", "adaECE %", 100),
    ("test/aurc", "AURC x1e3", 1000),
    ("test/eaurc", "E-AURC x1e3", 1000),
    ("test/brier", "Brier", 1),
    ("data/fraction_used", "data used %", 100),
    ("train_time_s", "time s", 1),
]
IGNORED_OVERRIDE_KEYS = (
    "seed",
    "hydra.",
    "launcher",
    "logger",
    "paths.",
    "resume",
    "hardware.num_workers",
    "trainer.log_every",
    "tags",
    "name",
)
PLOT_METRICS = ["test/acc1", "test/ece", "test/nll", "test/aurc"]


def find_runs(paths: list[Path]) -> list[Path]:
    runs: list[Path] = []
    for path in paths:
        if (path / "summary.json").is_file():
            runs.append(path)
        elif path.is_dir():
            runs.extend(
                sorted(p.parent for p in path.rglob("summary.json") if "wandb" not in p.parts)
            )
    return list(OrderedDict.fromkeys(runs))


def read_overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    items = yaml.safe_load(path.read_text()) or []
    return [str(o) for o in items]


def config_label(summary: dict[str, Any], overrides: list[str]) -> tuple[str, ...]:
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in ("method", "dataset", "model") or key.startswith(IGNORED_OVERRIDE_KEYS):
            continue
        kept.append(item.lstrip("+"))
    return (
        str(summary.get("method")),
        str(summary.get("dataset")),
        str(summary.get("model")),
        " ".join(sorted(kept)),
    )


def numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate(runs: list[Path]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = OrderedDict()
    for run in runs:
        try:
            summary = json.loads((run / "summary.json").read_text())
        except (OSError, ValueError):
            continue
        groups.setdefault(config_label(summary, read_overrides(run)), []).append(summary)
    rows = []
    for (method, dataset, model, overrides), summaries in groups.items():
        row: dict[str, Any] = {
            "method": method,
            "dataset": dataset,
            "model": model,
            "overrides": overrides,
            "n": len(summaries),
            "seeds": sorted({s.get("seed") for s in summaries}, key=str),
        }
        keys = sorted({k for s in summaries for k, v in s.items() if numeric(v)} - {"seed"})
        for key in keys:
            values = [float(s[key]) for s in summaries if numeric(s.get(key))]
            if not values:
                continue
            row[key] = statistics.fmean(values)
            row[key + ":std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def fmt(row: dict[str, Any], key: str, scale: float) -> str:
    if key not in row:
        return "-"
    mean, std = row[key] * scale, row.get(key + ":std", 0.0) * scale
    digits = 2 if abs(mean) < 1000 else 0
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if row["n"] > 1 else f"{mean:.{digits}f}"


def columns_present(rows: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    return [c for c in MAIN_COLUMNS if any(c[0] in r for r in rows)]


def write_markdown(rows: list[dict[str, Any]], path: Path, sources: list[Path]) -> None:
    cols = columns_present(rows)
    lines = [
        f"# kdrun report ({len(rows)} configurations)",
        "",
        "Sources: " + ", ".join(str(s) for s in sources),
        "",
        "Mean ± std over seeds at the last epoch (best acc1: best epoch).",
        "",
        "| method | dataset | model | overrides | seeds | " + " | ".join(c[1] for c in cols) + " |",
        "|" + "---|" * (5 + len(cols)),
    ]
    for r in rows:
        cells = [r["method"], r["dataset"], r["model"], r["overrides"] or "-", str(r["n"])]
        cells += [fmt(r, key, scale) for key, _, scale in cols]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = sorted(
        {k for r in rows for k in r} - {"method", "dataset", "model", "overrides", "n", "seeds"}
    )
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "dataset", "model", "overrides", "n", "seeds", *keys])
        for r in rows:
            writer.writerow(
                [
                    r["method"],
                    r["dataset"],
                    r["model"],
                    r["overrides"],
                    r["n"],
                    " ".join(str(s) for s in r["seeds"]),
                    *[r.get(k, "") for k in keys],
                ]
            )


def write_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # overrides shared by every row go into the title; labels keep only what differs
    token_sets = [set(r["overrides"].split()) for r in rows]
    common = set.intersection(*token_sets) if token_sets else set()
    labels = []
    for r, tokens in zip(rows, token_sets):
        extra = "\n".join(sorted(tokens - common))
        labels.append(f"{r['method']}\n{extra}".strip())
    subtitle = " ".join(sorted(common))
    for key in PLOT_METRICS:
        if not any(key in r for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 1), 3.5))
        means = [r.get(key, float("nan")) for r in rows]
        stds = [r.get(key + ":std", 0.0) for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(rows)), labels, fontsize=8, rotation=30 if len(rows) > 6 else 0)
        ax.set_ylabel(key)
        title = f"{key} (mean ± std over seeds)"
        ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
        finite = [m for m in means if math.isfinite(m)]
        if key.endswith("acc1") and finite:
            ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.03))
        fig.tight_layout()
        path = out / "plots" / f"compare_{key.replace('/', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def print_table(rows: list[dict[str, Any]], console: Console) -> None:
    cols = columns_present(rows)
    table = Table(title="kdrun report: mean ± std over seeds (last epoch)")
    for name in ("method", "dataset", "model", "overrides", "seeds"):
        table.add_column(name)
    for _, header, _ in cols:
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(
            r["method"],
            r["dataset"],
            r["model"],
            r["overrides"] or "-",
            str(r["n"]),
            *[fmt(r, key, scale) for key, _, scale in cols],
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdrun-report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        default=[Path("outputs")],
        help="run dirs, multirun dirs or outputs/ (default: outputs)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write report.md/.csv and plots (default: first PATH)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the comparison plots")
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:  # files and pipes get the whole table, not an 80-column squeeze
        console = Console(width=220)
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"kdrun-report: error: {missing[0]} does not exist", file=sys.stderr)
        return 2
    runs = find_runs(args.paths)
    if not runs:
        print(
            f"kdrun-report: error: no finished run (summary.json) under "
            f"{', '.join(map(str, args.paths))}",
            file=sys.stderr,
        )
        return 2
    rows = aggregate(runs)
    out = args.out or (args.paths[0] if args.paths[0].is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    print_table(rows, console)
    write_markdown(rows, out / "report.md", args.paths)
    write_csv(rows, out / "report.csv")
    plots = [] if args.no_plots else write_plots(rows, out)
    console.print(
        f"{len(runs)} runs, {len(rows)} configurations -> {out / 'report.md'}, "
        f"{out / 'report.csv'}" + (f", {len(plots)} plots" if plots else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
