"""kdrun model zoo: every backbone is a ``StagedModel`` (see ``kdrun.models.base``).

Configs live in ``conf/model/<name>.yaml`` (``_target_: kdrun.models.<Class>`` plus architecture
arguments); the runner instantiates them with
``hydra.utils.instantiate(cfg.model, num_classes=C, in_channels=ch, image_size=S)``.
``MODEL_NAMES`` lists those config names; ``create_model(name, ...)`` does the same outside Hydra.

| config                                                     | class               | stages                  |
|------------------------------------------------------------|---------------------|-------------------------|
| resnet8, resnet20, resnet32, resnet56, resnet110           | ``CifarResNet``     | 16/32/64                |
| resnet8x4, resnet32x4                                      | ``CifarResNet``     | 64/128/256 (stem 32)    |
| resnet18, resnet34                                         | ``ResNet``          | 64/128/256/512          |
| resnet50                                                   | ``ResNet``          | 256/512/1024/2048       |
| preact_resnet18                                            | ``PreActResNet``    | 64/128/256/512          |
| wrn_16_2, wrn_40_2 / wrn_28_10                             | ``WideResNet``      | 32/64/128 / 160/320/640 |
| tv_resnet18 / tv_resnet50                                  | ``TorchvisionResNet``| as resnet18 / resnet50 |
| small_cnn                                                  | ``SmallCNN``        | 32/64/128               |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdrun.models.base import StagedModel
from kdrun.models.resnet import BasicBlock, Bottleneck, PreActBlock, PreActResNet, ResNet
from kdrun.models.resnet_cifar import CifarResNet
from kdrun.models.small_cnn import SmallCNN
from kdrun.models.torchvision_models import TorchvisionResNet
from kdrun.models.wrn import WideResNet

__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "PreActBlock",
    "PreActResNet",
    "ResNet",
    "SmallCNN",
    "StagedModel",
    "TorchvisionResNet",
    "WideResNet",
    "create_model",
    "model_config_path",
]

MODEL_NAMES: list[str] = [
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "resnet18",
    "resnet34",
    "resnet50",
    "preact_resnet18",
    "wrn_16_2",
    "wrn_40_2",
    "wrn_28_10",
    "tv_resnet18",
    "tv_resnet50",
    "small_cnn",
]

_CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"


def model_config_path(name: str) -> Path:
    """Path of the packaged ``conf/model/<name>.yaml``."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return _CONF_DIR / f"{name}.yaml"


def create_model(
    name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32, **overrides: Any
) -> StagedModel:
    """Instantiate ``conf/model/<name>.yaml`` (plus ``overrides`` of its arguments) outside Hydra."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(model_config_path(name))
    return instantiate(
        cfg,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        **overrides,
    )
