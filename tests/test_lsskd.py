"""LSSKD (docs/methods.md) against direct transcriptions: the rotated batch and its joint labels, the
auxiliary heads on every backbone family, gradient flow from every head, the exported backbone,
every loss term with each switch on and off (bank reads: epoch-0 one-hot fallback and later
mixing; bank writes), the checkpoint round trip, the memory calculator and a CLI smoke run."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.methods.base import Batch
from kdrun.methods.lsskd import LSSKD, lsskd_loss, lsskd_memory, rotate_batch
from kdrun.models import create_model
from tests.conftest import run_kdrun

C = 3  # classes of the tiny models


def _model(name: str = "resnet8", num_classes: int = C, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, num_classes=num_classes, in_channels=3, image_size=16)


def _method(model, num_samples: int = 8, seed: int = 1, **knobs) -> LSSKD:
    method = LSSKD(num_classes=model.num_classes, num_samples=num_samples, **knobs)
    torch.manual_seed(seed)
    method.setup(model)
    return method


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------ rotations
def test_rotate_batch_interleaves_rotations_and_joint_labels():
    torch.manual_seed(0)
    x, y = torch.randn(3, 2, 16, 16), torch.tensor([2, 0, 1])
    x4, y4 = rotate_batch(x, y)
    assert x4.shape == (12, 2, 16, 16) and y4.tolist() == [8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7]
    for i in range(3):
        assert torch.equal(x4[4 * i], x[i])
        for k in range(4):
            rotated = x4[4 * i]
            for _ in range(k):  # k single quarter turns of the 0-degree copy
                rotated = torch.rot90(rotated, 1, dims=(1, 2))
            assert torch.equal(x4[4 * i + k], rotated), (i, k)
            assert y4[4 * i + k] == 4 * y[i] + k


def test_rotation_is_counter_clockwise():
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)  # row 0 on top
    x4, _ = rotate_batch(img, torch.tensor([0]))
    # a quarter turn counter-clockwise moves the top-right pixel (2) to the top-left
    assert x4[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]
    assert x4[2, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]
    assert x4[3, 0].tolist() == [[3.0, 1.0], [4.0, 2.0]]


def test_non_square_inputs_are_rejected():
    model = _model()
    method = _method(model)
    batch = Batch(torch.randn(2, 3, 16, 12), torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="square"):
        method.training_step(model, batch)


# ------------------------------------------------------------------------------ heads
@pytest.mark.parametrize(
    "name, count",
    [
        ("resnet8", 3),
        ("resnet20", 3),
        ("resnet56", 3),
        ("wrn_16_2", 3),
        ("resnet18", 4),
        ("preact_resnet18", 4),
        ("small_cnn", 3),
    ],
)
@pytest.mark.parametrize("head", ["copy", "bottleneck"])
def test_one_head_per_stage_with_4c_outputs(name, count, head):
    model = _model(name)
    method = _method(model, head=head)
    assert len(method.heads) == count == len(model.stages)
    x4, _ = rotate_batch(torch.randn(2, 3, 16, 16), torch.tensor([0, 2]))
    with torch.no_grad():
        outs, h_final, _ = model.forward_stages(x4)
        feats, logits = method.forward_heads(outs)
    for f, q in zip(feats, logits):
        assert q.shape == (8, 4 * C)
        assert f.shape == h_final.shape == (8, model.stage_channels[-1])
    own = {p.data_ptr() for p in model.parameters()}
    assert not own & {p.data_ptr() for p in method.heads.parameters()}  # nothing shared
    if head == "copy":
        L = len(model.stages)
        for k, h in enumerate(method.heads):
            stages = list(h.body)
            if k < L - 1:  # fresh copies of the remaining stages, same sizes
                assert len(stages) == L - k - 1
                for s, orig in zip(stages, model.stages[k + 1 :]):
                    assert _n_params(s) == _n_params(orig)
                    assert [type(m) for m in s.modules()] == [type(m) for m in orig.modules()]
            else:  # the last head: one extra stride-1 stage of the final width
                d = model.stage_channels[-1]
                assert len(stages) == 1
                assert _n_params(stages[0]) == _n_params(model.make_stage(d, d, 1))
                assert stages[0](outs[-1]).shape == outs[-1].shape
            assert _n_params(h.pool) == _n_params(model.final_norm)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2"])
@pytest.mark.parametrize("head", ["copy", "bottleneck"])
def test_every_head_alone_sends_gradient_to_stage_0(name, head):
    model = _model(name).train()
    method = _method(model, head=head)
    x4, y4 = rotate_batch(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    stage0 = list(model.stages[0].parameters())
    for k in range(len(method.heads)):
        outs, _, _ = model.forward_stages(x4)
        _, logits = method.forward_heads(outs)
        loss = F.cross_entropy(logits[k], y4)
        grads = torch.autograd.grad(loss, stage0, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), k


def test_eval_model_is_the_plain_backbone():
    model = _model("resnet8")
    method = _method(model)
    plain = _model("resnet8", seed=5)  # another initialisation of the same architecture
    exported = method.eval_model(model)
    assert _n_params(exported) == _n_params(plain) < _n_params(model) + _n_params(method.heads)
    assert set(exported.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(exported.state_dict())
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
        assert torch.equal(exported(x), model(x))


# ------------------------------------------------------------------------------ loss
def _transcription(model, method, x, y, idx, P, Q, alpha, knobs):
    """The LSSKD loss (docs/methods.md) written out with explicit loops over samples, rotations and heads.
    ``P`` [N, C] and ``Q[l]`` [N, 4, 4C] are dense banks holding one-hot targets where unwritten;
    they are updated in place after the loss, as the method does."""
    B = x.shape[0]
    x4 = torch.stack([torch.rot90(x[i], j, dims=(1, 2)) for i in range(B) for j in range(4)])
    with torch.no_grad():
        outs, h_final, logits4 = model.forward_stages(x4)
        feats, qs = [], []
        for head, h in zip(method.heads, outs):
            f, q = head(h)
            feats.append(f)
            qs.append(q)
    L = len(qs)
    z0 = torch.stack([logits4[4 * i] for i in range(B)])
    t_final = (1 - alpha) * F.one_hot(y, C).float() + alpha * P[idx]
    soft_final = -(t_final * z0.log_softmax(1)).sum(1).mean()
    soft_aux = torch.zeros(())
    for lvl in range(L):
        per_rotation = []
        for j in range(4):
            rows = torch.stack([qs[lvl][4 * i + j] for i in range(B)])
            hard = F.one_hot(4 * y + j, 4 * C).float()
            soft = (1 - alpha) * hard + alpha * Q[lvl][idx, j]
            t = soft if knobs.get("soften_aux", True) else hard
            per_rotation.append(-(t * rows.log_softmax(1)).sum(1).mean())
        soft_aux = soft_aux + torch.stack(per_rotation).mean()
    tau = knobs.get("tau", 3.0)
    kl = torch.zeros(())
    for lvl in range(L - 1):
        per_rotation = []
        for j in range(4):
            s = torch.stack([qs[lvl][4 * i + j] for i in range(B)])
            t = torch.stack([qs[L - 1][4 * i + j] for i in range(B)])
            p_t = (t / tau).softmax(1)
            per_rotation.append(
                tau**2 * (p_t * (p_t.log() - (s / tau).log_softmax(1))).sum(1).mean()
            )
        kl = kl + torch.stack(per_rotation).mean()
    feat = sum(((f - h_final) ** 2).mean() for f in feats)
    loss = soft_final + soft_aux
    if knobs.get("use_kl", True):
        loss = loss + knobs.get("beta", 1.0) * kl
    if knobs.get("use_feat", True):
        loss = loss + knobs.get("gamma", 0.1) * feat
    P[idx] = z0.softmax(1)
    for lvl in range(L):
        for i in range(B):
            for j in range(4):
                Q[lvl][idx[i], j] = qs[lvl][4 * i + j].softmax(0)
    parts = {"soft_final": soft_final, "soft_aux": soft_aux, "kl": kl, "feat": feat}
    return loss, parts, z0, qs


KNOBS = [
    {},
    {"soften_aux": False},
    {"use_kl": False},
    {"use_feat": False},
    {"head": "bottleneck"},
    {"use_kl": False, "use_feat": False, "soften_aux": False},
    {"tau": 1.5, "beta": 0.3, "gamma": 2.0, "alpha_T": 0.5},
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_loss_terms_and_banks_match_transcription(knobs):
    N, epochs = 6, 2
    model = _model("resnet8").train()
    method = _method(model, num_samples=N, bank_dtype="float32", **knobs)
    L = len(method.heads)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    P = F.one_hot(labels, C).float()
    Q = [F.one_hot(4 * labels[:, None] + torch.arange(4), 4 * C).float().clone() for _ in range(L)]
    torch.manual_seed(3)
    images = torch.randn(N, 3, 16, 16)
    # epoch 0 visits samples 0..3 (one-hot fallback everywhere); epoch 1 visits 2..5: samples 2, 3
    # read the banks, samples 4, 5 still fall back to their one-hot targets
    schedule = [(0, torch.tensor([0, 1, 2, 3])), (1, torch.tensor([2, 3, 4, 5]))]
    for epoch, idx in schedule:
        method.on_epoch_start(epoch, epochs)
        alpha = knobs.get("alpha_T", 0.8) * (epoch + 1) / epochs
        assert method.alpha == pytest.approx(alpha)
        x, y = images[idx], labels[idx]
        out = method.training_step(model, Batch(x, y, idx))
        exp_loss, exp_parts, z0, qs = _transcription(model, method, x, y, idx, P, Q, alpha, knobs)
        assert out.loss.item() == pytest.approx(exp_loss.item(), rel=1e-5, abs=1e-6)
        for key, value in exp_parts.items():
            assert out.logs[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
        assert torch.allclose(out.logits, z0, atol=1e-6) and torch.equal(out.targets, y)
        y4 = (4 * y[:, None] + torch.arange(4)).reshape(-1)
        for k, q in enumerate(qs, start=1):
            acc = (q.argmax(1) == y4).float().mean()
            assert out.logs[f"head{k}_acc"].item() == pytest.approx(acc.item())
        for v in out.logs.values():
            assert v.dim() == 0 and not v.requires_grad
        # bank writes (dense transcription banks hold one-hot rows where never written)
        written = torch.zeros(N, dtype=torch.bool)
        for _, seen in schedule[: epoch + 1]:
            written[seen] = True
        assert torch.equal(method.bank.written, written)
        assert torch.allclose(method.bank.values[written], P[written], atol=1e-6)
        if knobs.get("soften_aux", True):
            assert len(method.aux_banks) == L
            for bank, ref in zip(method.aux_banks, Q):
                assert torch.equal(bank.written, written)
                assert torch.allclose(bank.values[written], ref[written], atol=1e-6)
        else:
            assert len(method.aux_banks) == 0
        out.loss.backward()  # the loss is differentiable end to end
        model.zero_grad()
        method.zero_grad()
    # epoch 1 really mixed the banks into the targets of samples 2 and 3 (not vacuous)
    t = method.final_targets(labels[[2, 3]], torch.tensor([2, 3]))
    assert not torch.allclose(t, F.one_hot(labels[[2, 3]], C).float())


def test_kl_teacher_and_feature_target_are_stop_gradient():
    model = _model("resnet8").train()
    method = _method(model)
    x4, y4 = rotate_batch(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    outs, h_final, logits4 = model.forward_stages(x4)
    feats, logits = method.forward_heads(outs)
    args = (logits4[::4], h_final, logits, feats, torch.full((2, C), 1 / C))
    t_aux = [F.one_hot(y4, 4 * C).float()] * 3
    _, parts = lsskd_loss(*args, t_aux, tau=3.0, beta=1.0, gamma=0.1)
    deepest = list(method.heads[-1].parameters())
    grads = torch.autograd.grad(parts["kl"], deepest, retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)  # q_L is the detached teacher
    shallow = list(method.heads[0].parameters())
    grads = torch.autograd.grad(parts["kl"], shallow, retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the students learn
    (g_final,) = torch.autograd.grad(parts["feat"], [h_final], retain_graph=True, allow_unused=True)
    assert g_final is None  # h_final is the detached target
    # switched-off terms are diagnostics only: no graph, not in the loss
    loss_off, off = lsskd_loss(
        *args, t_aux, tau=3.0, beta=1.0, gamma=0.1, use_kl=False, use_feat=False
    )
    assert not off["kl"].requires_grad and not off["feat"].requires_grad
    assert loss_off.item() == pytest.approx((off["soft_final"] + off["soft_aux"]).item())
    assert off["kl"].item() == pytest.approx(parts["kl"].item())


def test_default_bank_is_float16_and_stores_the_softmax():
    model = _model("resnet8").train()
    method = _method(model, num_samples=4)
    assert method.bank.values.dtype == torch.float16
    assert all(b.values.dtype == torch.float16 for b in method.aux_banks)
    assert method.aux_banks[0].values.shape == (4, 4, 4 * C)
    method.on_epoch_start(0, 1)
    x, y, idx = torch.randn(2, 3, 16, 16), torch.tensor([0, 2]), torch.tensor([3, 1])
    out = method.training_step(model, Batch(x, y, idx))
    expected = out.logits.detach().float().softmax(1).half()
    assert torch.equal(method.bank.values[idx], expected)


def test_banks_survive_a_weights_only_round_trip():
    model = _model("resnet8").train()
    method = _method(model, num_samples=6)
    method.on_epoch_start(1, 3)
    method.training_step(
        model, Batch(torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]), torch.tensor([5, 0, 2]))
    )
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = _method(_model("resnet8", seed=9), num_samples=6, seed=7)
    fresh.load_state_dict(state)
    assert fresh.alpha == pytest.approx(method.alpha) and fresh.epoch == 1
    for key, value in method.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, fresh.state_dict()[key]), key
    assert torch.equal(fresh.aux_banks[2].written, torch.tensor([1, 0, 1, 0, 0, 1]).bool())


# ------------------------------------------------------------------------------ reporting
def test_summary_and_memory_calculator_agree_with_a_real_method():
    model = _model("resnet8", num_classes=10)
    method = _method(model, num_samples=64)
    s = method.summary()
    heads = _n_params(method.heads)
    assert s["lsskd/heads"] == 3 and s["lsskd/head_params"] == heads
    bank_bytes = 64 * 10 * 2 + 64 + 3 * (64 * 4 * 40 * 2 + 64)
    assert s["lsskd/bank_mb"] == pytest.approx(bank_bytes / 2**20)
    mem = lsskd_memory(64, 10, "resnet8", "float16", image_size=16)
    assert mem["heads"] == 3 and mem["head_params"] == heads
    assert mem["backbone_params"] == _n_params(model)
    assert mem["bank_mb"] == pytest.approx(bank_bytes / 1e6)
    light = lsskd_memory(64, 10, model, "float32", head="bottleneck", soften_aux=False)
    assert light["bank_mb"] == pytest.approx((64 * 10 * 4 + 64) / 1e6)
    assert light["head_params"] == _n_params(_method(model, head="bottleneck").heads)


def test_cli_smoke_exports_the_plain_backbone(tmp_path):
    args = [
        "dataset=synthetic",
        "dataset.options.train_size=64",
        "dataset.options.test_size=32",
        "dataset.options.image_size=16",
        "model=resnet8",
        "hardware=cpu",
        "logger=none",
        "trainer.epochs=1",
        "trainer.batch_size=16",
        "method=lsskd",
    ]
    run_kdrun(args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    backbone = create_model("resnet8", num_classes=10, in_channels=3, image_size=16)
    assert summary["params"] == _n_params(backbone)
    assert summary["method"] == "lsskd" and math.isfinite(summary["test/acc1"])
    assert summary["lsskd/heads"] == 3 and summary["lsskd/head_params"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    for key in ["soft_final", "soft_aux", "kl", "feat", "head1_acc", "head3_acc"]:
        assert f"train/{key}" in keys, (key, sorted(keys))
    final = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True)
    assert set(final["model"]) == set(backbone.state_dict())
