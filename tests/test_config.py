"""Every option of every config group composes, validates and instantiates; bad values are
rejected with one clear line before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from kdrun.config import validate
from kdrun.errors import ConfigError
from kdrun.methods.base import Method
from kdrun.schedules import Schedule

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = [
    "dataset",
    "model",
    "method",
    "optim",
    "schedule",
    "hardware",
    "logger",
    "experiment",
    "launcher",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):  # the app's cfg has no hydra node (it lives in HydraConfig)
        del cfg["hydra"]
    return cfg


ALL = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} is empty"


@pytest.mark.parametrize(("group", "option"), ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_option_composes_validates_and_instantiates(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    validate(cfg)
    assert HydraConfig.get().runtime.choices[group] == option
    if group == "model":
        model = instantiate(cfg.model, num_classes=10, in_channels=3, image_size=32)
        assert isinstance(model, torch.nn.Module)
        assert len(model.stage_channels) == len(model.stages) >= 2
    if group == "method":
        method = instantiate(cfg.method, num_classes=10, num_samples=100)
        assert isinstance(method, Method)
    if group == "optim":
        opt = instantiate(cfg.optim)([torch.nn.Parameter(torch.zeros(2))])
        assert isinstance(opt, torch.optim.Optimizer)
    if group == "schedule":
        sched = instantiate(cfg.schedule)
        assert isinstance(sched, Schedule)
        assert 0 < sched(0.5, 10) <= 1.0
    if group in ("dataset", "experiment"):
        assert cfg.dataset.name
        assert 0 < cfg.dataset.fraction <= 1


def test_dataset_picks_model_and_user_choice_wins():
    assert HydraConfig.get is not None
    compose_cfg(["dataset=cifar100"])
    assert HydraConfig.get().runtime.choices["model"] == "resnet18"
    compose_cfg(["dataset=fashion_mnist"])
    assert HydraConfig.get().runtime.choices["model"] == "small_cnn"
    compose_cfg(["dataset=cifar100", "model=resnet20"])
    assert HydraConfig.get().runtime.choices["model"] == "resnet20"


BAD = [
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["trainer.epochs=0"], "trainer.epochs"),
    (["optim.lr=-0.1"], "optim.lr"),
    (["dataset.fraction=0"], "dataset.fraction"),
    (["dataset.fraction=1.5"], "dataset.fraction"),
    (["method=label_smoothing", "method.eps=1.7"], "method.eps"),
    (["hardware.amp=fp8"], "hardware.amp"),
    (["dataset.loader=gpu"], "dataset.loader"),
    (["eval.n_bins=0"], "eval.n_bins"),
    (["+method.unknown_knob=3"], "method.unknown_knob"),
    (["trainer.drop_last=maybe"], "trainer.drop_last"),
    (["resume=sometimes"], "resume"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_rejected_with_one_line(overrides, key):
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert key in message
    assert "\n" not in message


def test_model_args_checked_against_signature():
    cfg = compose_cfg(["model=resnet20", "+model.widht=3"])
    with pytest.raises(ConfigError, match="model.widht is not an option"):
        validate(cfg)
