"""Unit tests of the engine's building blocks: SampleBank, batch samplers, schedules,
checkpoints, KD loss helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdrun import checkpoint as ckpt
from kdrun.data.samplers import BatchSampler
from kdrun.errors import CheckpointError
from kdrun.methods import SampleBank, kd_loss, soft_cross_entropy
from kdrun.schedules import Constant, Cosine, MultiStep


def test_bank_read_write_roundtrip_and_default():
    bank = SampleBank(10, (3,), dtype="float16")
    idx = torch.tensor([1, 4, 7])
    vals = torch.rand(3, 3)
    bank.write(idx, vals)
    assert torch.allclose(bank.read(idx).float(), vals.half().float())
    default = torch.full((4, 3), -1.0)
    out = bank.read_or(torch.tensor([0, 1, 4, 9]), default)
    assert torch.equal(out[0], default[0]) and torch.equal(out[3], default[3])
    assert torch.allclose(out[1], vals[0].half().float())
    assert bank.written.sum().item() == 3
    state = bank.state_dict()
    other = SampleBank(10, (3,), dtype="float16")
    other.load_state_dict(state)
    assert torch.equal(other.values, bank.values) and torch.equal(other.written, bank.written)


def test_bank_add_counts_duplicates():
    bank = SampleBank(5, dtype="int64")
    bank.add(torch.tensor([0, 0, 3]), torch.ones(3, dtype=torch.int64))
    assert bank.values.tolist() == [2, 0, 0, 1, 0]


def test_bank_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="bank dtype"):
        SampleBank(3, dtype="float8")


def test_batch_sampler_deterministic_and_covers_epoch():
    s = BatchSampler(103, 10, seed=3)
    s.set_epoch(2)
    a = torch.cat(list(s))
    assert sorted(a.tolist()) == list(range(103))
    s2 = BatchSampler(103, 10, seed=3)
    s2.set_epoch(2)
    assert torch.equal(a, torch.cat(list(s2)))
    s2.set_epoch(3)
    assert not torch.equal(a, torch.cat(list(s2)))
    assert len(s) == 11
    # resuming mid-epoch sees the same remaining batches
    skipped = torch.cat(list(s.iter_from(4)))
    assert torch.equal(skipped, a[40:])


def test_batch_sampler_rank_slices_rebuild_global_batches():
    full = BatchSampler(64, 16, seed=1)
    ranks = [BatchSampler(64, 16, seed=1, rank=r, world_size=2) for r in range(2)]
    for b, r0, r1 in zip(full, ranks[0], ranks[1]):
        assert torch.equal(torch.cat([r0, r1]), b)


def test_schedules():
    assert MultiStep([150, 225], 0.1)(149.9, 300) == 1.0
    assert math.isclose(MultiStep([150, 225], 0.1)(150.0, 300), 0.1)
    assert math.isclose(MultiStep([150, 225], 0.1)(299, 300), 0.01)
    cos = Cosine()
    assert cos(0, 10) == 1.0 and abs(cos(10, 10)) < 1e-12 and math.isclose(cos(5, 10), 0.5)
    warm = MultiStep([100], 0.1, warmup_epochs=5)
    assert math.isclose(warm(2.5, 200), 0.5) and warm(5, 200) == 1.0
    assert Constant()(3, 10) == 1.0


def test_soft_ce_and_kd_loss_match_definitions():
    torch.manual_seed(0)
    z, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    assert torch.allclose(soft_cross_entropy(z, F.one_hot(y, 5).float()), F.cross_entropy(z, y))
    T = 4.0
    p_t = F.softmax(t / T, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(z / T, -1))).sum(-1).mean() * T * T
    assert torch.allclose(kd_loss(z, t, T), expected, atol=1e-6)
    # batch-mean, not PyTorch's elementwise mean (which divides by C as well)
    elementwise = (p_t * (p_t.log() - F.log_softmax(z / T, -1))).mean() * T * T
    assert torch.allclose(kd_loss(z, t, T), elementwise * 5, atol=1e-6)


def test_checkpoint_atomic_and_corrupt(tmp_path):
    state = {"model": {"w": torch.ones(3)}, "epoch": 1}
    ckpt.save_last(state, tmp_path)
    ckpt.save_last({**state, "epoch": 2}, tmp_path)
    assert ckpt.load_latest(tmp_path)["epoch"] == 2
    assert ckpt.load(tmp_path / "prev.ckpt")["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp"))
    # truncate last.ckpt: the error names the file, and loading falls back to prev.ckpt
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="last.ckpt is corrupt"):
        ckpt.load(tmp_path / "last.ckpt")
    assert ckpt.load_latest(tmp_path)["epoch"] == 1
    (tmp_path / "prev.ckpt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="last.ckpt"):
        ckpt.load_latest(tmp_path)


def test_checkpoint_refuses_code_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        ckpt.load(tmp_path / "evil.ckpt")


def test_subset_seed_fixes_the_subset_across_run_seeds(tmp_path):
    from kdrun.data.datasets import build_datasets

    a = build_datasets("digits", tmp_path, fraction=0.3, seed=1, subset_seed=7)
    b = build_datasets("digits", tmp_path, fraction=0.3, seed=2, subset_seed=7)
    c = build_datasets("digits", tmp_path, fraction=0.3, seed=2)
    assert torch.equal(a.train_images, b.train_images)
    assert not torch.equal(b.train_images, c.train_images)
    assert torch.equal(a.train_targets.bincount(), c.train_targets.bincount())  # stratified


def test_fingerprint_ignores_paths_and_logger_but_not_hyperparameters():
    from omegaconf import OmegaConf

    from kdrun.rundir import fingerprint

    base = {
        "paths": {"output_root": "/a"},
        "logger": {"wandb": True},
        "optim": {"lr": 0.1},
        "dataset": {"name": "digits", "fraction": 1.0},
        "trainer": {"epochs": 3, "log_every": 10},
    }

    def fp(**changes):
        cfg = OmegaConf.create(base)
        for key, value in changes.items():
            OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
        return fingerprint(cfg)

    assert fp() == fp(paths__output_root="/b", logger__wandb=False, trainer__log_every=1)
    assert fp() != fp(optim__lr=0.2)
    assert fp() != fp(trainer__epochs=4)
    # val_fraction arrived later: at its neutral 0.0 a run made before it still matches
    assert fp() == fp(dataset__val_fraction=0.0)
    assert fp() != fp(dataset__val_fraction=0.1)
