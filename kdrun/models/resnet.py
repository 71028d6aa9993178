"""Residual blocks and the CIFAR-stem ResNets (ResNet-18/34/50, PreAct ResNet-18).

``ResNet`` is the "ResNet-18 for CIFAR" used throughout the self-KD literature (CS-KD, TF-KD,
DLB, ...): torchvision's ResNet with a 3x3 stride-1 stem conv and no max-pool on small images, four
stages of widths 64/128/256/512 (x4 for the bottleneck ResNet-50), strides 1/2/2/2, projection
(1x1 conv + BN, "option B") shortcuts where the shape changes. On 32x32 input the stages run at
32/16/8/4 px. On >= 64 px inputs the stem becomes torchvision's 7x7/2 conv + max-pool (see
``kdrun.models.base.resolve_stem``), so the net is torchvision's ResNet exactly; parameter counts
equal torchvision's with the stem conv and the classifier swapped (checked in the tests).

``PreActResNet`` is the pre-activation ResNet (He et al., ECCV 2016) used as PS-KD's CIFAR
backbone: blocks BN-ReLU-conv-BN-ReLU-conv, a bare 3x3 stem conv, 1x1-conv (no BN) projection
shortcuts taken from the pre-activated input, and a final BN+ReLU before pooling (part of
``pool``, so ``forward_stages`` returns pre-BN stage outputs). The popular kuangliu/PS-KD code omits
that final BN+ReLU; we keep it as in the paper (+2*512 parameters).

Blocks (also used by ``resnet_cifar`` and ``wrn``):
- ``BasicBlock(in, out, stride, shortcut="B"|"A")`` -- two 3x3 convs; shortcut "B" is a
  1x1-conv+BN projection where the shape changes, "A" is parameter-free (strided subsampling plus
  zero-padded channels, He et al. 2016 CIFAR).
- ``Bottleneck(in, out, stride)`` -- 1x1 / 3x3 (strided, torchvision v1.5) / 1x1, width out/4.
- ``PreActBlock(in, out, stride, dropout=0.0)`` -- pre-activation basic block; with dropout
  between the convs it is the WRN block.
Every post-activation block has ``zero_init_last()`` (zero the last BN's weight).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.models.base import StagedModel, StemChoice, conv1x1, conv3x3, halving_strides

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PreActBlock",
    "PreActResNet",
    "ResNet",
    "ShortcutA",
    "projection_shortcut",
]


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample spatially by ``stride``, zero-pad the extra channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("option-A shortcut cannot reduce channels")
        self.stride = stride
        self.pad = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity where the block keeps the shape, else a 1x1 conv + BN projection ("option B")."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class _PostActivationBlock(nn.Module):
    """A residual branch that ends in a BN, added to the shortcut, then ReLU.

    Subclasses build ``relu``, ``shortcut`` and the branch (``residual``); ``last_bn`` names the
    branch's final BN, which ``zero_init_last`` zeroes so that the block starts as the identity.
    """

    last_bn: str
    relu: nn.ReLU
    shortcut: nn.Module

    def residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))

    def zero_init_last(self) -> None:
        nn.init.zeros_(getattr(self, self.last_bn).weight)


class BasicBlock(_PostActivationBlock):
    """conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) -> ReLU."""

    expansion = 1
    last_bn = "bn2"

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "B"
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        reshapes = stride != 1 or in_channels != out_channels
        if shortcut == "A" and reshapes:
            self.shortcut: nn.Module = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = projection_shortcut(in_channels, out_channels, stride)

    def residual(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(_PostActivationBlock):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand, BN after each; width = out_channels / 4."""

    expansion = 4
    last_bn = "bn3"

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels % self.expansion:
            raise ValueError(f"Bottleneck out_channels must be a multiple of {self.expansion}")
        width = out_channels // self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = projection_shortcut(in_channels, out_channels, stride)

    def residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3 + shortcut (no ReLU after the sum).

    When the shape changes the shortcut is a 1x1 conv (no BN) applied to the *pre-activated*
    input, as in He et al. (2016b) and the original WRN code; otherwise it is the identity on the
    raw input.
    """

    expansion = 1

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv1x1(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        # not in-place: x itself is the identity shortcut
        a = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(a)
        out = self.conv1(a)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + residual


class _StagedResNet(StagedModel):
    """What ``ResNet`` and ``PreActResNet`` share: a stem of ``stem_channels``, then one stage of
    ``layers[l]`` blocks of type ``block`` per entry of ``widths`` (stage output = ``widths[l]`` x
    ``block.expansion``) at strides 1, 2, 2, ...; subclasses set ``block`` (and ``preact``) and
    call :meth:`_build_stages`."""

    # value ranges checked by kdrun.config before anything is built
    ranges = {"stem_channels": (1, None)}
    block: type[nn.Module]

    def _build_stages(
        self,
        stem: str,
        image_size: int,
        in_channels: int,
        stem_channels: int,
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
    ) -> None:
        """Build the stem (BN+ReLU unless ``preact``), the stages and the classifier."""
        layers, widths = list(layers), list(widths)
        if len(layers) != len(widths):
            raise ValueError("layers and widths must have the same length")
        norm = not self.preact
        self._finish(
            stem=self._resolve_stem(stem, image_size, in_channels, stem_channels, norm=norm),
            stem_channels=stem_channels,
            stage_channels=[w * self.block.expansion for w in widths],
            stage_strides=halving_strides(len(widths)),
            stage_blocks=layers,
            num_classes=num_classes,
        )

    def _make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        return self.block(in_channels, out_channels, stride)


class ResNet(_StagedResNet):
    """CIFAR-stem ResNet (BasicBlock or Bottleneck), 4 stages by default.

    Args:
        num_classes, in_channels, image_size: data facts (see ``StagedModel``).
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50/101/152).
        layers: blocks per stage, e.g. ``[2, 2, 2, 2]`` for ResNet-18.
        widths: base widths per stage (stage output = width x expansion).
        stem_channels: stem output width (64).
        stem: ``"auto"`` | ``"cifar"`` | ``"imagenet"``.
        zero_init_residual: zero the last BN of every block (default False).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        block: Literal["basic", "bottleneck"] = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_channels: int = 64,
        stem: StemChoice = "auto",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if block not in blocks:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        self.block = blocks[block]
        self.zero_init_residual = bool(zero_init_residual)
        self._build_stages(
            stem, image_size, in_channels, stem_channels, layers, widths, num_classes
        )


class PreActResNet(_StagedResNet):
    """Pre-activation ResNet (PreActBlock), final BN+ReLU inside ``pool``.

    Args as ``ResNet`` minus ``block``/``zero_init_residual`` (pre-activation blocks have no BN at
    the end of the residual branch).
    """

    preact = True
    block = PreActBlock

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_channels: int = 64,
        stem: StemChoice = "auto",
    ) -> None:
        super().__init__()
        self._build_stages(
            stem, image_size, in_channels, stem_channels, layers, widths, num_classes
        )
