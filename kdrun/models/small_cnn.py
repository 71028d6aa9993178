"""A small, fast conv net for 8x8 (digits) and 28x28 (Fashion-MNIST) inputs.

Layout: stem conv3x3 -> BN -> ReLU, then ``len(channels)`` stages of ``convs_per_stage``
conv3x3-BN-ReLU layers (the first one strided), global average pool, linear. No dropout.

Resolution plan (``stem="auto"``, ``strides=None``):
- stem stride 1 below 16 px (digits: 8x8 stays 8x8), stride 2 from 16 px (Fashion-MNIST:
  28 -> 14; this keeps full-resolution activations, the dominant CPU cost, out of the net), the
  torchvision ImageNet stem (/4) from 64 px;
- stage strides: a stage downsamples by 2 only while the result stays >= ``min_resolution``
  (default 2) px, and the downsampling stages are the *last* ones, so small inputs keep their
  resolution early on. 8x8: strides 1/2/2 -> 8, 4, 2 px; 28x28: 2/2/2 -> 7, 4, 2 px; 32x32:
  2/2/2 -> 8, 4, 2 px.

Defaults (channels 32/64/128, stem 16, one conv per stage): 98.7k parameters (10 classes) and
~0.85 MMACs per 28x28 image (~0.89 MMACs per 8x8 image). A 16-wide stem measured as accurate as a
32-wide one on Fashion-MNIST (1 epoch, SGD 0.05 momentum 0.9: 0.88 vs 0.87 test accuracy) while
its 14x14 maps cost half as much. The convolutions dominate the CPU time, and the strided 3x3
convolutions' backward is the slowest part: keep the first stage narrow for speed. Throughput
(forward + backward + SGD step, batch 128, fp32, 2 cores without AVX2) is roughly 3-6k images/s,
i.e. 10-20 s per Fashion-MNIST epoch; bf16 autocast is 10-50x *slower* on CPUs without native
bf16 (AVX512-BF16/AMX), so use fp32 on such CPUs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from torch import nn

from kdrun.models.base import StagedModel, conv3x3, make_stem, resolve_image_size

__all__ = ["SmallCNN"]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        conv3x3(in_channels, out_channels, stride),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(StagedModel):
    """conv-BN-ReLU stages with stride-2 downsampling where the resolution allows.

    Args:
        num_classes, in_channels, image_size: data facts (see ``StagedModel``).
        channels: stage widths (default 32/64/128).
        stem_channels: stem width (default 16).
        convs_per_stage: conv-BN-ReLU layers per stage (default 1).
        stem: ``"auto"`` | ``"s1"`` (3x3 stride 1; alias ``"cifar"``) | ``"s2"`` (3x3 stride 2) |
            ``"imagenet"`` (7x7/2 + max-pool).
        min_resolution: smallest feature-map side the automatic stride plan may reach.
        strides: explicit per-stage strides (overrides the automatic plan).
    """

    # value ranges checked by kdrun.config before anything is built
    ranges = {"stem_channels": (1, None), "convs_per_stage": (1, None), "min_resolution": (1, None)}

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        channels: Sequence[int] = (32, 64, 128),
        stem_channels: int = 16,
        convs_per_stage: int = 1,
        stem: Literal["auto", "s1", "cifar", "s2", "imagenet"] = "auto",
        min_resolution: int = 2,
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        size = resolve_image_size(image_size)
        channels = list(channels)
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1, got {convs_per_stage}")
        if stem == "auto":
            stem = "s1" if size < 16 else "s2" if size < 64 else "imagenet"
        if stem in ("s1", "cifar"):
            stem_mod, res = make_stem("cifar", in_channels, stem_channels), size
        elif stem == "s2":
            stem_mod, res = _conv_bn_relu(in_channels, stem_channels, 2), math.ceil(size / 2)
        elif stem == "imagenet":
            stem_mod, res = make_stem("imagenet", in_channels, stem_channels), math.ceil(size / 4)
        else:
            raise ValueError(f"stem must be 'auto', 's1', 's2' or 'imagenet', got {stem!r}")
        self.stem_kind = stem
        if strides is None:
            halvings = 0
            while halvings < len(channels) and math.ceil(res / 2) >= min_resolution:
                res = math.ceil(res / 2)
                halvings += 1
            strides = [1] * (len(channels) - halvings) + [2] * halvings
        strides = list(strides)
        if len(strides) != len(channels):
            raise ValueError("strides and channels must have the same length")
        self._finish(
            stem=stem_mod,
            stem_channels=stem_channels,
            stage_channels=channels,
            stage_strides=strides,
            stage_blocks=[convs_per_stage] * len(channels),
            num_classes=num_classes,
        )

    def _make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        return _conv_bn_relu(in_channels, out_channels, stride)
