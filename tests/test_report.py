"""kdrun-report: aggregation over seeds, paired comparison with a baseline, protocol labels,
calibration panels.

One test runs a real multirun through the CLI; the others build run dirs in the format kdrun
writes (``summary.json``, ``run.json``, ``.hydra/overrides.yaml`` and ``config.yaml``,
``plots/reliability_test.json`` from :func:`kdrun.metrics.reliability_bins`) with chosen numbers,
and check the statistics against ``scipy.stats``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from kdrun.metrics import reliability_bins
from kdrun.report import main as report_main
from kdrun.report.figures import panel_curves, pool_diagrams
from kdrun.report.runs import find_runs, group_configurations, read_run
from kdrun.report.stats import paired_difference, summarize
from tests.conftest import run_kdrun

TINY = [
    "dataset=synthetic",
    "dataset.options.train_size=96",
    "dataset.options.test_size=48",
    "dataset.options.image_size=8",
    "hardware=cpu",
    "logger=none",
    "trainer.epochs=1",
    "trainer.batch_size=32",
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def check_against_scipy(row: dict[str, str], baseline: list[float], method: list[float]) -> None:
    """One report_baseline.csv row against scipy on the same paired numbers."""
    diffs = np.asarray(method) - np.asarray(baseline)
    ttest = stats.ttest_rel(method, baseline)
    low, high = stats.t.interval(
        0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs, ddof=1)
    )
    assert int(row["pairs"]) == len(diffs) and int(row["df"]) == len(diffs) - 1
    assert float(row["diff_mean"]) == pytest.approx(diffs.mean(), rel=1e-12, abs=1e-15)
    assert float(row["t"]) == pytest.approx(ttest.statistic, rel=1e-9)
    assert float(row["p"]) == pytest.approx(ttest.pvalue, rel=1e-9)
    assert float(row["diff_ci95_low"]) == pytest.approx(low, rel=1e-9)
    assert float(row["diff_ci95_high"]) == pytest.approx(high, rel=1e-9)


def test_report_over_multirun(tmp_path):
    run_kdrun(["-m", "method=ce,label_smoothing", "seed=0,1", *TINY], cwd=tmp_path, timeout=600)
    sweeps = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(sweeps) == 1
    sweep = sweeps[0]
    summaries = [json.loads(p.read_text()) for p in sweep.rglob("summary.json")]
    assert len(summaries) == 4
    proc = subprocess.run(
        [sys.executable, "-m", "kdrun.report", str(sweep), "--baseline", "ce"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "label_smoothing" in proc.stdout and "4 runs, 2 configurations" in proc.stdout
    rows = {r["method"]: r for r in read_csv(sweep / "report.csv")}
    assert set(rows) == {"ce", "label_smoothing"}
    for method, row in rows.items():
        accs = [s["test/acc1"] for s in summaries if s["method"] == method]
        assert int(row["n"]) == 2 and row["seeds"] == "0 1" and row["protocol"] == "test"
        assert float(row["test/acc1"]) == statistics.fmean(accs)
        assert float(row["test/acc1:std"]) == statistics.stdev(accs)
    # the paired difference of every metric, against scipy on the runs' own numbers
    by_seed = {(s["method"], s["seed"]): s for s in summaries}
    compared = {r["metric"]: r for r in read_csv(sweep / "report_baseline.csv")}
    assert {"test/acc1", "test/nll", "test/ece", "test/acc1_max"} <= set(compared)
    for metric in ("test/nll", "test/ece", "test/brier"):
        row = compared[metric]
        assert row["baseline"] == "ce" and row["method"] == "label_smoothing"
        base = [by_seed["ce", s][metric] for s in (0, 1)]
        other = [by_seed["label_smoothing", s][metric] for s in (0, 1)]
        check_against_scipy(row, base, other)
    assert "paired difference vs ce" in proc.stdout
    md = (sweep / "report.md").read_text()
    assert md.count("| synthetic |") == 2
    assert "## Protocol: no validation split" in md and "## Paired difference vs ce" in md
    assert (sweep / "plots" / "compare_test_acc1.png").is_file()
    assert (sweep / "plots" / "calibration_synthetic.png").stat().st_size > 10_000
    assert "![calibration_synthetic](plots/calibration_synthetic.png)" in md


def test_report_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kdrun.report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("kdrun-report: error: no finished run")


# ---- run dirs in kdrun's format, with chosen numbers --------------------------------------


def diagram(seed: int, n: int = 400, skew: float = 0.0) -> dict:
    """Reliability data of a plausible classifier, as kdrun saves it."""
    gen = torch.Generator().manual_seed(seed)
    conf = 0.3 + 0.7 * torch.rand(n, generator=gen) ** (0.5 + skew)
    correct = torch.rand(n, generator=gen) < conf - 0.1 * skew
    return reliability_bins(conf, correct, n_bins=15)


def make_run(
    root: Path,
    name: str,
    summary: dict,
    overrides: list[str],
    status: str | None = "finished",
    monitor: str | None = None,
    reliability: dict | None = None,
) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    base = {"model": "small_cnn", "epochs": 2, "params": 98682, "world_size": 1, "amp": "bf16"}
    (run / "summary.json").write_text(json.dumps({**base, **summary}, indent=2))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"seed": summary["seed"], "eval": {"n_bins": 15, "batch_size": 512}}
    if monitor:
        config["eval"]["monitor"] = monitor
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if status is not None:
        (run / "run.json").write_text(json.dumps({"status": status, "fingerprint": "0" * 16}))
    if reliability is not None:
        (run / "plots").mkdir()
        (run / "plots" / "reliability_test.json").write_text(json.dumps(reliability))
    return run


def test_summary_interval_is_scipy_t_interval():
    values = [0.9012, 0.8874, 0.9153, 0.8931]
    s = summarize(values)
    low, high = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    assert (s.n, s.mean, s.std) == (4, statistics.fmean(values), statistics.stdev(values))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    one = summarize([0.5])
    assert one.mean == 0.5 and all(math.isnan(v) for v in (one.std, one.ci_low, one.ci_high))


def test_paired_difference_is_scipy_ttest_rel():
    base = {0: 0.812, 1: 0.797, 2: 0.825, 3: 0.801, 7: 0.79}
    other = {0: 0.824, 1: 0.803, 2: 0.829, 3: 0.818, 9: 0.85}
    d = paired_difference(base, other)
    assert d.seeds == (0, 1, 2, 3) and d.only_baseline == (7,) and d.only_method == (9,)
    ttest = stats.ttest_rel([other[s] for s in d.seeds], [base[s] for s in d.seeds])
    diffs = [other[s] - base[s] for s in d.seeds]
    low, high = stats.t.interval(0.95, 3, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert d.t == pytest.approx(ttest.statistic, rel=1e-12)
    assert d.p == pytest.approx(ttest.pvalue, rel=1e-12)
    assert (d.ci_low, d.ci_high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    # all differences equal: scipy gives +-inf with p = 0, or NaN when they are all 0
    same = paired_difference({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5})
    with warnings.catch_warnings():  # scipy warns about the zero variance it handles
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = tuple(stats.ttest_rel([1.5, 2.5], [1.0, 2.0]))
    assert (same.t, same.p) == (math.inf, 0.0) == expected
    zero = paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert math.isnan(zero.t) and math.isnan(zero.p)


def three_seed_sweep(root: Path) -> dict:
    """ce on seeds 0-3, ps_kd on seeds 0, 1, 2, 5: what a report over it must pair."""
    numbers = {
        ("ce", 0): (0.901, 0.051),
        ("ce", 1): (0.884, 0.062),
        ("ce", 2): (0.912, 0.048),
        ("ce", 3): (0.893, 0.055),
        ("ps_kd", 0): (0.907, 0.031),
        ("ps_kd", 1): (0.899, 0.035),
        ("ps_kd", 2): (0.915, 0.029),
        ("ps_kd", 5): (0.920, 0.030),
    }
    for i, ((method, seed), (acc, ece)) in enumerate(numbers.items()):
        summary = {
            "method": method,
            "dataset": "digits",
            "seed": seed,
            "eval_split": "test",
            "train_time_s": 1.0 + 0.1 * i,
            "test/acc1": acc,
            "test/ece": ece,
            "test/nll": 0.3 + ece,
            "test/acc1_best": acc + 0.004,
            "test/acc1_best_epoch": 2,
        }
        skew = 0.0 if method == "ce" else 0.4
        make_run(
            root,
            str(i),
            summary,
            [f"method={method}", f"seed={seed}", "trainer.epochs=2", "logger=none"],
            reliability=diagram(seed, skew=skew),
        )
    return numbers


def test_baseline_pairs_seeds_and_lists_the_missing(tmp_path, capsys):
    numbers = three_seed_sweep(tmp_path / "sweep")
    assert report_main([str(tmp_path / "sweep"), "--baseline", "ce"]) == 0
    out = capsys.readouterr().out
    assert "8 runs, 2 configurations" in out
    assert "ps_kd vs ce: missing seeds: 3 (ce only), 5 (ps_kd only)" in out
    rows = {r["metric"]: r for r in read_csv(tmp_path / "sweep" / "report_baseline.csv")}
    assert set(rows) >= {"test/acc1", "test/ece", "test/nll", "test/acc1_max", "train_time_s"}
    for metric, index in (("test/acc1", 0), ("test/ece", 1)):
        row = rows[metric]
        assert row["seeds"] == "0 1 2" and row["baseline_only_seeds"] == "3"
        assert row["method_only_seeds"] == "5"
        base = [numbers["ce", s][index] for s in (0, 1, 2)]
        other = [numbers["ps_kd", s][index] for s in (0, 1, 2)]
        check_against_scipy(row, base, other)
    # the terminal shows the same numbers: acc1 difference in points, its interval and p
    d = paired_difference(
        {s: numbers["ce", s][0] for s in (0, 1, 2, 3)},
        {s: numbers["ps_kd", s][0] for s in (0, 1, 2, 5)},
    )
    line = next(x for x in out.splitlines() if "│ test acc1 % " in x and "ps_kd" in x)
    cells = [c.strip() for c in line.split("│")[1:-1]]
    assert cells == [
        "ps_kd",
        "test acc1 %",
        "3",
        f"{100 * d.baseline_mean:.2f}",
        f"{100 * d.method_mean:.2f}",
        f"{100 * d.mean:+.2f}",
        f"[{100 * d.ci_low:+.2f}, {100 * d.ci_high:+.2f}]",
        f"{d.p:.3f}",
    ]
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "- ps_kd vs ce: missing seeds: 3 (ce only), 5 (ps_kd only)" in md


def test_several_runs_of_one_seed_are_averaged_before_pairing(tmp_path, capsys):
    root = tmp_path / "runs"
    accs = {("ce", 0, "a"): 0.80, ("ce", 0, "b"): 0.84, ("ce", 1, "a"): 0.90}
    accs |= {("ps_kd", 0, "a"): 0.85, ("ps_kd", 1, "a"): 0.91}
    for (method, seed, sweep), acc in accs.items():
        summary = {"method": method, "dataset": "digits", "seed": seed, "test/acc1": acc}
        make_run(root / sweep, f"{method}{seed}", summary, [f"method={method}", f"seed={seed}"])
    assert report_main([str(root), "--baseline", "ce", "--no-plots"]) == 0
    assert "ce: several runs of seed 0; the mean of each seed's runs is paired" in (
        capsys.readouterr().out
    )
    row = next(r for r in read_csv(root / "report_baseline.csv") if r["metric"] == "test/acc1")
    check_against_scipy(row, [0.82, 0.90], [0.85, 0.91])


def test_test_selected_figures_are_never_called_best(tmp_path, capsys):
    three_seed_sweep(tmp_path / "sweep")
    assert report_main([str(tmp_path / "sweep"), "--baseline", "ce"]) == 0
    out = capsys.readouterr().out
    sweep = tmp_path / "sweep"
    for name, text in [
        ("stdout", out),
        ("report.md", (sweep / "report.md").read_text()),
        ("report.csv", (sweep / "report.csv").read_text()),
        ("report_baseline.csv", (sweep / "report_baseline.csv").read_text()),
    ]:
        assert "best" not in text.lower(), name
    assert "test acc1 max % (test-selected)" in out
    assert "picked on the test set itself" in (sweep / "report.md").read_text()
    row = next(r for r in read_csv(sweep / "report.csv") if r["method"] == "ce")
    assert float(row["test/acc1_max"]) == pytest.approx(
        statistics.fmean([0.905, 0.888, 0.916, 0.897])
    )


def test_protocols_are_labelled_and_kept_apart(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (0, 1):
        # validation split, model selected on it, test set once at the end
        make_run(
            root,
            f"select{seed}",
            {
                "method": "ce",
                "dataset": "digits",
                "seed": seed,
                "eval_split": "validation",
                "val/acc1": 0.95 + 0.01 * seed,
                "test/acc1": 0.91 + 0.01 * seed,
                "test_at_best/acc1": 0.92 + 0.01 * seed,
                "test/ece": 0.05,
            },
            ["seed=" + str(seed), "dataset.val_fraction=0.1"],
            monitor="val/nll",
        )
        # older validation-split runs: test/* keys of the summary are on the validation split
        make_run(
            root,
            f"legacy{seed}",
            {
                "method": "ce",
                "dataset": "digits",
                "seed": seed,
                "eval_split": "validation",
                "test/acc1": 0.96,
                "test/acc1_best": 0.97,
                "test/ece": 0.04,
            },
            ["seed=" + str(seed), "dataset.val_fraction=0.2"],
        )
    # a pruned trial and a run without run.json (kept)
    make_run(
        root,
        "pruned",
        {"method": "ce", "dataset": "digits", "seed": 3, "test/acc1": 0.5},
        ["seed=3"],
        status="pruned",
    )
    make_run(
        root,
        "plain",
        {"method": "ce", "dataset": "digits", "seed": 0, "test/acc1": 0.9},
        ["seed=0"],
        status=None,
    )
    assert report_main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "5 runs, 3 configurations" in out
    assert "1 run(s) with status 'pruned' not included" in out and str(root / "pruned") in out
    md = (root / "report.md").read_text()
    for heading in ("selected on validation", "validation split only", "no validation split"):
        assert f"## Protocol: {heading}" in md
    assert "the model selected on val/nll" in md
    rows = {r["overrides"]: r for r in read_csv(root / "report.csv")}
    select, legacy = rows["dataset.val_fraction=0.1"], rows["dataset.val_fraction=0.2"]
    assert select["protocol"] == "val_select" and legacy["protocol"] == "validation"
    assert float(select["test_at_best/acc1"]) == pytest.approx(0.925)
    # older validation runs: renamed, never shown as test figures
    assert float(legacy["val/acc1"]) == 0.96 and float(legacy["val/acc1_max"]) == 0.97
    assert legacy["test/acc1"] == "" and legacy["test/ece"] == ""
    section = md.split("## Protocol: validation split only")[1].split("## ")[0]
    assert "val acc1 %" in section and "test acc1" not in section
    section = md.split("## Protocol: selected on validation")[1].split("## ")[0]
    assert "test acc1 at best val %" in section and "92.50 ± 0.71" in section


def test_calibration_panel_per_dataset_pools_seeds(tmp_path, capsys):
    root = tmp_path / "runs"
    diagrams = {}
    for i, (dataset, method, seed) in enumerate(
        [(d, m, s) for d in ("digits", "fashion_mnist") for m in ("ce", "ps_kd") for s in (0, 1)]
    ):
        diagrams[dataset, method, seed] = diagram(10 * i + seed, skew=0.4 * (method == "ps_kd"))
        make_run(
            root,
            f"{dataset}-{method}-{seed}",
            {"method": method, "dataset": dataset, "seed": seed, "test/acc1": 0.9},
            [f"method={method}", f"dataset={dataset}", f"seed={seed}"],
            reliability=diagrams[dataset, method, seed],
        )
    assert report_main([str(root), "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    plots = tmp_path / "report" / "plots"
    for dataset in ("digits", "fashion_mnist"):
        assert (plots / f"calibration_{dataset}.png").stat().st_size > 10_000
    # pooling the seeds' bins is the diagram of all their predictions together
    gen = torch.Generator().manual_seed(0)
    parts = [(torch.rand(300, generator=gen), torch.rand(300, generator=gen) < 0.7)]
    parts.append((torch.rand(200, generator=gen) ** 0.3, torch.rand(200, generator=gen) < 0.8))
    pooled = pool_diagrams([reliability_bins(c, k, 15) for c, k in parts])
    together = reliability_bins(torch.cat([c for c, _ in parts]), torch.cat([k for _, k in parts]))
    assert pooled["counts"] == together["counts"]
    assert pooled["accuracy"] == pytest.approx(together["accuracy"], abs=1e-6)
    assert pooled["confidence"] == pytest.approx(together["confidence"], abs=1e-6)
    # one curve per method of the dataset, its bins pooled over the seeds, its ECE in the legend
    configs = group_configurations([read_run(r) for r in find_runs([root])])
    curves, notes = panel_curves([c for c in configs if c.dataset == "digits"], "test")
    assert notes == [] and len(curves) == 2
    for curve, method in zip(curves, ("ce", "ps_kd")):
        seeds = [diagrams["digits", method, s] for s in (0, 1)]
        eces = [100 * d["ece"] for d in seeds]
        assert curve["counts"] == [a + b for a, b in zip(*(d["counts"] for d in seeds))]
        ece = f"{statistics.fmean(eces):.2f} ± {statistics.stdev(eces):.2f} %"
        assert curve["label"] == f"{method}: ECE {ece} (2 seeds)"


def test_unknown_baseline_is_a_one_line_error(tmp_path, capsys):
    three_seed_sweep(tmp_path / "sweep")
    assert report_main([str(tmp_path / "sweep"), "--baseline", "kd", "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "kdrun-report: error: --baseline kd: no finished run of that method "
        "(methods here: ce, ps_kd)"
    )
