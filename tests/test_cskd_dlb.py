"""CS-KD and DLB: their batch samplers (pairing, overlap, coverage, determinism, resume, per-rank
slices), their losses against direct transcriptions of the formulas, the DLB logit cache across a
checkpoint round trip and under real two-process DDP, and a CLI smoke run of each."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdrun.data.loaders import DeviceTrainLoader
from kdrun.methods.base import Batch
from kdrun.methods.cskd import CSKD, PairBatchSampler, cskd_loss
from kdrun.methods.dlb import DLB, OverlapBatchSampler
from tests.conftest import run_kdrun
from tests.dist_utils import free_port, gloo_group
from tests.method_utils import build_method, tiny_context

# uneven class sizes, including a single-sample class (class 4)
TARGETS = torch.tensor([0] * 9 + [1] * 5 + [2] * 2 + [3] * 7 + [4] * 1 + [5] * 3)  # N = 27
N = TARGETS.shape[0]


# ----- direct transcriptions of the formulas (docs/methods.md) -------------------------------
def ce_ref(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logp = z.double().log_softmax(-1)
    return -logp[torch.arange(len(y)), y].mean()


def kd_ref_per_sample(z_s: torch.Tensor, z_t: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, one value per sample."""
    p_t = (z_t.double() / T).softmax(-1)
    return T * T * (p_t * (p_t.log() - (z_s.double() / T).log_softmax(-1))).sum(-1)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----- CS-KD sampler ----------------------------------------------------------------------------
def split_pairs(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = batch.shape[0] // 2
    return batch[:h], batch[h:]


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_cskd_partners_share_the_anchor_label(epoch):
    sampler = PairBatchSampler(TARGETS, batch_size=8, seed=3)
    sampler.set_epoch(epoch)
    counts = torch.bincount(TARGETS)
    batches = list(sampler)
    assert batches and all(b.dtype == torch.int64 for b in batches)
    for batch in batches:
        assert batch.shape[0] % 2 == 0
        anchors, partners = split_pairs(batch)
        assert torch.equal(TARGETS[partners], TARGETS[anchors])
        many = counts[TARGETS[anchors]] > 1
        assert bool((partners[many] != anchors[many]).all())
        assert torch.equal(partners[~many], anchors[~many])  # singleton class pairs with itself


def test_cskd_partner_draw_reaches_every_other_class_member():
    sampler = PairBatchSampler(TARGETS, batch_size=8, seed=0)
    seen: dict[int, set[int]] = {i: set() for i in range(N)}
    for epoch in range(60):
        sampler.set_epoch(epoch)
        for batch in sampler:
            anchors, partners = split_pairs(batch)
            for a, p in zip(anchors.tolist(), partners.tolist()):
                seen[a].add(p)
    for i in range(N):
        same = set(torch.nonzero(TARGETS == TARGETS[i]).flatten().tolist())
        expected = same - {i} if len(same) > 1 else {i}
        assert seen[i] == expected, i


@pytest.mark.parametrize("drop_last", [False, True])
def test_cskd_anchors_cover_the_training_set_once(drop_last):
    batch_size = 8  # h = 4; N = 27 -> 6 full anchor chunks + 3 left over
    sampler = PairBatchSampler(TARGETS, batch_size=batch_size, seed=1, drop_last=drop_last)
    sampler.set_epoch(2)
    batches = list(sampler)
    h = batch_size // 2
    expected_len = N // h if drop_last else math.ceil(N / h)
    assert len(sampler) == len(batches) == expected_len
    anchors = torch.cat([split_pairs(b)[0] for b in batches])
    if drop_last:
        assert anchors.shape[0] == (N // h) * h and anchors.unique().shape[0] == anchors.shape[0]
        assert all(b.shape[0] == batch_size for b in batches)
    else:
        assert torch.equal(anchors.sort().values, torch.arange(N))
        # an epoch processes 2N images: every anchor brings its partner
        assert sum(b.shape[0] for b in batches) == 2 * N


def test_cskd_sampler_is_deterministic_in_seed_and_epoch():
    def epoch_batches(seed: int, epoch: int) -> list[torch.Tensor]:
        s = PairBatchSampler(TARGETS, batch_size=8, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    a, b = epoch_batches(0, 1), epoch_batches(0, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, epoch_batches(0, 2)))
    assert not all(torch.equal(x, y) for x, y in zip(a, epoch_batches(1, 1)))
    s = PairBatchSampler(TARGETS, batch_size=8, seed=0)
    s.set_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(s.iter_from(3), a[3:], strict=True))


@pytest.mark.parametrize("world_size", [2, 3])
def test_cskd_rank_slices_hold_whole_pairs(world_size):
    batch_size = 12  # h = 6
    ref = PairBatchSampler(TARGETS, batch_size=batch_size, seed=4)
    ranks = [
        PairBatchSampler(TARGETS, batch_size, seed=4, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for s in (ref, *ranks):
        s.set_epoch(1)
    per_rank = [list(s) for s in ranks]
    for step, global_batch in enumerate(ref):
        g_anchors, g_partners = split_pairs(global_batch)
        partner_of = dict(zip(g_anchors.tolist(), g_partners.tolist()))
        local_anchors = []
        for r in range(world_size):
            anchors, partners = split_pairs(per_rank[r][step])
            assert anchors.shape == partners.shape and anchors.numel() > 0
            assert [partner_of[a] for a in anchors.tolist()] == partners.tolist()
            local_anchors.append(anchors)
        # the ranks' anchors are the global anchors, in order, each on exactly one rank
        assert torch.equal(torch.cat(local_anchors), g_anchors)


def test_cskd_rejects_batches_smaller_than_two_pairs_per_rank():
    with pytest.raises(ValueError):
        PairBatchSampler(TARGETS, batch_size=4, rank=0, world_size=3)


# ----- CS-KD loss -------------------------------------------------------------------------------
def test_cskd_loss_matches_the_formula():
    torch.manual_seed(0)
    h, C, T, lam = 6, 5, 4.0, 0.7
    logits = torch.randn(2 * h, C) * 3
    y = torch.randint(0, C, (2 * h,))
    y[h:] = y[:h]
    expected = ce_ref(logits[:h], y[:h]) + lam * kd_ref_per_sample(logits[:h], logits[h:], T).mean()
    loss, ce, kd = cskd_loss(logits[:h], y[:h], logits[h:], T, lam)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # through the method: an identity "model" makes batch.x the logits
    method = CSKD(num_classes=C, num_samples=2 * h, T=T, lam=lam)
    z = logits.clone().requires_grad_(True)
    out = method.training_step(nn.Identity(), Batch(z, y, torch.arange(2 * h)))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(out.logits, z[:h]) and torch.equal(out.targets, y[:h])
    assert out.logs["ce"].item() == pytest.approx(ce_ref(logits[:h], y[:h]).item(), rel=1e-5)
    assert out.logs["kd"].item() == pytest.approx(kd.item(), rel=1e-6)
    out.loss.backward()
    # partners are detached targets: no gradient through the partner half
    assert z.grad[:h].abs().sum() > 0 and torch.equal(z.grad[h:], torch.zeros(h, C))


# ----- DLB sampler ------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples,drop_last", [(27, False), (27, True), (24, False)])
def test_dlb_batches_overlap_by_half_and_cover_the_data(num_samples, drop_last):
    batch_size, h = 8, 4
    sampler = OverlapBatchSampler(num_samples, batch_size, seed=2, drop_last=drop_last)
    sampler.set_epoch(3)
    batches = list(sampler)
    chunks = num_samples // h if drop_last else math.ceil(num_samples / h)
    assert len(sampler) == len(batches) == chunks - 1
    assert all(b[:h].shape[0] == h for b in batches)
    for prev, cur in zip(batches, batches[1:]):
        assert cur.shape[0] == batch_size or cur is batches[-1]  # short last chunk
        assert torch.equal(cur[:h], prev[h:])
    seen = torch.cat(batches).unique()
    expected = (num_samples // h) * h if drop_last else num_samples
    assert seen.shape[0] == expected and seen.max() < num_samples
    # every sample is new exactly once: the first batch's first half plus every second half
    new = torch.cat([batches[0][:h], *[b[h:] for b in batches]])
    assert torch.equal(new.sort().values, seen)


def test_dlb_sampler_is_deterministic_and_iter_from_equals_skipping():
    def epoch_batches(seed: int, epoch: int) -> list[torch.Tensor]:
        s = OverlapBatchSampler(30, 8, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    a = epoch_batches(5, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, epoch_batches(5, 2), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, epoch_batches(5, 3)))
    s = OverlapBatchSampler(30, 8, seed=5)
    s.set_epoch(2)
    for start in (0, 1, 4, len(a)):
        assert all(torch.equal(x, y) for x, y in zip(s.iter_from(start), a[start:], strict=True))


def test_dlb_single_chunk_epoch():
    s = OverlapBatchSampler(3, 8)
    assert len(s) == 1 and torch.equal(list(s)[0].sort().values, torch.arange(3))


@pytest.mark.parametrize("world_size", [2, 3])
def test_dlb_rank_slices_keep_the_overlap(world_size):
    batch_size, h = 16, 8
    ref = OverlapBatchSampler(45, batch_size, seed=1)
    ranks = [
        OverlapBatchSampler(45, batch_size, seed=1, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for s in (ref, *ranks):
        s.set_epoch(0)
    global_batches = list(ref)
    for r, s in enumerate(ranks):
        local = list(s)
        first = len(torch.tensor_split(torch.arange(h), world_size)[r])
        for prev, cur in zip(local, local[1:]):
            assert torch.equal(cur[:first], prev[first:])  # my first half = my last second half
    for step, g in enumerate(global_batches):
        firsts = [
            list(s)[step][: len(torch.tensor_split(torch.arange(h), world_size)[r])]
            for r, s in enumerate(ranks)
        ]
        seconds = [list(s)[step][f.shape[0] :] for s, f in zip(ranks, firsts)]
        assert torch.equal(torch.cat(firsts), g[:h]) and torch.equal(torch.cat(seconds), g[h:])


# ----- DLB loss and cache -----------------------------------------------------------------------
def dlb_method(C: int, n: int, batch_size: int, T: float = 3.0, alpha: float = 1.0) -> DLB:
    method = DLB(num_classes=C, num_samples=n, T=T, alpha=alpha)
    method.train_batch_sampler(torch.zeros(n, dtype=torch.int64), batch_size, 0, 0, 1, False)
    return method


def test_dlb_loss_matches_the_formula_with_the_cache():
    torch.manual_seed(1)
    C, n, B, h, T, alpha = 6, 40, 8, 4, 3.0, 0.5
    y_all = torch.randint(0, C, (n,))
    method = dlb_method(C, n, B, T, alpha)
    method.on_epoch_start(0, 2)
    sampler = OverlapBatchSampler(n, B, seed=0)
    sampler.set_epoch(0)
    idx0, idx1, idx2 = list(sampler)[:3]
    model = nn.Identity()

    # step 0: nothing cached -> CE only
    z0 = torch.randn(B, C) * 2
    out0 = method.training_step(model, Batch(z0, y_all[idx0], idx0))
    assert out0.loss.item() == pytest.approx(ce_ref(z0, y_all[idx0]).item(), rel=1e-6)
    assert out0.logs["kd"].item() == 0.0 and out0.logs["kd_active"].item() == 0.0
    assert torch.equal(method.cache.index, idx0[h:])
    assert torch.equal(method.cache.logits, z0[h:])

    # step 1: the first half is step 0's second half; its cached logits are the KD target
    z1 = torch.randn(B, C) * 2
    out1 = method.training_step(model, Batch(z1, y_all[idx1], idx1))
    kd = kd_ref_per_sample(z1[:h], z0[h:], T).mean()
    expected = ce_ref(z1, y_all[idx1]) + alpha * kd
    assert out1.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out1.logs["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert out1.logs["kd_active"].item() == 1.0

    # a first half that is not the cached one (wrong indices) gets no KD term
    stale = dlb_method(C, n, B, T, alpha)
    stale.on_epoch_start(0, 2)
    stale.training_step(model, Batch(z0, y_all[idx0], idx0))
    out = stale.training_step(model, Batch(z1, y_all[idx2], idx2))
    assert out.loss.item() == pytest.approx(ce_ref(z1, y_all[idx2]).item(), rel=1e-6)

    # the first step of a new epoch ignores the previous epoch's cache, even if indices match
    carry = dlb_method(C, n, B, T, alpha)
    carry.on_epoch_start(0, 2)
    carry.training_step(model, Batch(z0, y_all[idx0], idx0))
    carry.on_epoch_start(1, 2)
    out = carry.training_step(model, Batch(z1, y_all[idx1], idx1))
    assert out.loss.item() == pytest.approx(ce_ref(z1, y_all[idx1]).item(), rel=1e-6)


def test_dlb_last_batch_with_a_short_new_half():
    C, n, B, h = 3, 10, 8, 4  # chunks 4, 4, 2 -> batches [c0, c1], [c1, c2 (2)]
    method = dlb_method(C, n, B)
    method.on_epoch_start(0, 1)
    batches = list(OverlapBatchSampler(n, B))
    assert [b.shape[0] for b in batches] == [8, 6]
    torch.manual_seed(2)
    y = torch.randint(0, C, (n,))
    z0, z1 = torch.randn(8, C), torch.randn(6, C)
    method.training_step(nn.Identity(), Batch(z0, y[batches[0]], batches[0]))
    out = method.training_step(nn.Identity(), Batch(z1, y[batches[1]], batches[1]))
    expected = ce_ref(z1, y[batches[1]]) + kd_ref_per_sample(z1[:h], z0[h:], 3.0).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the cache keeps its fixed shape [h, C]; the unused rows are padding (index -1)
    assert method.cache.logits.shape == (h, C)
    assert method.cache.index.tolist() == [*batches[1][h:].tolist(), -1, -1]


def test_dlb_resume_continues_identically(tmp_path):
    cfg, ctx, runner = tiny_context(tmp_path, ["method=dlb"])
    s = ctx.settings

    def make():
        torch.manual_seed(0)
        method, model = build_method(cfg, ctx, runner)
        sampler = method.train_batch_sampler(ctx.data.train_targets, s.batch_size, 7, 0, 1, False)
        loader = DeviceTrainLoader(ctx.data, sampler, torch.device("cpu"), seed=7)
        params = list(model.parameters()) + list(method.parameters())
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        return method, model, loader, opt

    def step(method, model, opt, triple):
        out = method.training_step(model, Batch(*triple))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    method, model, loader, opt = make()
    method.on_epoch_start(0, 2)
    model.train()
    loader.set_epoch(0)
    it = loader.iter_from(0)
    for _ in range(3):
        step(method, model, opt, next(it))
    assert bool(method.cache.valid)
    state = roundtrip(
        {"model": model.state_dict(), "method": method.state_dict(), "opt": opt.state_dict()}
    )

    method2, model2, loader2, opt2 = make()
    model2.load_state_dict(state["model"])
    method2.load_state_dict(state["method"])
    opt2.load_state_dict(state["opt"])
    for key, value in method.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, method2.state_dict()[key]), key
    method2.on_epoch_start(0, 2)  # the engine calls it again when it resumes mid-epoch
    model2.train()
    loader2.set_epoch(0)

    loss = step(method, model, opt, next(it))
    loss2 = step(method2, model2, opt2, next(loader2.iter_from(3)))
    assert torch.equal(loss, loss2)
    assert float(loss) > 0
    assert torch.equal(method.cache.logits, method2.cache.logits)


# ----- DLB under real DDP (two gloo processes) --------------------------------------------------
def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from kdrun import distributed

    with gloo_group(rank, world_size, port):
        C, n, B, T, alpha = 4, 30, 12, 3.0, 1.0  # h = 6: rank slices of 3
        gen = torch.Generator().manual_seed(0)
        table = torch.randn(n, C, generator=gen) * 2
        y_all = torch.randint(0, C, (n,), generator=gen)
        method = DLB(num_classes=C, num_samples=n, T=T, alpha=alpha)
        sampler = method.train_batch_sampler(y_all, B, 0, rank, world_size, False)
        method.on_epoch_start(0, 1)
        sampler.set_epoch(0)
        prev = None  # this rank's previous (indices, logits) of its new half
        for step, index in enumerate(sampler):
            z = table[index] * (1.0 + 0.1 * step)  # logits change between steps
            out = method.training_step(nn.Identity(), Batch(z, y_all[index], index))
            k = 3
            expected = ce_ref(z, y_all[index])
            if prev is not None:
                assert torch.equal(prev[0], index[:k])
                expected = expected + alpha * kd_ref_per_sample(z[:k], prev[1], T).mean()
            assert abs(out.loss.item() - expected.item()) < 1e-5, (rank, step)
            prev = (index[k:], z[k:])
            # every rank holds the same, global cache
            gathered = distributed.all_gather_cat(method.cache.logits[None])
            assert torch.equal(gathered[0], gathered[1])
        Path(out_dir, f"ok{rank}").write_text(str(step + 1))


@pytest.mark.slow
def test_dlb_cache_under_two_process_ddp(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok0").read_text() == (tmp_path / "ok1").read_text() == "4"


# ----- CLI smoke runs ---------------------------------------------------------------------------
SMOKE = [
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


@pytest.mark.parametrize("name,prefix", [("cs_kd", "cskd"), ("dlb", "dlb")])
def test_cli_smoke(name, prefix, tmp_path):
    run_kdrun([*SMOKE, f"method={name}"], cwd=tmp_path)
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["method"] == name and summary["epochs"] == 1
    assert 0.0 <= summary["test/acc1"] <= 1.0 and math.isfinite(summary["test/nll"])
    assert f"{prefix}/T" in summary
    events = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    epoch_record = next(e for e in events if "train/loss" in e)
    assert math.isfinite(epoch_record["train/kd"]) and math.isfinite(epoch_record["train/ce"])
