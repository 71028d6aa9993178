"""The training step performs no host synchronisation, checked at the dispatcher level.

:class:`kdrun.sync_check.HostSyncCounter` watches every ATen call (a ``TorchDispatchMode``)
and records those that make the host wait for the device: ``_local_scalar_dense`` (``item()``,
``bool(t)``, a 0-d tensor passed where an op expects a Scalar), ops whose output shape depends
on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ...),
device-to-host copies, and ``tolist``/``numpy``/``cpu`` (which a CPU tensor does not dispatch).
CPU tensors stand in for device tensors, so a CPU run shows what a GPU run would stall on. The
only exception is ``F.one_hot(labels, num_classes)``'s label check, which ATen does on the host
for CPU tensors only (see the module for how it is recognised).

Design: every method in ``conf/method`` is built on tiny synthetic data and trained with the
engine's real ``Trainer.train_one_epoch``. The train loader's iterator is wrapped by
``HostSyncCounter.label_steps``, so what runs between receiving a batch and asking for the next
one (forward, loss, backward, optimizer and scheduler step, meter updates) is region
``step i``, the loader's own work is ``loader``, and the epoch's start and end (``set_epoch``,
``on_epoch_start``, the one meter read) are ``outside``. Checked:

* zero syncs in every ``step`` region of every epoch, including the first one and the steps of
  a method's own teacher stages (trained by ``method.prepare``, also through ``fit``);
* the syncs of a whole epoch do not depend on its length: epochs of 2 and 8 steps (with
  ``trainer.log_every`` out of reach) record the same events — only the end-of-epoch read.

The same check runs with gradient clipping, bf16 autocast and method options that take other
branches of the step, fp16 with its GradScaler included (the engine builds a fused optimizer
there, which GradScaler hands the found-inf flag on the device; an unfused step would read it
on the host). ``test_check_detects_*`` show that the check fails on a step
that does sync, in the real engine and op by op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdrun.data.loaders import DeviceTrainLoader
from kdrun.sync_check import HostSyncCounter
from tests.dist_utils import free_port, gloo_group
from tests.method_utils import build_method, tiny_context

METHODS = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "conf/method").glob("*.yaml")
)
#: shorter teacher stages (each evaluates and plots once per epoch); the self-regulated
#: teacher keeps whole epochs so that its students keep most samples
SHORT_STAGES = {
    "born_again": ["method.generations=2", "trainer.limit_train_batches=3"],
    "tf_kd_self": ["trainer.limit_train_batches=3"],
    **{m: ["method.teacher_epochs=1"] for m in ("kd", "regulated", "hybrid", "significance")},
}


@contextlib.contextmanager
def counting_train_steps() -> Iterator[HostSyncCounter]:
    """A running counter; every train loader's batches are labelled as its steps."""
    counter = HostSyncCounter("cpu")
    iter_from = DeviceTrainLoader.iter_from
    DeviceTrainLoader.iter_from = lambda loader, start=0: counter.label_steps(
        iter_from(loader, start)
    )
    try:
        with counter:
            yield counter
    finally:
        DeviceTrainLoader.iter_from = iter_from


@pytest.fixture
def counted_steps():
    with counting_train_steps() as counter:
        yield counter


def epoch_syncs(counter: HostSyncCounter, trainer, steps: int) -> list[str]:
    """The syncs of one real epoch of ``steps`` steps (event texts without the step number)."""
    trainer.loader.limit_batches = steps
    trainer.step_in_epoch = 0
    first, seen = len(counter.syncs), counter.steps_seen
    trainer.train_one_epoch()
    assert trainer.step_in_epoch == steps, "the epoch is shorter than the check needs"
    assert counter.steps_seen - seen == steps, "the train loader's steps were not labelled"
    trainer.epoch += 1
    return sorted(f"{s.region.split()[0]}: {s.op} at {s.where}" for s in counter.syncs[first:])


def fmt(syncs) -> str:
    return "\n".join(map(str, syncs)) or "none"


def check_epochs(
    counter: HostSyncCounter,
    tmp_path,
    name: str,
    *overrides: str,
    amp: str = "off",
    train_size: int = 96,
    long_steps: int = 8,
):
    """Build ``name``'s trainer (and teacher stages) and train epochs of 2, 2, ``long_steps``."""
    cfg, ctx, runner = tiny_context(
        tmp_path,
        [
            f"method={name}",
            "trainer.batch_size=8",
            "trainer.log_every=1000000",
            "trainer.epochs=4",
            f"dataset.options.train_size={train_size}",
            *SHORT_STAGES.get(name, []),
            *overrides,
        ],
    )
    ctx.hardware.amp = amp  # as the CLI's resolved hardware.amp
    method, model = build_method(cfg, ctx, runner)  # trains the teacher stages, if any
    trainer = ctx.make_trainer(model, method)
    epochs = []
    for steps in (2, 2, long_steps):  # the first epoch's boundary may create state; its steps count
        epochs.append(epoch_syncs(counter, trainer, steps))
        in_steps = counter.in_steps()
        assert not in_steps, f"{name}: host syncs in training steps:\n{counter.summary(in_steps)}"
    short, long = epochs[1:]
    assert long == short, f"{name}: an epoch's syncs grow with its length:\n{counter.summary()}"


@pytest.mark.parametrize("name", METHODS)
def test_training_step_has_no_host_sync(name, tmp_path, counted_steps):
    check_epochs(counted_steps, tmp_path, name)


@pytest.mark.parametrize(
    ("name", "overrides", "amp"),
    [
        ("ce", ["trainer.grad_clip=1.0"], "off"),
        ("ce", [], "bf16"),
        ("ps_kd", [], "bf16"),
        ("lsskd", ["method.soften_aux=false", "method.head=bottleneck"], "off"),
        ("tf_kd_reg", ["method.variant=reference_code"], "off"),
        (
            "regulated",
            ["method.reduction=participants", "method.teacher_reduction=participants"],
            "off",
        ),
        ("ce", [], "fp16"),  # GradScaler with the fused optimizer the engine builds for fp16
    ],
    ids=[
        "grad_clip",
        "bf16",
        "ps_kd-bf16",
        "lsskd-hard-aux-bottleneck",
        "tf_kd_reg-reference_code",
        "regulated-participants",
        "fp16-GradScaler",
    ],
)
def test_step_variants_have_no_host_sync(name, overrides, amp, tmp_path, counted_steps):
    check_epochs(counted_steps, tmp_path, name, *overrides, amp=amp)


def _ddp_worker(rank: int, port: int, root: str) -> None:
    with gloo_group(rank, 2, port), counting_train_steps() as counter:
        for name in DDP_METHODS:
            # 99 samples, batch 8: the 13th (last) global batch of 3 splits 2/1 over the ranks
            check_epochs(counter, Path(root, name, str(rank)), name, train_size=99, long_steps=13)


#: a per-sample bank gathered over the ranks (ps_kd), the empty-step guard's all-reduce and the
#: self-regulated teacher (regulated)
DDP_METHODS = ("ps_kd", "regulated")


@pytest.mark.slow
def test_ddp_training_step_has_no_host_sync(tmp_path):
    """Two gloo ranks, an uneven last batch: the steps still read nothing on the host."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)


def test_check_detects_a_syncing_method_step(tmp_path, counted_steps, monkeypatch):
    """The same real epoch, with a ``ce`` step that reads its loss on the host."""
    counter = counted_steps
    cfg, ctx, runner = tiny_context(tmp_path, ["method=ce", "trainer.batch_size=8"])
    method, model = build_method(cfg, ctx, runner)
    trainer = ctx.make_trainer(model, method)
    step = method.training_step

    def syncing_step(model, batch):
        out = step(model, batch)
        out.loss = out.loss * (out.loss.detach().item() > 0)
        return out

    monkeypatch.setattr(method, "training_step", syncing_step)
    epoch_syncs(counter, trainer, 3)
    syncs = counter.in_steps()
    assert [s.region for s in syncs] == ["step 0", "step 1", "step 2"], fmt(syncs)
    assert {s.op for s in syncs} == {"aten._local_scalar_dense.default"}, fmt(syncs)
    assert all(Path(__file__).name in s.where for s in syncs), fmt(syncs)


def run_step(step) -> HostSyncCounter:
    """``step`` applied to one batch, inside a fresh counter's step region."""
    x = torch.randn(8, 4, requires_grad=True)
    with HostSyncCounter("cpu") as counter:
        for batch in counter.label_steps([x]):
            step(batch)
    return counter


SYNCING_STEPS = {
    "item": lambda x: (x * x.sum().item()).sum().backward(),
    "bool": lambda x: x.sum().backward() if x.sum() > 0 else None,
    "0d-tensor-as-scalar": lambda x: x.add(x, alpha=x.detach().max()).sum().backward(),
    "foreach-0d-weight": lambda x: torch._foreach_lerp_(
        [x.detach()], [x.detach()], 1 - x.detach().mean()
    ),
    "bool-mask-index": lambda x: x[x > 0].sum().backward(),
    "bool-mask-assign": lambda x: x.detach().__setitem__(x > 0, 0.0),
    "nonzero": lambda x: torch.where(x > 0),
    "unique": lambda x: torch.unique(x.argmax(1)),
    "repeat_interleave": lambda x: x.repeat_interleave(x.argmax(1), dim=0),
    "tolist": lambda x: x.detach().tolist(),
    "cpu": lambda x: x.detach().cpu(),
    "one_hot-reads-max": lambda x: F.one_hot(x.argmax(1)),
}
SYNC_FREE_STEPS = {
    "clamp-tensor-bound": lambda x: torch.clamp(x, max=x.new_tensor(1.0)).sum().backward(),
    "foreach-tensor-weights": lambda x: torch._foreach_lerp_(
        [x.detach()], [x.detach()], [x.mean().detach()]
    ),
    "masked_fill": lambda x: x.detach().masked_fill_(x > 0, 0.0),
    "where": lambda x: torch.where(x > 0, x, 0.0).sum().backward(),
    "python-scalars": lambda x: (x * 0.5 + 1).sum().backward(),
}


@pytest.mark.parametrize("case", sorted(SYNCING_STEPS))
def test_check_detects_a_syncing_step(case):
    counter = run_step(SYNCING_STEPS[case])
    assert counter.in_steps() and counter.syncs == counter.in_steps(), counter.summary()


@pytest.mark.parametrize("case", sorted(SYNC_FREE_STEPS))
def test_check_passes_a_sync_free_step(case):
    counter = run_step(SYNC_FREE_STEPS[case])
    assert not counter.syncs and not counter.excused, counter.summary()


def test_one_hot_label_check_on_cpu_is_excused_and_nothing_else():
    """``F.one_hot(y, C)`` reads min and max on the host for CPU labels only (CUDA checks on
    the device): those reads are set aside; a sync next to it in the same step still counts."""
    counter = run_step(lambda x: F.one_hot(x.argmax(1), 4).float().mul(x).sum().backward())
    assert not counter.syncs, counter.summary()
    assert [s.op for s in counter.excused] == ["aten._local_scalar_dense.default"] * 2
    counter = run_step(lambda x: F.one_hot(x.argmax(1), 4).sum().item())
    assert len(counter.syncs) == 1 and len(counter.excused) == 2, counter.summary()


def test_loader_work_is_labelled_apart_from_the_step():
    def batches():
        x = torch.randn(4)
        for _ in range(2):
            x.sum().item()  # the loader's own work: region "loader"
            yield x

    with HostSyncCounter("cpu") as counter:
        seen = list(counter.label_steps(batches()))
        seen[-1].sum().item()  # after the epoch: region "outside"
    assert [s.region for s in counter.syncs] == ["loader", "loader", "outside"]


def test_a_gpu_run_watches_only_device_tensors():
    """With ``HostSyncCounter("cuda")`` a CPU tensor is host data: reading it waits for
    nothing, and ``tolist``/``cpu`` are left to the dispatcher (a device copy shows there)."""
    with HostSyncCounter("cuda") as counter:
        torch.arange(4).sum().item()
        torch.arange(4).tolist()
        torch.arange(4)[torch.arange(4) > 1]
    assert not counter.syncs, counter.summary()
