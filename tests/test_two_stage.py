"""Two-stage / multi-generation baselines: ``tf_kd_self`` (teacher = the model's own CE-trained
copy) and ``born_again`` (sequential generations). Losses against direct transcriptions of the
formulas, the frozen teacher, ``teacher_ckpt``, the stage cache and its key chain, and CLI runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdrun import checkpoint as ckpt
from kdrun.methods.base import StageResult
from kdrun.metric_logging import ReliabilityPlots
from kdrun.stages import StageRunner
from tests.conftest import run_kdrun, start_kdrun
from tests.method_utils import ProtocolOnly, batches, build_method, tiny_context

#: one intra-op thread: on a shared 2-core machine two threads per process are 5-15x slower
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def fast_stages(monkeypatch):
    """The in-process stages skip the reliability diagram (matplotlib dominates a tiny stage)
    and use one thread."""
    monkeypatch.setattr(ReliabilityPlots, "on_predictions", lambda self, *args: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def context(tmp_path: Path, sub: str, overrides: list[str]):
    """(cfg, ctx, runner) with its own run dir ``tmp_path/sub`` and the shared cache
    ``tmp_path/cache`` (separate run dirs, so a stage is never resumed from another run)."""
    cfg, ctx, _ = tiny_context(tmp_path / sub, overrides)
    return cfg, ctx, StageRunner(ctx, cache_dir=tmp_path / "cache")


def first_batch(ctx, method):
    return next(iter(batches(ctx, method)))


def ce64(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log softmax(z)[y], batch mean, in float64."""
    logp = z.double().log_softmax(-1)
    return -logp[torch.arange(len(y)), y].mean()


def kd64(zs: torch.Tensor, zt: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * sum_c p_t (log p_t - log p_s) at temperature T, batch mean, in float64."""
    log_ps = (zs.double() / T).log_softmax(-1)
    log_pt = (zt.double() / T).log_softmax(-1)
    return T * T * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


def mse64(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """sum_c (p_s - p_t)^2 on probabilities (temperature 1), batch mean, in float64."""
    return (zs.double().softmax(-1) - zt.double().softmax(-1)).pow(2).sum(-1).mean()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def record_stages(runner: StageRunner) -> list[dict]:
    """Wrap ``runner.run_stage`` to record (name, method, kwargs, result) per call."""
    calls: list[dict] = []
    original = runner.run_stage

    def run_stage(name, method, **kwargs):
        result = original(name, method, **kwargs)
        calls.append({"name": name, "method": method, "kwargs": kwargs, "result": result})
        return result

    runner.run_stage = run_stage
    return calls


def test_the_runner_implements_the_stage_protocol(tmp_path):
    assert ProtocolOnly.MEMBERS == {
        "step",
        "run_stage",
        "load_model",
        "output_path",
        "log_figure",
    }
    _, ctx, runner = context(tmp_path, "a", [])
    for name in ProtocolOnly.MEMBERS:
        assert hasattr(runner, name), name
    view = ProtocolOnly(runner)
    assert view.step == 0
    with pytest.raises(AttributeError, match="runner.ctx"):
        view.ctx  # noqa: B018 - the internals are out of a method's reach
    # files: under the run dir, listed once; nothing on a rank that writes nothing
    assert view.output_path("plots/x.png") == tmp_path / "a" / "plots" / "x.png"
    assert (tmp_path / "a" / "plots").is_dir()
    view.output_path("plots/x.png")
    assert runner.files == ["plots/x.png"]
    ctx.is_main = False
    assert view.output_path("y.json") is None and runner.files == ["plots/x.png"]


# ----- tf_kd_self ----------------------------------------------------------------------------
def test_tfkd_self_loss_matches_transcription(tmp_path):
    cfg, ctx, runner = context(
        tmp_path, "a", ["method=tf_kd_self", "method.alpha=0.3", "method.T=2.5"]
    )
    method, model = build_method(cfg, ctx, runner)
    assert runner.stages_run == ["teacher"]
    model.train()
    batch = first_batch(ctx, method)
    out = method.training_step(model, batch)
    with torch.no_grad():
        zs = model(batch.x)
        zt = method.teacher(batch.x)
    ce, kd = ce64(zs, batch.y), kd64(zs, zt, 2.5)
    expected = 0.7 * ce + 0.3 * kd
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert out.logs["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out.logs["kd"].item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-6)
    assert kd.item() > 0  # the fresh student disagrees with the trained teacher


def test_tfkd_self_teacher_is_frozen_and_not_state(tmp_path):
    cfg, ctx, runner = context(tmp_path, "a", ["method=tf_kd_self"])
    method, model = build_method(cfg, ctx, runner)
    teacher = method.teacher
    assert teacher is not None and teacher is not model
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in method.parameters()}
    assert not any(k.startswith("teacher") for k in method.state_dict())
    assert list(method.children()) == []
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method.train()
    model.train()
    out = method.training_step(model, first_batch(ctx, method))
    out.loss.backward()
    assert not teacher.training  # method.train() does not reach it, the step keeps eval mode
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # eval mode: BatchNorm running statistics untouched by the teacher forward
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_tfkd_self_teacher_ckpt_trains_no_stage(tmp_path):
    _, ctx0, _ = context(tmp_path, "src", [])
    source = ctx0.new_model(seed_offset=7)
    path = tmp_path / "teacher.ckpt"
    ckpt.atomic_save({"model": source.state_dict()}, path)
    cfg, ctx, runner = context(tmp_path, "a", ["method=tf_kd_self", f"method.teacher_ckpt={path}"])
    method, _ = build_method(cfg, ctx, runner)
    assert runner.stages_run == []
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.pt"))
    assert same_weights(method.teacher, source)
    assert not method.teacher.training
    assert method.summary()["tf_kd_self/teacher_ckpt"] == str(path)


def test_tfkd_self_teacher_cache(tmp_path):
    cfg, ctx, runner = context(tmp_path, "a", ["method=tf_kd_self"])
    first, _ = build_method(cfg, ctx, runner)
    assert runner.summary["teacher/cached"] is False
    first_acc1 = runner.summary["teacher/test/acc1"]
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 1

    # same settings, another run (and other student knobs): the cached teacher is reused
    cfg, ctx, runner = context(tmp_path, "b", ["method=tf_kd_self", "method.alpha=0.5"])
    second, _ = build_method(cfg, ctx, runner)
    assert runner.summary["teacher/cached"] is True
    assert runner.stages_run == ["teacher"]
    assert runner.summary["teacher/test/acc1"] == first_acc1  # the cached stage's metrics
    assert same_weights(first.teacher, second.teacher)

    # another seed or another model: a new teacher is trained
    for sub, override in (("c", "seed=1"), ("d", "model=small_cnn")):
        cfg, ctx, runner = context(tmp_path, sub, ["method=tf_kd_self", override])
        other, _ = build_method(cfg, ctx, runner)
        assert runner.summary["teacher/cached"] is False, override
        if override == "seed=1":
            assert not same_weights(first.teacher, other.teacher)
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 3


# ----- born_again ----------------------------------------------------------------------------
def test_born_again_runs_generations_and_distils_from_the_last(tmp_path):
    cfg, ctx, runner = context(tmp_path, "a", ["method=born_again", "method.generations=3"])
    calls = record_stages(runner)
    method, model = build_method(cfg, ctx, runner)
    assert runner.stages_run == ["gen0", "gen1"]
    assert [c["name"] for c in calls] == ["gen0", "gen1"]
    assert [c["kwargs"]["seed_offset"] for c in calls] == [1000, 1001]
    assert type(calls[0]["method"]).__name__ == "CrossEntropy"
    gen0, gen1 = (c["result"] for c in calls)
    assert calls[1]["method"].teacher is gen0.model  # gen1 learnt from gen0
    assert method.teacher is gen1.model  # the main run (gen2) learns from gen1
    assert not same_weights(gen0.model, gen1.model)
    # each result: the stage's own method, its metrics, its span on the run's step axis
    assert gen0.method is calls[0]["method"] and gen1.method is calls[1]["method"]
    assert gen0.first_step == 0 and gen0.steps > 0 and gen1.first_step == gen0.next_step
    assert runner.step == gen1.next_step == 2 * gen0.steps  # same recipe, same step count
    assert gen0.metrics["gen0/test/acc1"] == runner.summary["gen0/test/acc1"]
    assert not gen0.cached and gen0.artifacts["checkpoints"].is_dir()
    # the key chain: gen1's settings contain gen0's in full
    s0, s1 = (c["kwargs"]["method_settings"] for c in calls)
    assert s1["previous"] == s0 and s1["generation"] == 1 and s0["generation"] == 0
    assert s0["loss"] == "ce" and s1["loss"] == "kd" and s1["alpha"] == 1.0 and s1["T"] == 1.0
    for k in (0, 1):
        assert f"gen{k}/test/acc1" in runner.summary and f"gen{k}/test/ece" in runner.summary
    summary = method.summary()
    assert summary["born_again/acc1_by_generation"] == [
        runner.summary["gen0/test/acc1"],
        runner.summary["gen1/test/acc1"],
    ]
    assert summary["born_again/ece_by_generation"] == [
        runner.summary["gen0/test/ece"],
        runner.summary["gen1/test/ece"],
    ]
    # the main run's result (Method.finish) closes the lists
    method.finish(
        StageResult(
            name="",
            model=model,
            method=method,
            metrics={"test/acc1": 0.25, "test/ece": 0.125},
            first_step=runner.step,
            steps=gen0.steps,
        )
    )
    summary = method.summary()
    assert summary["born_again/acc1_by_generation"][2:] == [0.25]
    assert summary["born_again/ece_by_generation"][2:] == [0.125]
    # the teacher (gen1) is frozen and outside the method's state
    assert not method.teacher.training
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert list(method.parameters()) == [] and len(method.state_dict()) <= 1

    # another alpha: gen0 comes from the cache, gen1 (which depends on alpha) is retrained
    cfg, ctx, runner = context(
        tmp_path, "b", ["method=born_again", "method.generations=3", "method.alpha=0.5"]
    )
    build_method(cfg, ctx, runner)
    assert runner.summary["gen0/cached"] is True
    assert runner.summary["gen1/cached"] is False
    cached_gen0, new_gen1 = runner.results
    assert cached_gen0.cached and cached_gen0.steps == gen0.steps  # the cache keeps the count
    assert new_gen1.first_step == gen0.steps and runner.step == 2 * gen0.steps


def test_born_again_one_generation_is_plain_ce(tmp_path):
    cfg, ctx, runner = context(tmp_path, "a", ["method=born_again", "method.generations=1"])
    method, model = build_method(cfg, ctx, runner)
    assert runner.stages_run == [] and method.teacher is None
    batch = first_batch(ctx, method)
    out = method.training_step(model, batch)
    with torch.no_grad():
        z = model(batch.x)
    assert out.loss.item() == pytest.approx(ce64(z, batch.y).item(), rel=1e-5)
    assert method.summary()["born_again/acc1_by_generation"] == []


@pytest.mark.parametrize("loss", ["kd", "mse"])
def test_born_again_loss_matches_transcription(tmp_path, loss):
    cfg, ctx, runner = context(
        tmp_path,
        "a",
        [
            "method=born_again",
            "method.generations=2",
            f"method.loss={loss}",
            "method.alpha=0.7",
            "method.T=3.0",
        ],
    )
    method, model = build_method(cfg, ctx, runner)
    assert runner.stages_run == ["gen0"]
    model.train()
    batch = first_batch(ctx, method)
    out = method.training_step(model, batch)
    with torch.no_grad():
        zs = model(batch.x)
        zt = method.teacher(batch.x)
    term = mse64(zs, zt) if loss == "mse" else kd64(zs, zt, 3.0)  # mse ignores T
    expected = 0.3 * ce64(zs, batch.y) + 0.7 * term
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert out.logs[loss].item() == pytest.approx(term.item(), rel=1e-5, abs=1e-7)
    assert term.item() > 0


# ----- CLI -----------------------------------------------------------------------------------
CLI = [
    "dataset=synthetic",
    "dataset.options.train_size=128",
    "dataset.options.test_size=64",
    "dataset.options.image_size=16",
    "model=resnet8",
    "hardware=cpu",
    "logger=none",
    "trainer.epochs=1",
    "trainer.batch_size=32",
]


def summaries(cwd: Path) -> list[dict]:
    runs = sorted((cwd / "outputs" / "runs").iterdir())
    return [json.loads((run / "summary.json").read_text()) for run in runs]


def test_cli_tf_kd_self_and_cache_reuse(tmp_path):
    args = [*CLI, "method=tf_kd_self", f"paths.teacher_cache={tmp_path / 'cache'}"]
    run_kdrun(args, cwd=tmp_path, env=ONE_THREAD)
    (first,) = summaries(tmp_path)
    assert first["teacher/cached"] is False
    assert 0.0 <= first["teacher/test/acc1"] <= 1.0 and "test/acc1" in first
    run = sorted((tmp_path / "outputs" / "runs").iterdir())[0]
    assert (run / "teacher" / "checkpoints" / "last.ckpt").is_file()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/kd" in e and "train/ce" in e for e in events)
    run_kdrun([*args, "resume=never"], cwd=tmp_path, env=ONE_THREAD)
    runs = summaries(tmp_path)
    assert len(runs) == 2
    assert [s["teacher/cached"] for s in runs] == [False, True]  # run dirs sort by start time
    second = runs[1]
    assert second["teacher/test/acc1"] == first["teacher/test/acc1"]


def test_cli_born_again(tmp_path):
    args = [
        *CLI,
        "method=born_again",
        "method.generations=2",
        f"paths.teacher_cache={tmp_path / 'cache'}",
    ]
    run_kdrun(args, cwd=tmp_path, env=ONE_THREAD)
    (summary,) = summaries(tmp_path)
    assert 0.0 <= summary["gen0/test/acc1"] <= 1.0 and "test/acc1" in summary
    acc = summary["born_again/acc1_by_generation"]
    assert acc[0] == summary["gen0/test/acc1"]
    if len(acc) == 2:  # the runner exposes the main run's metrics
        assert acc[1] == summary["test/acc1"]
    else:
        assert len(acc) == 1


def test_killed_in_student_stage_after_teacher_cached_keeps_steps_increasing(tmp_path):
    """kill -9 during the student stage (the teacher is trained and cached), then the same
    command: the teacher comes from the cache, its steps still count, so the steps in
    metrics.jsonl and in the W&B offline run never go backwards; ``teacher/cached`` says the
    teacher was trained by this run (in its first launch)."""
    import signal

    from tests import wandb_reader as wr
    from tests.test_cli import wait_for_glob

    args = [
        "dataset=synthetic",
        "dataset.options.train_size=512",
        "dataset.options.test_size=64",
        "dataset.options.image_size=16",
        "model=resnet8",
        "hardware=cpu",
        "logger=wandb",
        "trainer.epochs=4",
        "trainer.batch_size=32",
        "trainer.log_every=4",
        "trainer.checkpoint_every_steps=4",
        "method=tf_kd_self",
        f"paths.teacher_cache={tmp_path / 'cache'}",
    ]
    proc = start_kdrun(args, cwd=tmp_path, env=ONE_THREAD)
    runs = tmp_path / "outputs" / "runs"
    wait_for_glob(runs, "*/checkpoints/last.ckpt", proc)  # the student's (teacher: teacher/...)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    (run,) = list(runs.iterdir())
    assert list((tmp_path / "cache").glob("teacher-*.pt")), "the teacher was cached"
    assert not (run / "summary.json").exists(), "killed before the student finished"

    run_kdrun(args, cwd=tmp_path, env=ONE_THREAD)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher/cached"] is False  # trained by this run, in its first launch
    assert "reusing the cached stage" in (run / "kdrun.log").read_text()

    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events]
    assert steps == sorted(steps), steps
    teacher_last = max(e["step"] for e in events if any(k.startswith("teacher/") for k in e))
    student_first = min(e["step"] for e in events if "train/loss" in e or "train_step/loss" in e)
    assert student_first > teacher_last

    files = wr.wandb_files(run)
    assert len(files) == 2  # one offline fragment per launch
    wandb_steps = [row["_step"] for f in files for row in wr.history(f)]
    assert wandb_steps and wandb_steps == sorted(wandb_steps), wandb_steps
