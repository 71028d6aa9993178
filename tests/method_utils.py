"""Helpers for method tests: a real run context on tiny synthetic data, composed from the real
config tree, and a batch from the real loader. ``build_method`` hands ``prepare`` the runner
through :class:`ProtocolOnly`, so every test that builds a multi-stage method also checks that
the method uses only what the stage protocol declares."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from kdrun.build import hardware_settings, trainer_settings
from kdrun.console import SilentConsole
from kdrun.data.datasets import build_datasets
from kdrun.data.loaders import DeviceTrainLoader
from kdrun.data.samplers import BatchSampler
from kdrun.loggers.jsonl import JsonlLogger
from kdrun.methods import base
from kdrun.methods.base import Batch
from kdrun.stages import RunContext, StageRunner

CONF = Path(__file__).resolve().parents[1] / "conf"

TINY = [
    "dataset=synthetic",
    "dataset.options.train_size=64",
    "dataset.options.test_size=32",
    "dataset.options.image_size=16",
    "model=resnet8",
    "hardware=cpu",
    "logger=none",
    "trainer.epochs=1",
    "trainer.batch_size=16",
]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def tiny_context(tmp_path: Path, overrides: list[str] = ()):
    """(cfg, ctx, runner) for a tiny real run in ``tmp_path``."""
    cfg = compose_cfg([*TINY, f"paths.teacher_cache={tmp_path / 'cache'}", *overrides])
    data = build_datasets(
        cfg.dataset.name,
        root=str(tmp_path / "data"),
        fraction=float(cfg.dataset.fraction),
        seed=int(cfg.seed),
        **dict(cfg.dataset.options),
    )
    ctx = RunContext(
        cfg=cfg,
        data=data,
        hardware=hardware_settings(cfg, torch.device("cpu"), "off"),
        settings=trainer_settings(cfg),
        logger=JsonlLogger(tmp_path),
        console=SilentConsole(),
        run_dir=tmp_path,
        seed=int(cfg.seed),
    )
    runner = StageRunner(ctx, cache_dir=tmp_path / "cache")
    return cfg, ctx, runner


class ProtocolOnly:
    """A runner as a method may see it: only the members of the protocol
    :class:`kdrun.methods.base.StageRunner`; any other attribute is an ``AttributeError``."""

    MEMBERS = frozenset(n for n in vars(base.StageRunner) if not n.startswith("_"))

    def __init__(self, runner: StageRunner) -> None:
        object.__setattr__(self, "_runner", runner)

    def __getattr__(self, name: str):
        if name not in self.MEMBERS:
            raise AttributeError(
                f"a method used runner.{name}, which the StageRunner protocol does not declare "
                f"(it declares {sorted(self.MEMBERS)})"
            )
        return getattr(self._runner, name)


def build_method(cfg, ctx, runner):
    method = instantiate(
        cfg.method, num_classes=ctx.data.spec.num_classes, num_samples=ctx.num_samples()
    )
    method.prepare(ProtocolOnly(runner))
    model = ctx.new_model()
    method.setup(model)
    return method, model


def batches(ctx, method, epoch: int = 0, seed: int = 0):
    """The real training batches of one epoch, as :class:`Batch` objects."""
    s = ctx.settings
    sampler = method.train_batch_sampler(
        ctx.data.train_targets, s.batch_size, seed, 0, 1, s.drop_last
    ) or BatchSampler(ctx.num_samples(), s.batch_size, seed=seed)
    loader = DeviceTrainLoader(ctx.data, sampler, torch.device("cpu"), seed)
    loader.set_epoch(epoch)
    for x, y, index in loader:
        yield Batch(x, y, index)
