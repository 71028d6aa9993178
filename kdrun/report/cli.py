"""The ``kdrun-report`` command line (contract: :mod:`kdrun.report`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from kdrun.report.compare import compare_to_baseline
from kdrun.report.figures import write_calibration_panels, write_compare_plots
from kdrun.report.runs import find_runs, group_configurations, partition_by_status, read_run
from kdrun.report.tables import (
    excluded_lines,
    print_comparisons,
    print_tables,
    unmatched_lines,
    write_baseline_csv,
    write_csv,
    write_markdown,
)


def fail(message: str) -> int:
    print(f"kdrun-report: error: {message}", file=sys.stderr)
    return 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kdrun-report", description="Aggregate finished kdrun runs into comparison tables."
    )
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
    parser.add_argument(
        "--baseline",
        metavar="METHOD",
        default=None,
        help="compare every other method with METHOD: paired differences over matching seeds",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # files and pipes get whole tables, not an 80-column squeeze
        console = Console(width=260)
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        return fail(f"{missing[0]} does not exist")
    run_dirs = find_runs(args.paths)
    if not run_dirs:
        return fail(f"no finished run (summary.json) under {', '.join(map(str, args.paths))}")
    runs = [run for run in map(read_run, run_dirs) if run is not None]
    included, excluded = partition_by_status(runs)
    if not included:
        return fail(
            "no finished run: " + "; ".join(excluded_lines(excluded))
            if excluded
            else f"no readable summary.json under {', '.join(map(str, args.paths))}"
        )
    configs = group_configurations(included)
    comparisons, unmatched = [], []
    if args.baseline is not None:
        methods = sorted({c.method for c in configs})
        if args.baseline not in methods:
            return fail(
                f"--baseline {args.baseline}: no finished run of that method "
                f"(methods here: {', '.join(methods)})"
            )
        comparisons, unmatched = compare_to_baseline(configs, args.baseline)

    out = args.out or (args.paths[0] if args.paths[0].is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    print_tables(configs, console)
    if args.baseline is not None:
        print_comparisons(comparisons, args.baseline, console)
        for line in unmatched_lines(unmatched, args.baseline):
            console.print(line, soft_wrap=True)
    for line in excluded_lines(excluded):
        console.print(line, soft_wrap=True)

    plots, panels, notes = [], [], []
    if not args.no_plots:
        plots = write_compare_plots(configs, out)
        panels, notes = write_calibration_panels(configs, out)
    for note in notes:
        console.print(f"calibration panel: skipped {note}", soft_wrap=True)
    written = [out / "report.md", out / "report.csv"]
    write_markdown(
        written[0], configs, args.paths, comparisons, args.baseline, unmatched, excluded, panels
    )
    write_csv(configs, written[1])
    if args.baseline is not None:
        written.append(out / "report_baseline.csv")
        write_baseline_csv(comparisons, written[-1])
    n_plots = len(plots) + len(panels)
    console.print(
        f"{len(included)} runs, {len(configs)} configurations -> "
        + ", ".join(map(str, written))
        + (f", {n_plots} plots" if n_plots else ""),
        soft_wrap=True,
    )
    return 0
