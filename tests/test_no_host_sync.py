"""SPEC §8: the training step performs no host synchronisation. Every Tensor -> Python
conversion (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool``/``int``/``float``) is counted
while epochs of different lengths run; the count must not grow with the number of steps (the
engine reads its device-side meters once per epoch, methods may read once per epoch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.method_utils import build_method, tiny_context

METHODS = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "conf/method").glob("*.yaml")
)
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


class SyncCounter:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.saved = {}

    def __enter__(self):
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            self.saved[name] = original

            def wrapper(t, *a, __name=name, __orig=original, **k):
                self.calls[__name] = self.calls.get(__name, 0) + 1
                return __orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def syncs_in_epoch(trainer, steps: int) -> SyncCounter:
    trainer.loader.limit_batches = steps
    trainer.step_in_epoch = 0
    with SyncCounter() as counter:
        trainer.train_one_epoch()
    trainer.epoch += 1
    return counter


@pytest.mark.parametrize("name", METHODS)
def test_host_syncs_do_not_grow_with_steps(name, tmp_path):
    cfg, ctx, runner = tiny_context(
        tmp_path,
        [
            f"method={name}",
            "trainer.batch_size=8",
            "trainer.log_every=1000000",
            "trainer.epochs=4",
            "dataset.options.train_size=96",
        ],
    )
    method, model = build_method(cfg, ctx, runner)
    trainer = ctx.make_trainer(model, method)
    syncs_in_epoch(trainer, 2)  # warm-up (lazy initialisation may sync once)
    short = syncs_in_epoch(trainer, 2)
    long = syncs_in_epoch(trainer, 8)
    assert long.total == short.total, (name, short.calls, long.calls)
    assert short.total <= 4, short.calls
