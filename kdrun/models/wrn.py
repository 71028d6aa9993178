"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis, BMVC 2016).

Layout: stem conv3x3 (in -> 16, no BN: the blocks are pre-activation), three stages of
n = (d-4)/6 pre-activation blocks (``PreActBlock`` with dropout between the two convs) at widths
16k/32k/64k and strides 1/2/2, final BN+ReLU (inside ``pool``), global average pool, linear.
Shortcuts are 1x1 convs (no BN) on the pre-activated input wherever the width or stride changes,
as in the authors' code. ``dropout`` defaults to 0.0 (the paper uses 0.3 for some results).

Parameter counts: WRN-16-2 0.70M, WRN-40-2 2.24M (CIFAR-10; 2.26M on CIFAR-100), WRN-28-10
36.48M (CIFAR-10; 36.5M on CIFAR-100).
"""

from __future__ import annotations

from torch import nn

from kdrun.models.base import (
    StagedModel,
    StemChoice,
    make_stem,
    resolve_image_size,
    resolve_stem,
)
from kdrun.models.resnet import PreActBlock, _preact_final_norm

__all__ = ["WideResNet"]


class WideResNet(StagedModel):
    """WRN-depth-widen_factor.

    Args:
        num_classes, in_channels, image_size: data facts (see ``StagedModel``).
        depth: 6n+4 (16, 28, 40, ...).
        widen_factor: k (stage widths 16k/32k/64k).
        dropout: dropout rate between the two convs of each block (default 0.0).
        stem: ``"auto"`` | ``"cifar"`` | ``"imagenet"``.
    """

    preact = True
    # value ranges checked by kdrun.config before anything is built
    ranges = {"depth": (10, None), "widen_factor": (1, None), "dropout": (0.0, 0.99)}

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        stem: StemChoice = "auto",
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        self.depth, self.widen_factor, self.dropout = depth, widen_factor, float(dropout)
        self.stem_kind = resolve_stem(stem, resolve_image_size(image_size))
        stem_channels = 16
        stem_mod = make_stem(self.stem_kind, in_channels, stem_channels, norm=False)
        channels = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        strides = [1, 2, 2]
        stages, c_in = [], stem_channels
        for c, s in zip(channels, strides):
            stages.append(self._build_stage(c_in, c, s, n))
            c_in = c
        self._finish(
            stem=stem_mod,
            stages=stages,
            stem_channels=stem_channels,
            stage_channels=channels,
            stage_strides=strides,
            stage_blocks=[n] * 3,
            num_classes=num_classes,
        )

    def _make_final_norm(self, channels: int) -> nn.Module:
        return _preact_final_norm(channels)

    def _build_stage(
        self, in_channels: int, out_channels: int, stride: int, num_blocks: int
    ) -> nn.Module:
        return nn.Sequential(
            PreActBlock(in_channels, out_channels, stride, self.dropout),
            *(
                PreActBlock(out_channels, out_channels, 1, self.dropout)
                for _ in range(num_blocks - 1)
            ),
        )
