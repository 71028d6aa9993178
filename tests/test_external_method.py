"""Methods from outside the package: a user's own method class and YAML in a package of their own
(written into a temp dir, never under ``kdrun/``), selected with ``method=<their yaml>`` through
Hydra's search path, trained through the command line, killed with ``kill -9`` and resumed by
the same command — bit for bit equal to an uninterrupted run on the CPU with ``amp=off``.

The package is the walkthrough of ``CONTRIBUTING.md``: every fenced code block whose first line
is a comment naming a path (``# my_kd/method.py``) is written to that path, and the empty
``__init__.py`` files the walkthrough lists are created, so the guide is what these tests run.
Two methods: ``my_pskd`` (per-sample state in a ``SampleBank``; killed in its second epoch, after
the bank was filled, so the resume must restore it) and ``my_teacher_kd`` (a ``teacher`` stage
in ``prepare``; killed while the student trains, so the resume must find the finished stage and
continue the step axis after it). The uninterrupted reference selects the package with
``file://``, the killed and resumed runs with ``pkg://``.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_kdrun, start_kdrun
from tests.test_cli import only_run_dir, wait_for_glob

GUIDE = ROOT / "CONTRIBUTING.md"
FILE_BLOCK = re.compile(r"^```[a-z]+\n# ([\w./-]+\.(?:py|yaml))\n(.*?)^```$", re.M | re.S)
EMPTY_FILES = ("my_kd/__init__.py", "my_kd/conf/__init__.py")

#: 384 synthetic 16x16 images in 24 steps of 16 per epoch; small_cnn on the CPU, no AMP
TRAIN_SIZE, STEPS_PER_EPOCH = 384, 24
RUN = [
    "dataset=synthetic",
    f"dataset.options.train_size={TRAIN_SIZE}",
    "dataset.options.test_size=64",
    "dataset.options.image_size=16",
    "trainer.batch_size=16",
    "hardware=cpu",
    "hardware.amp=off",
    "logger=none",
]
COMPARED = ("test/acc1", "test/nll", "test/ece", "test/aurc", "test/brier")


def guide_files(text: str | None = None) -> dict[str, str]:
    """``{path: content}`` of the guide's code blocks that start with a ``# <path>`` line."""
    found = {m.group(1): m.group(2) for m in FILE_BLOCK.finditer(text or GUIDE.read_text())}
    assert found, f"{GUIDE.name} has no code block that starts with '# <path>'"
    return found


def write_example_package(dest: Path) -> Path:
    """The guide's example repository in ``dest`` (returned)."""
    for rel, content in guide_files().items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(content)
    for rel in EMPTY_FILES:
        (dest / rel).touch()
    return dest


@pytest.fixture
def user_repo(tmp_path) -> Path:
    repo = write_example_package(tmp_path / "my-kd")
    assert not any(p.resolve().is_relative_to(ROOT) for p in repo.rglob("*"))
    return repo


def env_for(repo: Path, cwd: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "KDRUN_DATA_DIR": str(cwd / "data")}


def kill9_then_resume(
    args: list[str], cwd: Path, env: dict[str, str], pattern: str
) -> tuple[Path, dict[str, int]]:
    """Start ``python -m kdrun ARGS``, ``kill -9`` it once ``pattern`` exists under its runs
    dir, run the same command again. Returns the run dir (checked to be the same one) and the
    modification times of the checkpoints the killed process left behind."""
    cwd.mkdir()
    proc = start_kdrun(args, cwd=cwd, env=env)
    try:
        wait_for_glob(cwd / "outputs" / "runs", pattern, proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run = only_run_dir(cwd)
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    left = {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*.ckpt")}
    out = run_kdrun(args, cwd=cwd, env=env)
    assert "(resumed)" in out.stdout
    assert only_run_dir(cwd) == run
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    return run, left


def reference_run(args: list[str], cwd: Path, env: dict[str, str]) -> Path:
    cwd.mkdir()
    run_kdrun(args, cwd=cwd, env=env)
    return only_run_dir(cwd)


def last_state(run: Path, sub: str = "") -> dict:
    return torch.load(run / sub / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_state(ref: dict, new: dict, what: str) -> None:
    """Equal keys, bit-identical tensors, equal plain values (``_extra_state``)."""
    assert ref.keys() == new.keys(), what
    for name, value in ref.items():
        same = torch.equal(value, new[name]) if torch.is_tensor(value) else value == new[name]
        assert same, f"{what}: {name}"


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def searchpath(repo: Path, kind: str) -> str:
    where = "pkg://my_kd.conf" if kind == "pkg" else f"file://{repo / 'my_kd' / 'conf'}"
    return f"hydra.searchpath=[{where}]"


def test_method_with_a_sample_bank_resumes_after_kill9(user_repo, tmp_path):
    recipe = ["method=my_pskd", *RUN, "trainer.epochs=2", "trainer.checkpoint_every_steps=30"]
    env = env_for(user_repo, tmp_path)
    ref = reference_run([*recipe, searchpath(user_repo, "file")], tmp_path / "ref", env)
    # checkpoints at the end of epoch 1 (step 24) and at step 30: prev.ckpt appears with the
    # second, so the kill lands in epoch 2, after every bank row was written
    args = [*recipe, searchpath(user_repo, "pkg")]
    run, _ = kill9_then_resume(args, tmp_path / "killed", env, "*/checkpoints/prev.ckpt")

    ref_sum, new_sum = summary(ref), summary(run)
    assert new_sum["method"] == ref_sum["method"] == "my_pskd"
    for key in COMPARED:
        assert new_sum[key] == ref_sum[key], key
    ref_state, new_state = last_state(ref), last_state(run)
    assert_same_state(ref_state["model"], new_state["model"], "model")
    assert_same_state(ref_state["method"], new_state["method"], "method state")
    bank = new_state["method"]
    assert bool(bank["bank.written"].all())
    assert torch.allclose(bank["bank.values"].sum(dim=1), torch.ones(TRAIN_SIZE))
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if "test/acc1" in e] == [1, 2]


def test_method_with_a_stage_resumes_after_kill9(user_repo, tmp_path):
    recipe = ["method=my_teacher_kd", *RUN, "trainer.epochs=1", "trainer.checkpoint_every_steps=5"]
    env = env_for(user_repo, tmp_path)
    ref = reference_run([*recipe, searchpath(user_repo, "file")], tmp_path / "ref", env)
    # the student's own checkpoints (the teacher's are under <run>/teacher/checkpoints)
    args = [*recipe, searchpath(user_repo, "pkg")]
    run, left = kill9_then_resume(args, tmp_path / "killed", env, "*/checkpoints/last.ckpt")
    # the finished teacher stage was found again, not trained again
    teacher_ckpt = "teacher/checkpoints/last.ckpt"
    assert left[teacher_ckpt] == (run / teacher_ckpt).stat().st_mtime_ns

    ref_sum, new_sum = summary(ref), summary(run)
    assert new_sum["method"] == "my_teacher_kd"
    for key in (*COMPARED, *(f"teacher/{k}" for k in COMPARED)):
        assert new_sum[key] == ref_sum[key], key
    assert new_sum["teacher/cached"] is False  # trained by this run, in its first launch
    # the file the method wrote through runner.output_path, from the stage's result
    assert new_sum["files"] == ["teacher.json"]
    report = json.loads((run / "teacher.json").read_text())
    assert report == {"acc1": new_sum["teacher/test/acc1"], "steps": STEPS_PER_EPOCH}
    assert_same_state(last_state(ref)["model"], last_state(run)["model"], "student")
    assert_same_state(
        last_state(ref, "teacher")["model"], last_state(run, "teacher")["model"], "teacher"
    )
    # the student's steps continue after the teacher's, in both runs alike
    steps = [
        [json.loads(x)["step"] for x in (r / "metrics.jsonl").read_text().splitlines()]
        for r in (ref, run)
    ]
    assert (
        steps[0] == steps[1]
        and steps[1] == sorted(steps[1])
        and max(steps[1]) == 2 * STEPS_PER_EPOCH
    )


def test_knobs_of_an_outside_method_are_validated(user_repo, tmp_path):
    args = ["method=my_pskd", searchpath(user_repo, "pkg"), *RUN, "method.alpha=1.5"]
    proc = run_kdrun(args, cwd=tmp_path, env=env_for(user_repo, tmp_path), check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    documented = re.search(r"`(kdrun: error: method\.alpha=1\.5[^`]*)`", GUIDE.read_text())
    assert documented, "CONTRIBUTING.md shows the error for method.alpha=1.5"
    assert lines == [documented.group(1)]
    assert not (tmp_path / "outputs").exists()  # rejected before a run dir was made
