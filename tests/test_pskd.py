"""PS-KD against a direct transcription of its update (docs/methods.md) over several epochs,
including epoch 0's one-hot targets and a resume in the middle of an epoch."""

from __future__ import annotations

import signal

import pytest
import torch
import torch.nn.functional as F

from kdrun import checkpoint as ckpt
from kdrun.data.loaders import DeviceTrainLoader
from kdrun.data.samplers import BatchSampler
from kdrun.methods.pskd import PSKD, pskd_alpha
from kdrun.preemption import Preempted, Preemption
from tests.method_utils import tiny_context

EPOCHS = 3
OVERRIDES = [
    "method=ps_kd",
    f"trainer.epochs={EPOCHS}",
    "method.alpha_T=0.8",
    "trainer.log_every=1000",
    "schedule=constant",
    "optim.lr=0.05",
]


def test_alpha_ramp():
    assert [pskd_alpha(0.8, e, 4) for e in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def transcription(ctx, model, epochs, alpha_T, lr, momentum, nesterov, wd):
    """PS-KD written out literally: dense bank filled with one-hot labels, linear alpha ramp."""
    data = ctx.data
    n, c = data.train_targets.shape[0], data.spec.num_classes
    bank = F.one_hot(data.train_targets, c).float()
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd
    )
    sampler = BatchSampler(n, ctx.settings.batch_size, seed=ctx.seed)
    loader = DeviceTrainLoader(data, sampler, torch.device("cpu"), ctx.seed)
    losses, targets_seen = [], []
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        alpha = alpha_T * (epoch + 1) / epochs
        for x, y, idx in loader:
            z = model(x)
            target = (1 - alpha) * F.one_hot(y, c).float() + alpha * bank[idx]
            loss = -(target * F.log_softmax(z, dim=1)).sum(dim=1).mean()
            bank[idx] = F.softmax(z.detach(), dim=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            targets_seen.append(target)
    return losses, bank, targets_seen


def run_kdrun_trainer(tmp_path, stop_after_step=None, resume=False):
    cfg, ctx, runner = tiny_context(tmp_path, OVERRIDES)
    method = PSKD(num_classes=ctx.data.spec.num_classes, num_samples=ctx.num_samples(), alpha_T=0.8)
    model = ctx.new_model()
    trainer = ctx.make_trainer(model, method)
    losses, targets = [], []
    original = method.training_step

    def recording_step(m, batch):
        targets.append(method.targets(batch.y, batch.index))
        out = original(m, batch)
        losses.append(out.loss.item())
        if stop_after_step is not None and len(losses) == stop_after_step:
            trainer.find_callback(Preemption).signals.signum = signal.SIGTERM  # as a signal would
        return out

    method.training_step = recording_step
    state = ckpt.load_latest(tmp_path / "checkpoints") if resume else None
    trainer.fit(state)
    return cfg, ctx, trainer, method, losses, targets


def test_pskd_matches_transcription_over_epochs(tmp_path):
    cfg, ctx, trainer, method, losses, targets = run_kdrun_trainer(tmp_path)
    ref_model = ctx.new_model()  # the same initialisation as the kdrun run
    o = cfg.optim
    ref_losses, ref_bank, ref_targets = transcription(
        ctx, ref_model, EPOCHS, 0.8, o.lr, o.momentum, o.nesterov, o.weight_decay
    )
    steps_per_epoch = len(ref_losses) // EPOCHS
    assert len(losses) == len(ref_losses) == EPOCHS * steps_per_epoch
    # epoch 0: every sample is visited for the first time, so the target is the one-hot label
    y_first = torch.cat([t.argmax(1) for t in targets[:steps_per_epoch]])
    for t in targets[:steps_per_epoch]:
        hot = F.one_hot(t.argmax(1), t.shape[1]).float()
        assert torch.allclose(t, hot)  # (1 - a) onehot + a onehot
    assert y_first.numel() == ctx.num_samples()
    for mine, ref in zip(targets, ref_targets):
        assert torch.allclose(mine, ref, atol=1e-6)
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert torch.allclose(method.bank.values, ref_bank, atol=1e-6)
    assert bool(method.bank.written.all())
    for p, q in zip(trainer.model.parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    assert method.alpha == pytest.approx(0.8)
    # later epochs really mix in the bank (the test would pass vacuously otherwise)
    assert not torch.allclose(targets[-1], F.one_hot(targets[-1].argmax(1), 10).float())


def test_pskd_resume_mid_epoch_is_exact(tmp_path):
    full = tmp_path / "full"
    part = tmp_path / "part"
    _, _, t_full, m_full, losses_full, _ = run_kdrun_trainer(full)
    steps_per_epoch = len(losses_full) // EPOCHS
    stop = steps_per_epoch + 2  # in the middle of epoch 1
    with pytest.raises(Preempted):
        run_kdrun_trainer(part, stop_after_step=stop)
    saved = torch.load(part / "checkpoints/last.ckpt", weights_only=True)
    assert saved["epoch"] == 1 and saved["step_in_epoch"] == 2
    _, _, t_res, m_res, losses_res, _ = run_kdrun_trainer(part, resume=True)
    assert losses_res == losses_full[stop:]
    assert torch.equal(m_res.bank.values, m_full.bank.values)
    assert torch.equal(m_res.bank.written, m_full.bank.written)
    for (name, p), q in zip(t_full.model.state_dict().items(), t_res.model.state_dict().values()):
        assert torch.equal(p, q), name
