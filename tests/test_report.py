"""kdrun-report over a real multirun: one row per configuration, mean ± std over seeds."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys

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


def test_report_over_multirun(tmp_path):
    run_kdrun(["-m", "method=ce,label_smoothing", "seed=0,1", *TINY], cwd=tmp_path, timeout=600)
    sweeps = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(sweeps) == 1
    sweep = sweeps[0]
    summaries = [json.loads(p.read_text()) for p in sweep.rglob("summary.json")]
    assert len(summaries) == 4
    proc = subprocess.run(
        [sys.executable, "-m", "kdrun.report", str(sweep)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "label_smoothing" in proc.stdout and "4 runs, 2 configurations" in proc.stdout
    with (sweep / "report.csv").open() as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"ce", "label_smoothing"}
    for method, row in rows.items():
        accs = [s["test/acc1"] for s in summaries if s["method"] == method]
        assert int(row["n"]) == 2 and row["seeds"] == "0 1"
        assert float(row["test/acc1"]) == statistics.fmean(accs)
        assert float(row["test/acc1:std"]) == statistics.stdev(accs)
    md = (sweep / "report.md").read_text()
    assert md.count("| synthetic |") == 2
    assert (sweep / "plots" / "compare_test_acc1.png").is_file()


def test_report_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kdrun.report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("kdrun-report: error: no finished run")
