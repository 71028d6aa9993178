"""The evaluation protocol as a user runs it (``kdrun`` in subprocesses, real files read back).

With a validation split: ``val/*`` after every epoch, ``best.ckpt`` selected on ``eval.monitor``,
the test set evaluated once after the last epoch for the last model (``test/*``) and for the
selected one (``test_at_best/*``), and a teacher stage handing on its selected model. Without one:
per-epoch ``test/*``, nothing selected, no output that calls a test-selected figure "best".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdrun.data.augment import normalize_batch
from kdrun.data.datasets import build_datasets
from kdrun.metrics import classification_metrics
from kdrun.models import create_model
from tests.conftest import run_kdrun
from tests.wandb_reader import history
from tests.wandb_reader import summary as wandb_summary

SYNTHETIC = [
    "dataset=synthetic",
    "hardware=cpu",
    "dataset.options.train_size=256",
    "dataset.options.test_size=128",
    "dataset.options.image_size=16",
]
# a constant, fairly high learning rate: validation accuracy peaks before the last epoch for the
# teacher (epoch 3 of 4) and the student (epoch 3, tied at 4) of this seed
TWO_STAGE = [
    *SYNTHETIC,
    "logger=none",
    "method=tf_kd_self",
    "trainer.epochs=4",
    "schedule=constant",
    "optim.lr=0.2",
    "dataset.val_fraction=0.25",
]


def read_events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def epoch_records(events: list[dict], key: str) -> list[dict]:
    return [e for e in events if key in e]


def first_argmax(records: list[dict], key: str) -> int:
    best = max(r[key] for r in records)
    return next(int(r["epoch"]) for r in records if r[key] == best)


def accuracy_on_test_set(state: dict) -> float:
    """Top-1 accuracy of a small_cnn ``state`` on the synthetic test set, computed here."""
    data = build_datasets("synthetic", "unused", train_size=256, test_size=128, image_size=16)
    model = create_model("small_cnn", num_classes=10, in_channels=3, image_size=16)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        logits = model(normalize_batch(data.test_images, data.spec))
    return classification_metrics(logits, data.test_targets)["acc1"]


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory) -> tuple[Path, Path, str]:
    cwd = tmp_path_factory.mktemp("two_stage")
    proc = run_kdrun(
        [*TWO_STAGE, f"paths.teacher_cache={cwd / 'cache'}"],
        cwd=cwd,
        env={"OMP_NUM_THREADS": "1"},
    )
    (run,) = list((cwd / "outputs" / "runs").iterdir())
    return run, cwd / "cache", proc.stdout


def test_validation_split_selects_and_tests_once_at_the_end(two_stage_run):
    run, _, stdout = two_stage_run
    summary = json.loads((run / "summary.json").read_text())
    events = read_events(run)
    val = epoch_records(events, "val/acc1")
    assert [r["epoch"] for r in val] == [1, 2, 3, 4]  # val/* every epoch
    # test/* and test_at_best/* once, only in the final record
    test_keys = [k for e in events for k in e if k.startswith(("test/", "test_at_best/"))]
    assert test_keys and all(k in val[-1] for k in test_keys)
    assert [e["epoch"] for e in events if any(k.startswith("test") for k in e)] == [4]
    assert len(epoch_records(events, "test/acc1")) == 1
    assert len(epoch_records(events, "test_at_best/acc1")) == 1
    # best.ckpt is the epoch of the highest val/acc1 in metrics.jsonl (first on ties)
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    selected = first_argmax(val, "val/acc1")
    assert best["epoch"] == selected == summary["val/acc1_best_epoch"] == 3
    assert best["monitor"] == "val/acc1" == summary["eval_monitor"]
    assert best["value"] == summary["val/acc1_best"] == max(r["val/acc1"] for r in val)
    # test_at_best/* is the selected model on the test set, test/* the last one
    final = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True)
    assert final["epoch"] == 4
    assert not all(torch.equal(best["model"][k], final["model"][k]) for k in best["model"])
    assert summary["test_at_best/acc1"] == pytest.approx(accuracy_on_test_set(best["model"]))
    assert summary["test/acc1"] == pytest.approx(accuracy_on_test_set(final["model"]))
    assert summary["eval_split"] == "validation" and summary["val_samples"] == 64
    # the reliability data: validation per epoch, test at the end
    assert (run / "plots" / "reliability_val.json").is_file()
    assert (run / "plots" / "reliability_test.json").is_file()
    assert "selected on val/acc1 (epoch 3)" in " ".join(stdout.split())


def test_teacher_stage_hands_on_the_model_selected_on_validation(two_stage_run):
    run, cache, _ = two_stage_run
    events = read_events(run)
    teacher_val = epoch_records(events, "teacher/val/acc1")
    assert [r["epoch"] for r in teacher_val] == [1, 2, 3, 4]
    stage = run / "teacher" / "checkpoints"
    best = torch.load(stage / "best.ckpt", weights_only=True)
    last = torch.load(stage / "last.ckpt", weights_only=True)
    assert best["epoch"] == first_argmax(teacher_val, "teacher/val/acc1") == 3
    assert last["epoch"] == 4  # the selected epoch is not the last one
    # the teacher the student learned from (the cached stage model) is best.ckpt's, not the last
    (entry,) = cache.glob("teacher-*.pt")
    teacher = torch.load(entry, weights_only=True)["model"]
    assert all(torch.equal(teacher[k], best["model"][k]) for k in best["model"])
    assert not all(torch.equal(teacher[k], last["model"][k]) for k in teacher)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher/val/acc1_best_epoch"] == 3
    assert "teacher/test_at_best/acc1" in summary and "teacher/test/acc1" in summary


def test_without_a_validation_split_nothing_test_selected_is_called_best(tmp_path):
    proc = run_kdrun(
        [*SYNTHETIC, "trainer.epochs=2", "logger=wandb"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}
    )
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    events = read_events(run)
    # per-epoch test evaluation stays; its maximum is test/acc1_max, nothing is selected
    assert [e["epoch"] for e in epoch_records(events, "test/acc1")] == [1, 2]
    assert summary["eval_split"] == "test" and "val/acc1" not in summary
    assert summary["test/acc1_max"] == max(e["test/acc1"] for e in events if "test/acc1" in e)
    assert not (run / "checkpoints" / "best.ckpt").exists()
    assert (run / "checkpoints" / "final.ckpt").is_file()
    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    keys = {*summary, *(k for e in events for k in e)}
    keys |= {k for row in history(wandb_file) for k in row} | set(wandb_summary(wandb_file))
    files = [str(p.relative_to(run)) for p in run.rglob("*")]
    assert not [k for k in keys if "best" in k.lower()]
    assert not [f for f in files if "best" in f.lower()]
    log = (run / "kdrun.log").read_text()
    for text in (proc.stdout, proc.stderr, log):
        lines = [line for line in text.splitlines() if "best" in line.lower()]
        assert all("test-selected" in line for line in lines), lines
    table = " ".join(proc.stdout.split())
    assert "test/acc1_max (test-selected)" in table and "nothing selected" in table
