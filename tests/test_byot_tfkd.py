"""TF-KD-reg and BYOT against direct transcriptions of their losses (docs/methods.md): the virtual
teacher, both losses written out literally, BYOT's exits on every backbone family, gradient flow and
stop-gradients, the exported model, and CLI smoke runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdrun.methods.base import Batch
from kdrun.methods.byot import BYOT
from kdrun.methods.tfkd import TFKDReg
from kdrun.models import create_model
from tests.conftest import run_kdrun


# ----------------------------------------------------------------------------------- TF-KD-reg
def _virtual_teacher(y: torch.Tensor, num_classes: int, a: float) -> torch.Tensor:
    """q_virtual as an explicit [B, C] tensor, one row at a time."""
    q = torch.empty(y.shape[0], num_classes)
    for i, label in enumerate(y.tolist()):
        for c in range(num_classes):
            q[i, c] = a if c == label else (1.0 - a) / (num_classes - 1)
    return q


def _ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    log_p = z.log_softmax(dim=1)
    return -torch.stack([log_p[i, y[i]] for i in range(len(y))]).mean()


def _kl_rows(t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """sum_c t (log t - log s), mean over rows."""
    return (t * (t.log() - log_s)).sum(dim=1).mean()


def _tiny_classifier(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))


def test_virtual_teacher_puts_a_on_the_true_class():
    method = TFKDReg(num_classes=7, num_samples=1, a=0.9)
    y = torch.tensor([0, 3, 6, 3])
    q = method.virtual_log_probs(y).exp()
    assert torch.allclose(q, _virtual_teacher(y, 7, 0.9), atol=1e-6)
    assert torch.allclose(q[torch.arange(4), y], torch.full((4,), 0.9))
    assert torch.allclose(q.sum(dim=1), torch.ones(4))
    assert torch.allclose(method.virtual_probs(y), q, atol=1e-6)


@pytest.mark.parametrize(
    "a, T, alpha, multiplier",
    [(0.99, 20.0, 0.1, 1.0), (0.9, 1.0, 0.5, 1.0), (0.6, 4.0, 1.0, 3.0), (0.99, 20.0, 0.0, 1.0)],
)
def test_tfkd_reg_loss_matches_transcription(a, T, alpha, multiplier):
    C, B = 10, 6
    model = _tiny_classifier(C)
    torch.manual_seed(1)
    x, y = torch.randn(B, 3, 2, 2) * 3, torch.randint(0, C, (B,))
    method = TFKDReg(num_classes=C, num_samples=100, a=a, T=T, alpha=alpha, multiplier=multiplier)
    out = method.training_step(model, Batch(x, y, torch.arange(B)))

    z = model(x).detach()
    q = _virtual_teacher(y, C, a)
    t = q ** (1.0 / T)  # softmax(log q / T): q^(1/T) renormalised
    t = t / t.sum(dim=1, keepdim=True)
    kd = T * T * _kl_rows(t, (z / T).log_softmax(dim=1))
    expected = (1 - alpha) * _ce(z, y) + alpha * multiplier * kd
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert out.logs["ce"].item() == pytest.approx(_ce(z, y).item(), rel=1e-5)
    assert out.logs["kd"].item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-7)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.logs.values())


@pytest.mark.filterwarnings("ignore:reduction. .mean.:UserWarning")
@pytest.mark.parametrize("a, T, alpha", [(0.99, 20.0, 0.1), (0.8, 2.0, 0.7)])
def test_tfkd_reg_reference_code_variant_matches_authors_loss(a, T, alpha):
    """variant=reference_code with multiplier m equals the authors' code with multiplier m*C:
    ``(1-alpha) CE + alpha * KLDivLoss()(log_softmax(z), softmax(q/T)) * m*C`` (elementwise mean)."""
    C, B, m = 10, 5, 1.5
    model = _tiny_classifier(C)
    torch.manual_seed(2)
    x, y = torch.randn(B, 3, 2, 2) * 3, torch.randint(0, C, (B,))
    method = TFKDReg(
        num_classes=C,
        num_samples=100,
        a=a,
        T=T,
        alpha=alpha,
        multiplier=m,
        variant="reference_code",
    )
    out = method.training_step(model, Batch(x, y, torch.arange(B)))
    z = model(x).detach()
    q = _virtual_teacher(y, C, a)
    elementwise = F.kl_div(z.log_softmax(dim=1), (q / T).softmax(dim=1), reduction="mean")
    expected = (1 - alpha) * F.cross_entropy(z, y) + alpha * elementwise * (m * C)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("a", [0.0, 1.0])
def test_tfkd_reg_rejects_degenerate_teacher(a):
    from kdrun.config import validate
    from kdrun.errors import ConfigError
    from tests.method_utils import compose_cfg

    with pytest.raises(ConfigError, match=r"method.a=.* must be a number in \(0, 1\)"):
        validate(compose_cfg(["method=tf_kd_reg", f"method.a={a}"]))


# ----------------------------------------------------------------------------------------- BYOT
EXITS = {"resnet8": 2, "resnet18": 3, "small_cnn": 2, "wrn_16_2": 2, "preact_resnet18": 3}


def _byot(name: str, size: int = 16, C: int = 10, **knobs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=C, image_size=size)
    method = BYOT(num_classes=C, num_samples=100, **knobs)
    method.setup(model)
    model.train()
    method.train()
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([1, C - 1])
    return model, method, Batch(x, y, torch.arange(2))


@pytest.mark.parametrize("name", sorted(EXITS))
def test_byot_builds_one_exit_per_stage_but_the_last(name):
    C = 10
    model, method, batch = _byot(name, C=C)
    assert len(model.stages) == EXITS[name] + 1
    assert len(method.exits) == EXITS[name]
    stage_outputs, pooled, logits = model.forward_stages(batch.x)
    feats, exit_logits = method.forward_exits(stage_outputs)
    assert len(feats) == len(exit_logits) == EXITS[name]
    for f, q in zip(feats, exit_logits):
        assert q.shape == (2, C)
        assert f.shape == pooled.shape == (2, model.feature_dim)
    out = method.training_step(model, batch)
    assert out.logits.shape == (2, C) and torch.isfinite(out.loss)
    expected_logs = {"ce_final", "ce_exits", "kd", "feat"} | {
        f"exit{k}_acc" for k in range(1, EXITS[name] + 1)
    }
    assert set(out.logs) == expected_logs
    assert all(v.dim() == 0 and not v.requires_grad for v in out.logs.values())
    assert method.summary()["byot/exits"] == EXITS[name]


def _byot_transcription(model, method, batch, alpha, T, beta):
    """The BYOT loss (docs/methods.md) written out, from a fresh forward of the same modules (train-mode BN uses
    batch statistics, so the outputs are identical)."""
    stage_outputs, f_final, p = model.forward_stages(batch.x)
    y = batch.y
    p, f_final = p.detach(), f_final.detach()
    ce_exits, kd, feat, accs = 0.0, 0.0, 0.0, []
    for head, h in zip(method.exits, stage_outputs[:-1]):
        f_l, q_l = (t.detach() for t in head(h))
        ce_exits = ce_exits + _ce(q_l, y)
        p_t = (p / T).softmax(dim=1)
        kd = kd + T * T * _kl_rows(p_t, (q_l / T).log_softmax(dim=1))
        sq = [sum((f_l[b, d] - f_final[b, d]) ** 2 for d in range(f_l.shape[1])) for b in range(2)]
        feat = feat + sum(sq) / len(sq)
        accs.append((q_l.argmax(dim=1) == y).float().mean())
    ce_final = _ce(p, y)
    loss = (1 - alpha) * (ce_final + ce_exits) + alpha * kd + beta * feat
    return loss, {"ce_final": ce_final, "ce_exits": ce_exits, "kd": kd, "feat": feat}, accs


@pytest.mark.parametrize(
    "name, alpha, T, beta",
    [("resnet8", 0.1, 3.0, 1e-6), ("resnet8", 0.6, 1.0, 0.05), ("small_cnn", 1.0, 5.0, 0.01)],
)
def test_byot_loss_matches_transcription(name, alpha, T, beta):
    model, method, batch = _byot(name, alpha=alpha, T=T, beta=beta)
    out = method.training_step(model, batch)
    expected, parts, accs = _byot_transcription(model, method, batch, alpha, T, beta)
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-4)
    for key, value in parts.items():
        assert out.logs[key].item() == pytest.approx(float(value), rel=1e-4, abs=1e-6), key
    for k, acc in enumerate(accs, start=1):
        assert out.logs[f"exit{k}_acc"].item() == pytest.approx(acc.item())


@pytest.mark.parametrize("name", ["resnet8", "preact_resnet18"])
def test_byot_gradients_reach_every_exit_and_the_backbone(name):
    model, method, batch = _byot(name, beta=1e-3)
    method.training_step(model, batch).loss.backward()
    for k, head in enumerate(method.exits):
        grads = [p.grad for p in head.parameters()]
        assert all(g is not None for g in grads), f"exit {k + 1}: a parameter got no gradient"
        assert head.fc.weight.grad.abs().sum() > 0
        assert sum(g.abs().sum() for g in grads) > 0
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"backbone parameter {pname} got no gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.stages[0].parameters())


def test_byot_teacher_side_is_stop_gradient():
    """With alpha = 1 only KD and the feature hint remain: both use sg[p] and sg[f_L], so neither
    the classifier nor the last stage (which only the deep head sees) gets a gradient."""
    model, method, batch = _byot("resnet8", alpha=1.0, beta=1.0)
    method.training_step(model, batch).loss.backward()
    for p in [*model.classifier.parameters(), *model.stages[-1].parameters()]:
        assert p.grad is None or p.grad.abs().sum() == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stages[0].parameters())


def test_byot_eval_model_is_the_bare_backbone():
    model, method, _ = _byot("resnet8")
    exported = method.eval_model(model)
    assert exported is model
    n_backbone = sum(p.numel() for p in create_model("resnet8", num_classes=10).parameters())
    assert sum(p.numel() for p in exported.parameters()) == n_backbone
    assert method.summary()["byot/exit_params"] == sum(p.numel() for p in method.exits.parameters())
    assert not any(k.startswith("exits") for k in exported.state_dict())
    assert any(k.startswith("exits.") for k in method.state_dict())


def test_byot_setup_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, image_size=16)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    BYOT(num_classes=10, num_samples=1).setup(model)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------------------ CLI
TINY = [
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


@pytest.mark.parametrize("method", ["byot", "tf_kd_reg"])
def test_cli_smoke(method, tmp_path):
    run_kdrun([*TINY, f"method={method}"], cwd=tmp_path)
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    backbone = create_model("resnet8", num_classes=10, in_channels=3, image_size=16)
    assert summary["params"] == sum(p.numel() for p in backbone.parameters())
    assert summary["method"] == method and math.isfinite(summary["test/acc1"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    if method == "byot":
        assert summary["byot/exits"] == 2
        wanted = ["ce_final", "ce_exits", "kd", "feat", "exit1_acc", "exit2_acc"]
    else:
        wanted = ["ce", "kd"]
    for key in wanted:
        assert f"train/{key}" in keys, (key, sorted(keys))
    final = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True)
    assert set(final["model"]) == set(backbone.state_dict())
