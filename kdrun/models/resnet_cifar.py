"""CIFAR ResNets of depth 6n+2 (He et al., CVPR 2016, Sec. 4.2) and the CRD "x4" variants.

Layout: stem conv3x3 (3 -> stem width) + BN + ReLU, three stages of n BasicBlocks each at
strides 1/2/2, global average pool, linear.

- ``resnet8/20/32/56/110``: ``depth = 8/20/32/56/110`` (n = 1/3/5/9/18), stem 16, stage widths
  16/32/64.
- ``resnet8x4``, ``resnet32x4``: the variants of CRD (Tian et al., ICLR 2020) reused by SSKD,
  HSAKD and LSSKD: stem conv 3 -> 32, stage widths 64/128/256 (4x the standard 16/32/64; the stem
  is only 2x), n = 1 and 5. ResNet-32x4 has 7.43M parameters on CIFAR-100.

Shortcuts: ``shortcut="B"`` (default) uses a 1x1 conv + BN projection wherever the shape changes
(also on the first x4 stage, 32 -> 64 channels at stride 1), as the CRD/SSKD/HSAKD code that
LSSKD builds on. ``shortcut="A"`` is He et al.'s parameter-free option (strided identity + zero
channel padding), which is what the paper's parameter counts (0.27M / 0.46M / 0.85M / 1.7M) refer
to. The difference is small: option B adds 16*32 + 32*64 weights + 2*(32+64) BN params = 2,752
parameters on 16/32/64 nets (+1.0% for ResNet-20, +0.3% for ResNet-56).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from kdrun.models.base import StagedModel, StemChoice, blocks_per_stage, halving_strides
from kdrun.models.resnet import BasicBlock

__all__ = ["CifarResNet"]


class CifarResNet(StagedModel):
    """ResNet-(6n+2) for CIFAR with BasicBlocks.

    Args:
        num_classes, in_channels, image_size: data facts (see ``StagedModel``).
        depth: 6n+2 (8, 20, 32, 44, 56, 110, ...).
        channels: stage widths (default 16/32/64; x4 variants 64/128/256).
        stem_channels: stem width (default: ``channels[0]``; x4 variants use 32).
        shortcut: ``"B"`` (1x1 conv + BN projection, default) or ``"A"`` (zero padding).
        stem: ``"auto"`` | ``"cifar"`` | ``"imagenet"``.
        zero_init_residual: zero the last BN of every block (default False).
    """

    # value ranges checked by kdrun.config before anything is built
    ranges = {"depth": (8, None), "stem_channels": (1, None)}

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int = 20,
        channels: Sequence[int] = (16, 32, 64),
        stem_channels: int | None = None,
        shortcut: Literal["A", "B"] = "B",
        stem: StemChoice = "auto",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        n = blocks_per_stage(depth, 2, "CIFAR ResNet")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        channels = list(channels)
        stem_channels = channels[0] if stem_channels is None else int(stem_channels)
        self.depth = depth
        self.shortcut_option = shortcut
        self.zero_init_residual = bool(zero_init_residual)
        self._finish(
            stem=self._resolve_stem(stem, image_size, in_channels, stem_channels),
            stem_channels=stem_channels,
            stage_channels=channels,
            stage_strides=halving_strides(len(channels)),
            stage_blocks=[n] * len(channels),
            num_classes=num_classes,
        )

    def _make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        return BasicBlock(in_channels, out_channels, stride, self.shortcut_option)
