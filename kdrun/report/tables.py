"""Tables of ``kdrun-report``: the terminal (rich), ``report.md``, ``report.csv`` and
``report_baseline.csv``.

Contract
--------
* One table per evaluation protocol present (:data:`kdrun.report.runs.PROTOCOLS`), each titled
  with its protocol, one row per configuration, columns :func:`protocol_columns` (shown when
  some row has them). Accuracy, ECE, AURC are shown as percent / x1000 as in the PS-KD paper.
  Terminal cells are ``mean ± std`` over seeds, plus the 95 % interval of the first column;
  markdown cells are ``mean ± std [95 % t-interval]``; one seed shows the value alone.
* Labels say how a figure was selected: the maximum over epochs of the test accuracy is
  ``test acc1 max (test-selected)`` with a note under the table; the test accuracy of the model
  selected on validation is ``test acc1 at best val``.
* ``report.csv``: one row per configuration, for every numeric summary key ``K``: ``K`` (mean),
  ``K:std``, ``K:ci95_low``, ``K:ci95_high`` (empty when undefined).
* With a baseline: per context a table of method − baseline per metric (seed-matched pairs, mean
  difference, its 95 % t-interval, paired t-test p-value), the missing seeds of each pair listed
  under it; ``report_baseline.csv`` has one row per (pair, metric) for every compared key.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdrun.report.compare import Comparison, context_of, method_label
from kdrun.report.runs import PROTOCOLS, Configuration, Run, numeric_keys
from kdrun.report.stats import SeedSummary

Column = tuple[str, str, float]  # (summary key, header, scale)

ACCURACY_COLUMNS: dict[str, list[Column]] = {
    "test": [
        ("test/acc1", "test acc1 %", 100),
        ("test/acc1_max", "test acc1 max % (test-selected)", 100),
    ],
    "val_select": [
        ("test/acc1", "test acc1 %", 100),
        ("test_at_best/acc1", "test acc1 at best val %", 100),
        ("val/acc1", "val acc1 %", 100),
    ],
    "validation": [
        ("val/acc1", "val acc1 %", 100),
        ("val/acc1_max", "val acc1 max %", 100),
    ],
}
CALIBRATION_COLUMNS: list[Column] = [
    ("nll", "NLL", 1),
    ("ece", "ECE %", 100),
    ("ece_adaptive", "adaECE %", 100),
    ("aurc", "AURC x1e3", 1000),
    ("eaurc", "E-AURC x1e3", 1000),
    ("brier", "Brier", 1),
]
OTHER_COLUMNS: list[Column] = [
    ("data/fraction_used", "data used %", 100),
    ("train_time_s", "time s", 1),
]
PROTOCOL_SHORT = {
    "test": "no validation split, test set every epoch",
    "validation": "validation split only",
    "val_select": "selected on validation",
}
NOTES = {
    "test/acc1_max": (
        "test acc1 max (test-selected): the highest test accuracy over the epochs, picked on "
        "the test set itself. It is optimistic and not a result; the last-epoch test acc1 is "
        "the figure to report."
    ),
    "val/acc1_max": "val acc1 max: the highest validation accuracy over the epochs.",
}
CELL_NOTE = (
    "Cells: mean ± std over seeds [95 % t-interval of the mean, "
    "mean ± t(0.975, n−1)·std/√n]; a single seed shows its value alone."
)
DIFF_NOTE = (
    "Δ = method − baseline per seed, on the seeds both have; the 95 % t-interval of the mean "
    "difference and the two-sided paired t-test p-value. Accuracy: higher is better; NLL, ECE, "
    "AURC, Brier, time: lower is better."
)


def protocol_columns(protocol: str) -> list[Column]:
    split = "val" if protocol == "validation" else "test"
    calibration = [(f"{split}/{k}", h, s) for k, h, s in CALIBRATION_COLUMNS]
    return ACCURACY_COLUMNS[protocol] + calibration + OTHER_COLUMNS


def columns_present(configs: list[Configuration], protocol: str) -> list[Column]:
    return [c for c in protocol_columns(protocol) if any(c[0] in r.metrics for r in configs)]


def protocol_title(protocol: str, configs: list[Configuration]) -> str:
    monitors = sorted({c.monitor for c in configs if c.monitor})
    monitor = ", ".join(monitors) if monitors else "the validation metric (eval.monitor)"
    return PROTOCOLS[protocol].format(monitor=monitor)


def by_protocol(configs: list[Configuration]) -> dict[str, list[Configuration]]:
    out: dict[str, list[Configuration]] = {}
    for protocol in PROTOCOLS:
        members = [c for c in configs if c.protocol == protocol]
        if members:
            out[protocol] = members
    return out


def digits_for(value: float) -> int:
    return 2 if abs(value) < 1000 else 0


def fmt_value(value: float, scale: float, digits: int, signed: bool = False) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value * scale:{'+' if signed else ''}.{digits}f}"


def fmt_interval(low: float, high: float, scale: float, digits: int, signed=False) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "-"
    return f"[{fmt_value(low, scale, digits, signed)}, {fmt_value(high, scale, digits, signed)}]"


def fmt_summary(stat: SeedSummary | None, scale: float, interval: bool = False) -> str:
    if stat is None:
        return "-"
    d = digits_for(stat.mean * scale)
    if stat.n < 2:
        return fmt_value(stat.mean, scale, d)
    text = f"{fmt_value(stat.mean, scale, d)} ± {fmt_value(stat.std, scale, d)}"
    if interval:
        text += " " + fmt_interval(stat.ci_low, stat.ci_high, scale, d)
    return text


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_seeds(seeds: list[Any]) -> str:
    return " ".join(str(s) for s in seeds)


def notes_for(columns: list[Column]) -> list[str]:
    return [NOTES[key] for key, _, _ in columns if key in NOTES]


def pair_notes(c: Comparison) -> list[str]:
    """The seeds left out of the pairs, and seeds with several runs (their mean is paired)."""
    notes = []
    parts = []
    if c.only_baseline:
        parts.append(f"{fmt_seeds(c.only_baseline)} ({c.baseline.method} only)")
    if c.only_method:
        parts.append(f"{fmt_seeds(c.only_method)} ({method_label(c.method)} only)")
    if parts:
        notes.append(
            f"{method_label(c.method)} vs {method_label(c.baseline)}: missing seeds: "
            + ", ".join(parts)
            + " — left out of the pairs"
        )
    for config in (c.baseline, c.method):
        duplicates = config.duplicate_seeds()
        if duplicates:
            notes.append(
                f"{method_label(config)}: several runs of seed {fmt_seeds(duplicates)}; "
                "the mean of each seed's runs is paired"
            )
    return notes


def context_title(c: Comparison) -> str:
    dataset, model, overrides, protocol = context_of(c.baseline)
    return " / ".join([dataset, model, overrides or "no overrides"]) + (
        f" ({PROTOCOL_SHORT[protocol]})"
    )


def group_by_context(comparisons: list[Comparison]) -> dict[str, list[Comparison]]:
    out: dict[str, list[Comparison]] = {}
    for c in comparisons:
        out.setdefault(context_title(c), []).append(c)
    return out


def row_label(c: Comparison, members: list[Comparison]) -> str:
    """The method; with its baseline too where a context has several baseline configurations."""
    if len({id(m.baseline) for m in members}) > 1:
        return f"{method_label(c.method)} vs {method_label(c.baseline)}"
    return method_label(c.method)


def difference_cells(c: Comparison, key: str, scale: float) -> list[str] | None:
    diff = c.differences.get(key)
    if diff is None or diff.n == 0:
        return None
    d = digits_for(max(abs(diff.baseline_mean), abs(diff.method_mean)) * scale)
    return [
        str(diff.n),
        fmt_value(diff.baseline_mean, scale, d),
        fmt_value(diff.method_mean, scale, d),
        fmt_value(diff.mean, scale, d, signed=True),
        fmt_interval(diff.ci_low, diff.ci_high, scale, d, signed=True),
        fmt_p(diff.p),
    ]


DIFF_HEADERS = ["pairs", "baseline", "method", "Δ", "95 % CI of Δ", "p (paired t)"]


# ---- terminal -------------------------------------------------------------------------------


def print_tables(configs: list[Configuration], console: Console) -> None:
    for protocol, members in by_protocol(configs).items():
        cols = columns_present(members, protocol)
        console.print(f"Protocol: {protocol_title(protocol, members)}", soft_wrap=True)
        table = Table(
            title=f"kdrun report: mean ± std over seeds ({PROTOCOL_SHORT[protocol]})",
            title_justify="left",
        )
        for name in ("method", "dataset", "model", "overrides", "seeds"):
            table.add_column(name)
        for _, header, _ in cols:
            table.add_column(header, justify="right")
        if cols:
            table.add_column(f"{cols[0][1]} 95% CI", justify="right")
        for r in members:
            cells = [fmt_summary(r.metrics.get(key), scale) for key, _, scale in cols]
            if cols:
                key, _, scale = cols[0]
                stat = r.metrics.get(key)
                d = digits_for(stat.mean * scale) if stat else 2
                cells.append(fmt_interval(stat.ci_low, stat.ci_high, scale, d) if stat else "-")
            table.add_row(r.method, r.dataset, r.model, r.overrides or "-", str(r.n), *cells)
        console.print(table)
        for note in notes_for(cols):
            console.print(note, soft_wrap=True)


def print_comparisons(comparisons: list[Comparison], baseline: str, console: Console) -> None:
    for title, members in group_by_context(comparisons).items():
        cols = columns_present([members[0].baseline], members[0].baseline.protocol)
        table = Table(title=f"paired difference vs {baseline} — {title}", title_justify="left")
        table.add_column("method")
        table.add_column("metric")
        for header in DIFF_HEADERS:
            table.add_column(header.replace("baseline", baseline), justify="right")
        for c in members:
            for key, header, scale in cols:
                cells = difference_cells(c, key, scale)
                if cells:
                    table.add_row(row_label(c, members), header, *cells)
            table.add_section()
        console.print(table)
        for c in members:
            for line in pair_notes(c):
                console.print(line, soft_wrap=True)
    console.print(DIFF_NOTE, soft_wrap=True)


# ---- markdown -------------------------------------------------------------------------------


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def markdown_tables(configs: list[Configuration]) -> list[str]:
    lines = [CELL_NOTE, ""]
    for protocol, members in by_protocol(configs).items():
        cols = columns_present(members, protocol)
        lines += [f"## Protocol: {PROTOCOL_SHORT[protocol]}", "", protocol_title(protocol, members)]
        lines += [""]
        heads = ["method", "dataset", "model", "overrides", "seeds", *(c[1] for c in cols)]
        lines += [markdown_row(heads), "|" + "---|" * len(heads)]
        for r in members:
            cells = [r.method, r.dataset, r.model, r.overrides or "-", str(r.n)]
            cells += [fmt_summary(r.metrics.get(k), s, interval=True) for k, _, s in cols]
            lines.append(markdown_row(cells))
        lines.append("")
        lines += [f"*{note}*\n" for note in notes_for(cols)]
    return lines


def markdown_comparisons(comparisons: list[Comparison], baseline: str) -> list[str]:
    lines = [f"## Paired difference vs {baseline}", "", DIFF_NOTE, ""]
    for title, members in group_by_context(comparisons).items():
        cols = columns_present([members[0].baseline], members[0].baseline.protocol)
        heads = ["method", "metric", *(h.replace("baseline", baseline) for h in DIFF_HEADERS)]
        lines += [f"### {title}", "", markdown_row(heads), "|" + "---|" * len(heads)]
        for c in members:
            for key, header, scale in cols:
                cells = difference_cells(c, key, scale)
                if cells:
                    lines.append(markdown_row([row_label(c, members), header, *cells]))
        lines.append("")
        notes = [line for c in members for line in pair_notes(c)]
        lines += [f"- {line}" for line in notes] + [""]
    return lines


def excluded_lines(excluded: dict[str, list[Run]]) -> list[str]:
    """One line per run status left out of the tables."""
    return [
        f"{len(runs)} run(s) with status '{status}' not included: "
        + ", ".join(str(r.path) for r in runs)
        for status, runs in excluded.items()
    ]


def write_markdown(
    path: Path,
    configs: list[Configuration],
    sources: list[Path],
    comparisons: list[Comparison] | None,
    baseline: str | None,
    unmatched: list[Configuration],
    excluded: dict[str, list[Run]],
    panels: list[Path],
) -> None:
    n_runs = sum(c.n for c in configs)
    lines = [
        f"# kdrun report ({len(configs)} configurations, {n_runs} runs)",
        "",
        "Sources: " + ", ".join(str(s) for s in sources),
        "",
        *markdown_tables(configs),
    ]
    if baseline is not None:
        lines += markdown_comparisons(comparisons or [], baseline)
        lines += [f"- {line}" for line in unmatched_lines(unmatched, baseline)] + [""]
    if excluded:
        lines += ["## Runs not included", ""]
        lines += [f"- {line}" for line in excluded_lines(excluded)] + [""]
    if panels:
        lines += ["## Calibration", ""]
        for panel in panels:
            rel = panel.relative_to(path.parent) if panel.is_relative_to(path.parent) else panel
            lines += [f"![{panel.stem}]({rel.as_posix()})", ""]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    path.write_text(text.rstrip() + "\n")


def unmatched_lines(unmatched: list[Configuration], baseline: str) -> list[str]:
    return [
        f"{method_label(c)} on {c.dataset}/{c.model} {c.overrides or ''}".rstrip()
        + f": no {baseline} run with the same dataset, model and overrides"
        for c in unmatched
    ]


# ---- CSV ------------------------------------------------------------------------------------


def csv_number(value: float) -> Any:
    """NaN (undefined) as an empty cell; infinities as Python writes them."""
    return "" if math.isnan(value) else value


def write_csv(configs: list[Configuration], path: Path) -> None:
    keys = numeric_keys([r for c in configs for r in c.runs])
    stat_cols = [k + suffix for k in keys for suffix in ("", ":std", ":ci95_low", ":ci95_high")]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["method", "dataset", "model", "overrides", "protocol", "n", "seeds"] + stat_cols
        )
        for c in configs:
            row = [c.method, c.dataset, c.model, c.overrides, c.protocol, c.n, fmt_seeds(c.seeds)]
            for key in keys:
                stat = c.metrics.get(key)
                if stat is None:
                    row += ["", "", "", ""]
                else:
                    row += [csv_number(v) for v in (stat.mean, stat.std, stat.ci_low, stat.ci_high)]
            writer.writerow(row)


def write_baseline_csv(comparisons: list[Comparison], path: Path) -> None:
    head = [
        "dataset", "model", "overrides", "protocol", "baseline", "method", "metric", "pairs",
        "seeds", "baseline_mean", "method_mean", "diff_mean", "diff_std", "diff_ci95_low",
        "diff_ci95_high", "t", "df", "p", "baseline_only_seeds", "method_only_seeds",
    ]  # fmt: skip
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(head)
        for c in comparisons:
            dataset, model, overrides, protocol = context_of(c.baseline)
            for key, d in c.differences.items():
                numbers = (d.baseline_mean, d.method_mean, d.mean, d.std, d.ci_low, d.ci_high, d.t)
                writer.writerow(
                    [dataset, model, overrides, protocol, method_label(c.baseline),
                     method_label(c.method), key, d.n, fmt_seeds(list(d.seeds)),
                     *[csv_number(v) for v in numbers], d.df, csv_number(d.p),
                     fmt_seeds(c.only_baseline), fmt_seeds(c.only_method)]
                )  # fmt: skip
