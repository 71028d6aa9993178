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

from kdrun.models.base import StagedModel, StemChoice, blocks_per_stage
from kdrun.models.resnet import PreActBlock

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
        n = blocks_per_stage(depth, 4, "WRN")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.depth, self.widen_factor, self.dropout = depth, widen_factor, float(dropout)
        stem_channels = 16
        self._finish(
            stem=self._resolve_stem(stem, image_size, in_channels, stem_channels, norm=False),
            stem_channels=stem_channels,
            stage_channels=[16 * widen_factor, 32 * widen_factor, 64 * widen_factor],
            stage_strides=[1, 2, 2],
            stage_blocks=[n] * 3,
            num_classes=num_classes,
        )

    def _make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        return PreActBlock(in_channels, out_channels, stride, self.dropout)
