"""torchvision ImageNet ResNets behind the ``StagedModel`` API.

``TorchvisionResNet(arch="resnet18" | "resnet34" | "resnet50" | "resnet101" | "resnet152" |
"wide_resnet50_2" | "resnext50_32x4d" | ...)`` builds ``torchvision.models.<arch>(weights=None,
num_classes=...)`` (never pretrained weights) and re-homes its modules:

- ``stem = Sequential(conv1, bn1, relu, maxpool)``, ``stages = [layer1, layer2, layer3, layer4]``,
  ``classifier = fc``; the modules are torchvision's own blocks, so ``forward`` computes exactly
  torchvision's function (checked in the tests by loading a torchvision state dict with
  ``load_torchvision_state_dict``).
- Input adaptation: ``in_channels != 3`` replaces ``conv1`` by a fresh conv with that many input
  channels. For small inputs (``image_size < 64``, or ``stem="cifar"``) ``conv1`` becomes a 3x3
  stride-1 conv and the max-pool an Identity (the CIFAR stem), so a 32 px image reaches ``layer4``
  at 4x4 instead of 1x1. From 64 px up (Tiny-ImageNet, ImageNet) the ImageNet stem is kept;
  ``stem="cifar"`` forces the small stem for 64 px inputs. Replaced convs are Kaiming-initialised
  like torchvision's.
- ``make_stage`` builds torchvision blocks (with torchvision's 1x1-conv+BN downsample, groups and
  base width of the arch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torchvision
from torch import Tensor, nn

from kdrun.models.base import StagedModel, StemChoice, conv3x3, resolve_image_size, resolve_stem

__all__ = ["TorchvisionResNet"]

TorchvisionArch = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
]

_TV_PREFIXES = {
    "conv1.": "stem.0.",
    "bn1.": "stem.1.",
    "layer1.": "stages.0.",
    "layer2.": "stages.1.",
    "layer3.": "stages.2.",
    "layer4.": "stages.3.",
    "fc.": "classifier.",
}


class TorchvisionResNet(StagedModel):
    """A torchvision ResNet family model (randomly initialised) as a ``StagedModel``.

    Args:
        num_classes, in_channels, image_size: data facts (see ``StagedModel``).
        arch: name of a torchvision ResNet builder (``resnet18``, ``resnet50``, ...).
        stem: ``"auto"`` | ``"cifar"`` | ``"imagenet"``.
        zero_init_residual: passed to torchvision (zero the last BN of every block; default False).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        arch: TorchvisionArch = "resnet18",
        stem: StemChoice = "auto",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        builder = getattr(torchvision.models, arch, None)
        if builder is None or not (arch.startswith("res") or arch.startswith("wide_res")):
            raise ValueError(f"arch must be a torchvision ResNet builder name, got {arch!r}")
        tv = builder(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
        self.arch = arch
        self.zero_init_residual = bool(zero_init_residual)
        self.stem_kind = resolve_stem(stem, resolve_image_size(image_size))
        self.block = type(tv.layer1[0])
        self._groups, self._base_width = tv.groups, tv.base_width
        stem_channels = tv.conv1.out_channels
        conv1, maxpool = tv.conv1, tv.maxpool
        if self.stem_kind == "cifar":
            conv1, maxpool = conv3x3(in_channels, stem_channels), nn.Identity()
        elif in_channels != conv1.in_channels:
            conv1 = nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False)
        if conv1 is not tv.conv1:
            nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
        layers = [tv.layer1, tv.layer2, tv.layer3, tv.layer4]
        self._finish(
            stem=nn.Sequential(conv1, tv.bn1, tv.relu, maxpool),
            stem_channels=stem_channels,
            stage_channels=[_out_channels(layer) for layer in layers],
            stage_strides=[1, 2, 2, 2],
            stage_blocks=[len(layer) for layer in layers],
            num_classes=num_classes,
            stages=layers,
            init=False,  # torchvision already initialised everything (Kaiming, fan_out)
        )
        self.classifier = tv.fc  # keep torchvision's fc (same shape, same default init)

    def _make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        exp = self.block.expansion
        if out_channels % exp:
            raise ValueError(f"out_channels must be a multiple of {exp} for {self.arch}")
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        planes = out_channels // exp
        return self.block(
            in_channels,
            planes,
            stride,
            downsample,
            groups=self._groups,
            base_width=self._base_width,
        )

    def load_torchvision_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load a torchvision ``ResNet.state_dict()`` (renaming conv1/bn1/layerN/fc keys)."""
        renamed = {}
        for key, value in state_dict.items():
            for old, new in _TV_PREFIXES.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            renamed[key] = value
        return self.load_state_dict(renamed, strict=strict)


def _out_channels(layer: nn.Sequential) -> int:
    """Output width of a torchvision ResNet layer (its last block's last BN)."""
    last = layer[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
