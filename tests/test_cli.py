"""The ``kdrun`` command as a user runs it, in subprocesses: smoke run and run-dir contents,
W&B offline files, clear errors, resume after ``kill -9``, real CIFAR-format data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_kdrun, start_kdrun
from tests.wandb_reader import history, read_records

SMOKE = [
    "dataset=synthetic",
    "hardware=cpu",
    "trainer.epochs=2",
    "dataset.options.train_size=256",
    "dataset.options.test_size=128",
    "dataset.options.image_size=16",
]


def only_run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_smoke_run_writes_every_output(tmp_path):
    proc = run_kdrun([*SMOKE, "logger=wandb"], cwd=tmp_path)
    run = only_run_dir(tmp_path)
    for rel in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "kdrun.log",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/last.ckpt",
        "checkpoints/final.ckpt",
        "plots/reliability_test.png",
        "plots/reliability_test.json",
        "run.json",
        "wandb_id.txt",
    ):
        assert (run / rel).is_file(), rel
    summary = json.loads((run / "summary.json").read_text())
    for key in (
        "method",
        "dataset",
        "model",
        "seed",
        "epochs",
        "params",
        "train_time_s",
        "test/acc1",
        "test/acc5",
        "test/nll",
        "test/brier",
        "test/ece",
        "test/mce",
        "test/ece_adaptive",
        "test/ece_classwise",
        "test/aurc",
        "test/eaurc",
        "test/fpr95",
        "test/auroc",
        "test/acc1_max",
        "test/acc1_max_epoch",
    ):
        assert key in summary, key
    assert summary["method"] == "ce" and summary["dataset"] == "synthetic"
    assert summary["model"] == "small_cnn" and summary["epochs"] == 2
    # the synthetic set is learnable: two epochs beat chance (10 classes) by far
    assert summary["test/acc1"] > 0.3
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in events if "test/acc1" in e]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[-1]["test/acc1"] == pytest.approx(summary["test/acc1"])
    # the final table is shown
    assert "final test metrics" in proc.stdout and "test/ece" in proc.stdout
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    # checkpoints load safely; final.ckpt holds the evaluated model after the last epoch, and
    # without a validation split nothing is selected (no best.ckpt)
    final = torch.load(run / "checkpoints/final.ckpt", weights_only=True)
    assert final["epoch"] == 2 and final["metrics"]["test/acc1"] == summary["test/acc1"]
    assert not (run / "checkpoints/best.ckpt").exists()
    # W&B: an offline run in the run dir whose history holds the logged test metrics
    wandb_files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1
    rows = history(wandb_files[0])
    logged = [r for r in rows if "test/acc1" in r]
    assert len(logged) == 2
    assert logged[-1]["test/acc1"] == pytest.approx(summary["test/acc1"])
    run_id = (run / "wandb_id.txt").read_text().strip()
    assert run_id in wandb_files[0].name
    assert any(r.HasField("files") or r.HasField("history") for r in read_records(wandb_files[0]))


def test_bad_input_gives_one_clear_line(tmp_path):
    proc = run_kdrun(["trainer.epochs=abc", "logger=none"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("kdrun: error: trainer.epochs='abc'")
    assert "Traceback" not in proc.stderr + proc.stdout
    proc = run_kdrun(["method=label_smoothing", "method.eps=1.7"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "method.eps=1.7 is out of range" in proc.stderr
    proc = run_kdrun(["method=nonexistent"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "method/nonexistent" in proc.stderr and "label_smoothing" in proc.stderr
    # nothing was trained: no run dir holds a checkpoint
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))


def test_cifar100_without_data_says_what_to_download(tmp_path):
    proc = run_kdrun(
        ["dataset=cifar100", "dataset.download=false", "logger=none"], cwd=tmp_path, check=False
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "cifar-100-python" in lines[0] and str(tmp_path / "data") in lines[0]


CIFAR_RUNNER = """
import sys
from tests.fake_datasets import patched_cifar_checksums, write_fake_cifar
md5s = write_fake_cifar(sys.argv[1], which="cifar100", n_train=300, n_test=100)
with patched_cifar_checksums(md5s):
    sys.argv = ["kdrun", *sys.argv[2:]]
    from kdrun.cli import main
    main()
"""


def test_cifar100_real_format_fixture_trains(tmp_path):
    data = tmp_path / "data"
    args = [
        "dataset=cifar100",
        "trainer.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.batch_size=32",
        "logger=none",
        "hardware=cpu",
        "model=resnet8",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", CIFAR_RUNNER, str(data), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KDRUN_DATA_DIR": str(data), "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["dataset"] == "cifar100" and 0.0 <= summary["test/acc1"] <= 1.0
    assert summary["params"] > 0


def test_resume_after_kill9_matches_uninterrupted_run(tmp_path):
    args = [*SMOKE, "trainer.epochs=3", "trainer.checkpoint_every_steps=3", "logger=wandb"]
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir()
    kill_dir.mkdir()
    run_kdrun(args, cwd=ref_dir)
    proc = start_kdrun(args, cwd=kill_dir)
    wait_for_glob(kill_dir / "outputs" / "runs", "*/checkpoints/last.ckpt", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = only_run_dir(kill_dir)
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    killed_at = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert killed_at["epoch"] < 3
    # the same command again continues the same run dir and the same W&B run
    out = run_kdrun(args, cwd=kill_dir)
    assert "(resumed)" in out.stdout
    assert only_run_dir(kill_dir) == run
    ref_run = only_run_dir(ref_dir)
    ref_sum = json.loads((ref_run / "summary.json").read_text())
    new_sum = json.loads((run / "summary.json").read_text())
    for key in ("test/acc1", "test/nll", "test/ece", "test/aurc", "test/acc1_max"):
        assert new_sum[key] == ref_sum[key], key
    ref_w = torch.load(ref_run / "checkpoints/last.ckpt", weights_only=True)["model"]
    new_w = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["model"]
    for name in ref_w:
        assert torch.equal(ref_w[name], new_w[name]), name
    # metrics.jsonl has each epoch once
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if "test/acc1" in e] == [1, 2, 3]
    # W&B: the resumed fragment carries the same run id
    run_id = (run / "wandb_id.txt").read_text().strip()
    fragments = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(fragments) == 2 and all(run_id in f.name for f in fragments)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "bad.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    proc = run_kdrun([*SMOKE, "logger=none", f"resume={ckpt}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"kdrun: error: checkpoint {ckpt} is corrupt")


def test_two_runs_started_together_get_their_own_dirs(tmp_path):
    args = [sys.executable, "-m", "kdrun", *SMOKE, "trainer.epochs=1", "logger=none"]
    env = {**os.environ, "KDRUN_DATA_DIR": str(tmp_path / "data")}
    procs = [
        subprocess.Popen(
            args,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2
    assert all((r / "summary.json").is_file() for r in runs)


FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FASHION.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_one_epoch_from_debian_files(tmp_path):
    run_kdrun(
        ["dataset=fashion_mnist", "trainer.epochs=1", "logger=none"], cwd=tmp_path, timeout=600
    )
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["dataset"] == "fashion_mnist" and summary["model"] == "small_cnn"
    assert summary["test/acc1"] > 0.85
    # the files came from the Debian package, decompressed under the run's data root
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 47040016


def test_sigterm_checkpoints_and_stops_then_resumes(tmp_path):
    args = [*SMOKE, "trainer.epochs=4", "logger=none"]
    proc = start_kdrun(args, cwd=tmp_path)
    wait_for_glob(tmp_path / "outputs" / "runs", "*/checkpoints/last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    run = only_run_dir(tmp_path)
    assert json.loads((run / "run.json").read_text())["status"] == "preempted"
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert 1 <= state["epoch"] < 4
    run_kdrun(args, cwd=tmp_path)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert json.loads((run / "summary.json").read_text())["epochs"] == 4


def wait_for_glob(root: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not list(root.glob(pattern)):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"{pattern} did not appear under {root}"
        time.sleep(0.02)


TINY8 = [
    "dataset=synthetic",
    "dataset.options.train_size=64",
    "dataset.options.test_size=32",
    "dataset.options.image_size=8",
    "trainer.epochs=1",
    "trainer.batch_size=32",
    "logger=none",
    "hardware=cpu",
]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_run(tmp_path, amp):
    run_kdrun([*TINY8, f"hardware.amp={amp}", "hardware.channels_last=true"], cwd=tmp_path)
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["amp"] == amp
    assert 0.0 <= summary["test/acc1"] <= 1.0 and summary["test/nll"] > 0


@pytest.mark.slow
def test_torch_compile_run(tmp_path):
    run_kdrun([*TINY8, "hardware.compile=true"], cwd=tmp_path, timeout=900)
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["test/nll"] > 0
