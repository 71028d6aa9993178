"""Self-regulated distillation family (``kd``, ``significance``, ``regulated``, ``hybrid``;
docs/methods.md): the participation rule and both reductions against transcriptions, zero-participant
steps, significance counts against an independent count, the weight normalisations, the s = 0
filter in the sampler, the students' losses, the significance hand-off through the stage cache and
``teacher_ckpt``, and CLI runs (one per method, a multirun that trains the teacher once)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf
from torch import nn

import kdrun.methods
from kdrun.config import RUNTIME_ARGS, knob_rules
from kdrun.errors import ConfigError
from kdrun.methods import self_regulated as sr
from kdrun.methods.base import Batch
from kdrun.methods.self_regulated import teacher as sr_teacher
from kdrun.metric_logging import ReliabilityPlots
from kdrun.stages import StageRunner
from tests.conftest import run_kdrun, start_kdrun
from tests.method_utils import batches, build_method, tiny_context

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
STUDENTS = ["kd", "significance", "regulated", "hybrid"]


@pytest.fixture(autouse=True)
def fast_stages(monkeypatch):
    """In-process stages skip the reliability diagram and use one thread."""
    monkeypatch.setattr(ReliabilityPlots, "on_predictions", lambda self, *args: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def context(tmp_path: Path, sub: str, overrides: list[str]):
    """(cfg, ctx, runner): run dir ``tmp_path/sub``, shared cache ``tmp_path/cache``."""
    cfg, ctx, _ = tiny_context(tmp_path / sub, overrides)
    return cfg, ctx, StageRunner(ctx, cache_dir=tmp_path / "cache")


# ----- transcriptions -------------------------------------------------------------------------
def rule64(z: torch.Tensor, y: torch.Tensor, beta: float) -> list[bool]:
    """The participation rule, one sample at a time, in float64."""
    out = []
    for zi, yi in zip(z.double(), y.tolist()):
        p = zi.softmax(-1)
        out.append(int(p.argmax()) != yi or float(p[yi]) < beta)
    return out


def ce_each(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logp = z.double().log_softmax(-1)
    return -logp[torch.arange(len(y)), y]


def kd_each(zs: torch.Tensor, zt: torch.Tensor, T: float) -> torch.Tensor:
    log_ps = (zs.double() / T).log_softmax(-1)
    log_pt = (zt.double() / T).log_softmax(-1)
    return T * T * (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def reduce64(values: torch.Tensor, mask: list[bool], reduction: str) -> float:
    total = sum(float(v) for v, m in zip(values, mask) if m)
    if reduction == "batch":
        return total / len(mask)
    n = sum(mask)
    return total / n if n else 0.0


def weights64(counts: list[int], normalize: str, epochs: int) -> list[float]:
    if normalize == "mean_nonzero":
        nz = [c for c in counts if c > 0]
        d = sum(nz) / len(nz)
    elif normalize == "epochs":
        d = epochs
    else:
        d = max(counts)
    return [c / d for c in counts]


# ----- the rule and the reduction -------------------------------------------------------------
def test_participation_mask_hand_made_logits():
    log = torch.log
    probs = torch.tensor(
        [
            [0.95, 0.03, 0.02],  # y=0 correct, confident                -> 0
            [0.60, 0.30, 0.10],  # y=0 correct, below beta               -> 1
            [0.30, 0.60, 0.10],  # y=0 misclassified                     -> 1
            [0.02, 0.96, 0.02],  # y=0 misclassified but confident       -> 1
            [0.45, 0.50, 0.05],  # y=0 misclassified, p[y] >= beta=0.3   -> 1 (argmax rule)
            [0.10, 0.05, 0.85],  # y=2 correct, below 0.9                -> 1
        ]
    )
    y = torch.tensor([0, 0, 0, 0, 0, 2])
    z = log(probs) + 3.0  # a shift does not change the softmax
    assert sr.participation_mask(z, y, 0.9).tolist() == [False, True, True, True, True, True]
    # beta below 0.5: a misclassified sample takes part whatever p[y]; a correct one with
    # p[y] >= beta does not
    assert sr.participation_mask(z, y, 0.3).tolist() == [False, False, True, True, True, False]
    assert sr.participation_mask(z, y, 0.0).tolist() == [False, False, True, True, True, False]
    for beta in (0.0, 0.3, 0.9):
        assert sr.participation_mask(z, y, beta).tolist() == rule64(z, y, beta)


@pytest.mark.parametrize("beta", [0.5, 0.7, 0.9, 1.0])
def test_participation_mask_reduces_to_true_class_test_for_beta_at_least_half(beta):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(400, 7, generator=g) * 3
    y = torch.randint(0, 7, (400,), generator=g)
    p_true = z.double().softmax(-1)[torch.arange(400), y]
    mask = sr.participation_mask(z, y, beta)
    assert mask.tolist() == (p_true < beta).tolist()
    assert mask.tolist() == rule64(z, y, beta)
    assert 0 < int(mask.sum()) <= 400


@pytest.mark.parametrize("reduction", ["batch", "participants"])
def test_masked_reduce_against_transcription(reduction):
    g = torch.Generator().manual_seed(0)
    values = torch.rand(10, generator=g, dtype=torch.float64)
    mask = torch.rand(10, generator=g) < 0.5
    loss, participants = sr.masked_reduce(values, mask, reduction)
    assert float(participants) == int(mask.sum())
    assert loss.item() == pytest.approx(reduce64(values, mask.tolist(), reduction), rel=1e-12)
    # a non-participant with an infinite loss does not poison the sum
    values[~mask] = float("inf")
    loss, _ = sr.masked_reduce(values, mask, reduction)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("reduction", ["batch", "participants"])
def test_zero_participant_step_has_zero_loss_and_gradient(reduction):
    """A model that is right and confident on every sample: nobody takes part -> loss exactly 0,
    every gradient exactly 0, StepOutput.weight 0 (the engine's cue to skip the update)."""
    c = 4
    model = nn.Linear(c, c)
    with torch.no_grad():
        model.weight.copy_(20.0 * torch.eye(c))
        model.bias.zero_()
    y = torch.tensor([0, 1, 2, 3, 1])
    batch = Batch(torch.eye(c)[y], y, torch.arange(5))
    teacher = sr.SelfRegulatedTeacher(num_classes=c, num_samples=5, reduction=reduction)
    out = teacher.training_step(model, batch)
    assert out.loss.item() == 0.0 and int(out.weight) == 0
    out.loss.backward()
    assert all(
        p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters()
    )
    assert int(teacher.empty_steps) == 1 and int(teacher.significance.values.sum()) == 0
    # one unconfident sample: it alone carries the loss and the gradient
    model.zero_grad()
    x = batch.x.clone()
    x[4] = 0.05 * x[4]  # p[y] ~ 0.5 < 0.9
    out = teacher.training_step(model, Batch(x, y, batch.index))
    assert int(out.weight) == 1 and out.loss.item() > 0
    out.loss.backward()
    assert model.weight.grad.abs().sum() > 0
    assert teacher.significance.values.tolist() == [0, 0, 0, 0, 1]


# ----- the teacher stage ----------------------------------------------------------------------
def test_teacher_significance_matches_an_independent_count(tmp_path):
    beta = 0.15
    _, ctx, runner = context(tmp_path, "a", ["trainer.epochs=2", "optim.lr=0.2"])
    n = ctx.num_samples()
    stage = sr.SelfRegulatedTeacher(num_classes=ctx.data.spec.num_classes, num_samples=n, beta=beta)
    recorded = [0] * n
    per_epoch: list[int] = []
    original = stage.training_step

    def recording_step(model, batch):
        out = original(model, batch)
        for i, m in zip(batch.index.tolist(), rule64(out.logits.detach(), batch.y, beta)):
            recorded[i] += int(m)
        return out

    def recording_epoch_end(epoch):
        per_epoch.append(sum(recorded) - sum(per_epoch))
        return sr.SelfRegulatedTeacher.on_epoch_end(stage, epoch)

    stage.training_step = recording_step
    stage.on_epoch_end = recording_epoch_end
    runner.run_stage("teacher", stage, method_settings={"test": "count"})
    counts = stage.significance.values.tolist()
    assert counts == recorded
    assert max(counts) <= 2 and stage.completed_epochs == 2
    assert len(set(counts)) > 1  # the rule selects: not every sample every epoch
    summary = stage.summary()
    assert summary["data/participations"] == sum(recorded)
    assert summary["data/participation"] == pytest.approx(sum(recorded) / (2 * n))
    assert summary["data/distinct_samples"] == sum(c > 0 for c in recorded)
    assert summary["data/significance_hist"] == [recorded.count(v) for v in range(3)]
    # per-epoch figures in metrics.jsonl, under the stage prefix
    events = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    logged = [
        e["teacher/data/participations"] for e in events if "teacher/data/participations" in e
    ]
    assert logged == per_epoch
    fractions = [
        e["teacher/data/participation"] for e in events if "teacher/data/participation" in e
    ]
    assert fractions == pytest.approx([c / n for c in per_epoch])
    assert runner.summary["teacher/data/participations"] == sum(recorded)


# ----- significance weights and the s = 0 filter ----------------------------------------------
@pytest.mark.parametrize("normalize", ["mean_nonzero", "epochs", "max"])
def test_significance_weights_match_transcription(normalize):
    counts = [0, 1, 2, 3, 3, 0, 5, 1]
    w, _ = sr.significance_weights(torch.tensor(counts), normalize, 6)
    assert w.tolist() == pytest.approx(weights64(counts, normalize, 6), rel=1e-6)
    if normalize == "mean_nonzero":
        assert float(w[w > 0].mean()) == pytest.approx(1.0)


def student(tmp_path, name, extra=(), sub="a"):
    cfg, ctx, runner = context(tmp_path, sub, [f"method={name}", *extra])
    method, model = build_method(cfg, ctx, runner)
    return method, model, ctx, runner


def test_zero_significance_samples_never_reach_the_student(tmp_path):
    method, _, ctx, _ = student(tmp_path, "significance")
    n = ctx.num_samples()
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 3, (n,), generator=g)
    counts[:5] = 0
    method.set_significance(counts, 2)
    kept = {i for i, c in enumerate(counts.tolist()) if c > 0}
    s = ctx.settings
    sampler = method.train_batch_sampler(ctx.data.train_targets, s.batch_size, 0, 0, 1, False)
    assert len(sampler) == -(-len(kept) // s.batch_size)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = torch.cat(list(sampler)).tolist()
        assert sorted(seen) == sorted(kept)  # every kept sample once per epoch, no other
        assert torch.equal(torch.cat(list(sampler)), torch.tensor(seen))  # deterministic
    sampler.set_epoch(0)
    first = torch.cat(list(sampler))
    sampler.set_epoch(1)
    assert not torch.equal(first, torch.cat(list(sampler)))  # reshuffled per epoch
    # DDP: the ranks' slices make up the global batches
    ranks = [
        method.train_batch_sampler(ctx.data.train_targets, s.batch_size, 0, r, 2, False)
        for r in (0, 1)
    ]
    for r in ranks:
        r.set_epoch(1)
    for a, b, whole in zip(*ranks, sampler.global_batches()):
        assert torch.equal(torch.cat([a, b]), whole)
    # through the real loader
    seen = torch.cat([b.index for b in batches(ctx, method)]).tolist()
    assert sorted(seen) == sorted(kept)


# ----- the students' losses -------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,extra",
    [
        ("kd", ["method.alpha=0.7", "method.T=3.0"]),
        ("significance", ["method.alpha=0.6", "method.normalize=mean_nonzero"]),
        ("significance", ["method.normalize=epochs"]),
        ("significance", ["method.normalize=max", "method.T=2.0"]),
        ("regulated", ["method.beta=0.11", "method.reduction=batch"]),
        ("regulated", ["method.beta=0.11", "method.reduction=participants"]),
        ("hybrid", ["method.beta=0.11", "method.reduction=batch", "method.normalize=max"]),
        ("hybrid", ["method.beta=0.11", "method.reduction=participants"]),
    ],
)
def test_student_loss_matches_transcription(tmp_path, name, extra):
    method, model, ctx, runner = student(tmp_path, name, extra)
    assert runner.stages_run == ["teacher"]
    n = ctx.num_samples()
    counts = torch.arange(n) % 4  # 0..3, E_T = 3
    method.set_significance(counts, 3)
    model.train()
    batch = next(iter(batches(ctx, method)))
    out = method.training_step(model, batch)
    with torch.no_grad():
        zs = model(batch.x)
        zt = method.teacher(batch.x)
    a, T = method.alpha, method.T
    per = a * kd_each(zs, zt, T) + (1 - a) * ce_each(zs, batch.y)
    if name in ("significance", "hybrid"):
        w = weights64(counts.tolist(), method.normalize, 3)
        per = per * torch.tensor([w[i] for i in batch.index.tolist()], dtype=torch.float64)
        assert all(counts[i] > 0 for i in batch.index.tolist())
    if name in ("regulated", "hybrid"):
        mask = rule64(zs, batch.y, method.beta)
        assert 0 < sum(mask) < len(mask)  # the rule actually selects
        expected = reduce64(per, mask, method.reduction)
        assert int(out.weight) == sum(mask)
        assert out.logs["participation"].item() == pytest.approx(sum(mask) / len(mask))
    else:
        expected = float(per.mean())
        assert out.weight is None
    assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert out.logs["ce"].item() == pytest.approx(float(ce_each(zs, batch.y).mean()), rel=1e-5)
    assert out.logs["kd"].item() == pytest.approx(float(kd_each(zs, zt, T).mean()), rel=1e-5)
    assert not method.teacher.training
    assert not any(k.startswith("teacher") for k in method.state_dict())


# ----- significance hand-off: cache, teacher_ckpt ---------------------------------------------
def test_teacher_is_shared_and_counts_survive_the_cache(tmp_path):
    first, _, _, runner = student(tmp_path, "significance", ["method.teacher_beta=0.15"], "a")
    assert runner.summary["teacher/cached"] is False
    counts = first.significance.values.clone()
    assert first.teacher_stats["participations"] == int(counts.sum()) > 0
    run = tmp_path / "a"
    assert (run / "plots" / "significance_hist.png").is_file()
    hist = json.loads((run / "plots" / "significance_hist.json").read_text())
    assert hist["counts"] == torch.bincount(counts.long(), minlength=2).tolist()
    assert torch.equal(torch.load(run / "significance.pt")["significance"], counts)
    # another student and other student knobs: the same teacher and counts, from the cache
    second, _, _, runner = student(
        tmp_path, "hybrid", ["method.teacher_beta=0.15", "method.alpha=0.3", "method.beta=0.5"], "b"
    )
    assert runner.summary["teacher/cached"] is True
    assert torch.equal(second.significance.values, counts)
    assert runner.summary["teacher/data/participations"] == int(counts.sum())
    summary = second.summary()
    assert summary["teacher/data/participations"] == int(counts.sum())
    assert summary["teacher/data/significance_hist"] == hist["counts"]
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 1
    # a teacher knob: another teacher
    _, _, _, runner = student(tmp_path, "kd", ["method.teacher_beta=0.5"], "c")
    assert runner.summary["teacher/cached"] is False


def test_teacher_ckpt_sources(tmp_path):
    first, _, _, _ = student(tmp_path, "significance", [], "a")
    counts = first.significance.values.clone()
    (entry,) = (tmp_path / "cache").glob("teacher-*.pt")
    # a cache entry carries the counts
    method, _, _, runner = student(tmp_path, "hybrid", [f"method.teacher_ckpt={entry}"], "b")
    assert runner.stages_run == [] and torch.equal(method.significance.values, counts)
    assert method.teacher_trained_epochs == 1
    # so does the stage's last.ckpt
    last = tmp_path / "a" / "teacher" / "checkpoints" / "last.ckpt"
    method, _, _, _ = student(tmp_path, "significance", [f"method.teacher_ckpt={last}"], "c")
    assert torch.equal(method.significance.values, counts)
    # final.ckpt holds only the model: significance needs significance_file, kd does not
    final = tmp_path / "a" / "teacher" / "checkpoints" / "final.ckpt"
    with pytest.raises(ConfigError, match="significance_file"):
        student(tmp_path, "significance", [f"method.teacher_ckpt={final}"], "d")
    method, _, _, _ = student(tmp_path, "kd", [f"method.teacher_ckpt={final}"], "e")
    assert method.teacher is not None and "teacher/data/participations" not in method.summary()
    companion = tmp_path / "a" / "significance.pt"
    method, _, _, _ = student(
        tmp_path,
        "significance",
        [f"method.teacher_ckpt={final}", f"method.significance_file={companion}"],
        "f",
    )
    assert torch.equal(method.significance.values, counts)


def test_teacher_model_option_and_knob_validation(tmp_path):
    method, model, _, runner = student(tmp_path, "kd", ["method.teacher_model=small_cnn"])
    assert type(method.teacher).__name__ == "SmallCNN" and type(model).__name__ != "SmallCNN"
    assert runner.summary["teacher/cached"] is False
    with pytest.raises(ConfigError, match="teacher_model"):
        student(tmp_path, "kd", ["method.teacher_model=no_such_model"], "b")
    from kdrun.config import validate
    from tests.method_utils import compose_cfg

    for bad in (
        "method.normalize=mean",
        "method.reduction=sum",
        "method.beta=1.5",
        "method.teacher_epochs=0",
        "method.alpha=2.0",
    ):
        with pytest.raises(ConfigError):
            validate(compose_cfg(["method=hybrid", bad]))
    validate(compose_cfg(["method=hybrid", "method.teacher_epochs=3"]))


KNOBS = {
    "kd": ["alpha", "T"],
    "significance": ["alpha", "T", "normalize"],
    "regulated": ["alpha", "T", "beta", "reduction"],
    "hybrid": ["alpha", "T", "normalize", "beta", "reduction"],
}
TEACHER_KNOBS = [
    "teacher_beta",
    "teacher_reduction",
    "teacher_epochs",
    "teacher_model",
    "teacher_ckpt",
    "significance_file",
]


@pytest.mark.parametrize("name", STUDENTS)
def test_each_student_declares_exactly_its_own_knobs(name):
    """The one student implementation shows each method only its knobs: in the signature that
    validation reads, in ``ranges``, and as a TypeError for a knob of another student; the YAML
    names the class by module path and ``kdrun.methods.<Class>`` finds the same class."""
    conf = Path(__file__).resolve().parents[1] / "conf" / "method" / f"{name}.yaml"
    target = OmegaConf.load(conf)._target_
    cls = get_object(target)
    assert target == f"kdrun.methods.self_regulated.{cls.__name__}"
    assert getattr(kdrun.methods, cls.__name__) is cls
    own = KNOBS[name] + TEACHER_KNOBS
    assert list(knob_rules(cls, RUNTIME_ARGS["method"])) == own
    assert list(inspect.signature(cls).parameters) == ["num_classes", "num_samples", *own]
    assert set(cls.ranges) <= set(own)
    others = {k for knobs in KNOBS.values() for k in knobs} - set(own)
    for knob in sorted(others):
        with pytest.raises(TypeError, match=knob):
            cls(num_classes=3, num_samples=4, **{knob: 0.5})
    method = cls(num_classes=3, num_samples=4)
    assert method.name == name and method.uses_rule == ("beta" in own)


def test_empty_steps_perform_no_update_in_the_engine(tmp_path, monkeypatch):
    """A stage where nobody ever takes part
    leaves parameters and optimizer state untouched (SGD with momentum and weight decay), and a
    run where everybody takes part is bit-identical to the same run without ``weight``."""
    _, ctx, _ = context(tmp_path, "a", [])
    c, n = ctx.data.spec.num_classes, ctx.num_samples()

    def fit(method, sub):
        model = ctx.new_model(seed_offset=5)
        before = {k: v.clone() for k, v in model.named_parameters()}
        trainer = ctx.make_trainer(model, method, run_dir=tmp_path / sub)
        trainer.fit()
        return before, model, trainer

    with monkeypatch.context() as m:
        m.setattr(
            sr_teacher,
            "participation_mask",
            lambda z, y, beta: torch.zeros_like(y, dtype=torch.bool),
        )
        teacher = sr.SelfRegulatedTeacher(num_classes=c, num_samples=n)
        before, model, trainer = fit(teacher, "empty")
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    for state in trainer.optimizer.state.values():
        assert all(not torch.is_tensor(v) or not v.any() for v in state.values())
    assert int(teacher.empty_steps) == trainer.global_step > 0

    everyone = sr.SelfRegulatedTeacher(num_classes=c, num_samples=n, beta=1.0)
    _, with_weight, _ = fit(everyone, "full")
    plain = sr.SelfRegulatedTeacher(num_classes=c, num_samples=n, beta=1.0)
    original = plain.training_step

    def no_weight(model, batch):
        out = original(model, batch)
        out.weight = None
        return out

    plain.training_step = no_weight
    _, without, _ = fit(plain, "plain")
    assert all(torch.equal(a, b) for a, b in zip(with_weight.parameters(), without.parameters()))


# ----- CLI ------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("name", STUDENTS)
def test_cli_smoke(tmp_path, name):
    run_kdrun(
        [*CLI, f"method={name}", f"paths.teacher_cache={tmp_path / 'cache'}"],
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    (run,) = sorted((tmp_path / "outputs" / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher/cached"] is False and "test/acc1" in summary
    n = 128
    for prefix in ("", "teacher/"):
        assert 0 < summary[f"{prefix}data/participations"] <= n
        assert summary[f"{prefix}data/participation"] == pytest.approx(
            summary[f"{prefix}data/participations"] / n
        )
        assert 0 < summary[f"{prefix}data/distinct_samples"] <= n
    hist = summary["teacher/data/significance_hist"]
    assert len(hist) == 2 and sum(hist) == n
    assert summary["data/participation_hist"][1] == summary["data/distinct_samples"]
    files = ["significance.pt", "plots/significance_hist.png", "plots/significance_hist.json"]
    assert summary["files"] == files  # what the method wrote through runner.output_path
    for rel in files:
        assert (run / rel).is_file(), rel
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("teacher/data/participation" in e for e in events)
    assert any("data/participation" in e and "train/kd" in e for e in events)


def test_cli_multirun_trains_the_teacher_once(tmp_path):
    run_kdrun(
        [
            "-m",
            *CLI,
            "method=significance",
            "method.alpha=0.5,0.9",
            f"paths.teacher_cache={tmp_path / 'cache'}",
        ],
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    jobs = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [j["significance/alpha"] for j in jobs] == [0.5, 0.9]
    assert [j["teacher/cached"] for j in jobs] == [False, True]
    assert jobs[0]["teacher/test/acc1"] == jobs[1]["teacher/test/acc1"]
    assert jobs[0]["teacher/data/significance_hist"] == jobs[1]["teacher/data/significance_hist"]
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 1


# ----- kill -9 during either stage, then the same command ------------------------------------
@pytest.mark.parametrize("stage", ["teacher", "student"])
def test_kill_during_a_stage_resumes_that_stage(tmp_path, stage):
    """kill -9 while the teacher stage (or the student stage) trains; the same command then
    resumes that stage from its checkpoint in the same run dir — an earlier stage is not trained
    again — and ends bit-identical to an uninterrupted run."""
    import os
    import signal

    from tests.conftest import run_kdrun
    from tests.test_cli import only_run_dir, wait_for_glob

    args = [
        "method=significance",
        "dataset=synthetic",
        "dataset.options.train_size=256",
        "dataset.options.test_size=64",
        "dataset.options.image_size=16",
        "hardware=cpu",
        "logger=none",
        "trainer.epochs=3",
        "trainer.batch_size=32",
        "trainer.checkpoint_every_steps=4",
        "method.teacher_beta=0.5",
    ]
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir()
    kill_dir.mkdir()
    run_kdrun(args, cwd=ref_dir)
    proc = start_kdrun(args, cwd=kill_dir)
    runs = kill_dir / "outputs" / "runs"
    # the teacher stage checkpoints under <run>/teacher/, the student under <run>/checkpoints/
    wait_for_glob(
        runs,
        "*/teacher/checkpoints/last.ckpt" if stage == "teacher" else "*/checkpoints/last.ckpt",
        proc,
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = only_run_dir(kill_dir)
    cache = list((kill_dir / "outputs" / "teachers").glob("teacher-*.pt"))
    if stage == "teacher":
        killed_at = torch.load(run / "teacher/checkpoints/last.ckpt", weights_only=True)
        assert not cache and not (run / "checkpoints").exists()
    else:
        killed_at = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
        assert len(cache) == 1  # the finished teacher stage is in the cache
    assert killed_at["epoch"] < 3 and killed_at["global_step"] > 0

    out = run_kdrun(args, cwd=kill_dir).stdout
    assert only_run_dir(kill_dir) == run and "(resumed)" in out
    if stage == "teacher":
        assert "teacher: training the stage" in out
        assert f"teacher/resumed at epoch {killed_at['epoch']}" in out
        assert "resumed at epoch 0 step 0" not in out  # the student starts fresh
    else:
        assert "teacher: reusing the cached stage" in out
        assert "teacher: training the stage" not in out
        assert f"resumed at epoch {killed_at['epoch']}" in out
    ref_run = only_run_dir(ref_dir)
    ref_sum = json.loads((ref_run / "summary.json").read_text())
    new_sum = json.loads((run / "summary.json").read_text())
    for key in (
        "test/acc1",
        "test/nll",
        "teacher/test/acc1",
        "data/participations",
        "teacher/data/participations",
        "teacher/data/distinct_samples",
    ):
        assert new_sum[key] == ref_sum[key], key
    ref_w = torch.load(ref_run / "checkpoints/last.ckpt", weights_only=True)
    new_w = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    for name, value in ref_w["model"].items():
        assert torch.equal(value, new_w["model"][name]), name
    assert torch.equal(
        ref_w["method"]["significance.values"], new_w["method"]["significance.values"]
    )
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if "teacher/test/acc1" in e] == [1, 2, 3]
    assert [e["epoch"] for e in events if "test/acc1" in e] == [1, 2, 3]
