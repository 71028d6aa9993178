"""The staged-backbone contract every kdrun model implements, plus shared building pieces.

Contract (``StagedModel``)::

    x -> stem -> stages[0] -> ... -> stages[L-1] -> pool (final norm, global avg pool) -> classifier

- ``forward(x) -> logits [B, num_classes]``; ``forward(x, return_stages=True)`` returns the
  ``forward_stages`` triple (so methods that need stages still go through ``forward``, which
  DistributedDataParallel requires for gradient synchronisation).
- ``forward_stages(x) -> (stage outputs, pooled features [B, feature_dim], logits)``; the stage
  outputs are the raw outputs of ``stages[l]`` (for pre-activation nets they are *pre*-BN: the
  final BN+ReLU lives in ``pool``).
- ``pool(h)``: last stage output -> pooled feature vector (``final_norm`` then global average pool).
- ``pool_features(x)``: input -> pooled feature vector (= ``forward_stages(x)[1]``).
- ``make_stage(in_channels, out_channels, stride, num_blocks=None)``: a fresh, freshly initialised
  stage of the model's block type (used by auxiliary heads that copy the remaining stages, and for
  the extra stride-1 stage of LSSKD's last head). ``num_blocks=None`` means: as many blocks as the
  existing stage with the same output width (the last such stage), or the last stage's count.
- ``make_stage_like(index)``: a fresh copy (same shape, new weights) of ``stages[index]``.
- ``make_pool(channels)``: a fresh pooling module ``[B, channels, H, W] -> [B, channels]`` that
  includes a fresh final BN+ReLU for pre-activation nets (an Identity otherwise), so auxiliary heads
  built from ``make_stage`` end the same way as the backbone.
- Metadata: ``stem_channels`` (input width of ``stages[0]``), ``stage_channels``,
  ``stage_strides``, ``stage_blocks``, ``stage_in_channels``, ``feature_dim``, ``num_classes``,
  ``preact`` (True when the final BN+ReLU is part of ``pool``).

Constructors take keyword arguments ``num_classes``, ``in_channels`` (default 3) and
``image_size`` (default 32) plus architecture arguments, and adapt the stem to the input (see
``resolve_stem``): images smaller than 64 px get a CIFAR stem (3x3 stride-1 conv, no max-pool);
64 px and larger get the torchvision ImageNet stem (7x7 stride-2 conv, BN, ReLU, 3x3 stride-2
max-pool). ``stem="cifar"`` / ``stem="imagenet"`` overrides the choice.

Initialisation (``init_module``): convolutions Kaiming-normal (fan_out, ReLU gain, as torchvision),
norm layers weight 1 / bias 0, linear layers PyTorch's default (Kaiming-uniform, a=sqrt(5)).
Residual nets with a BN at the end of the residual branch accept ``zero_init_residual`` (default
False) which zeroes that BN's weight so every block starts as the identity (Goyal et al. 2017).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

__all__ = [
    "StagedModel",
    "blocks_per_stage",
    "conv3x3",
    "conv1x1",
    "halving_strides",
    "init_module",
    "make_stem",
    "resolve_image_size",
    "resolve_stem",
    "StemChoice",
]

STEM_KINDS = ("cifar", "imagenet")
StemChoice = Literal["auto", "cifar", "imagenet"]
IMAGENET_STEM_MIN_SIZE = 64


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a norm layer follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (projection shortcuts)."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def halving_strides(num_stages: int) -> list[int]:
    """Stage strides ``[1, 2, 2, ...]``: the first stage keeps the stem's resolution, every later
    one halves it."""
    return [1] + [2] * (num_stages - 1)


def blocks_per_stage(depth: int, fixed_layers: int, net: str) -> int:
    """``n`` for a three-stage net of ``depth = 6n + fixed_layers`` layers (two convs per block,
    ``n`` blocks per stage, ``n >= 1``); a ``ValueError`` naming ``net`` for any other depth."""
    n, rest = divmod(depth - fixed_layers, 6)
    if n < 1 or rest:
        raise ValueError(f"{net} depth must be 6n+{fixed_layers} with n >= 1, got {depth}")
    return n


def resolve_image_size(image_size: int | Sequence[int]) -> int:
    """Accept ``32`` or ``(H, W)``; return the smaller side."""
    if isinstance(image_size, int):
        size = image_size
    else:
        size = min(int(s) for s in image_size)
    if size < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return size


def resolve_stem(stem: str, image_size: int) -> str:
    """``"auto"`` -> ``"cifar"`` below 64 px, ``"imagenet"`` from 64 px up."""
    if stem == "auto":
        return "cifar" if image_size < IMAGENET_STEM_MIN_SIZE else "imagenet"
    if stem not in STEM_KINDS:
        raise ValueError(f"stem must be one of 'auto', 'cifar', 'imagenet'; got {stem!r}")
    return stem


def make_stem(
    kind: str, in_channels: int, out_channels: int, *, norm: bool = True
) -> nn.Sequential:
    """Build a stem.

    ``cifar``: 3x3 stride-1 conv (+ BN + ReLU when ``norm``; pre-activation nets pass
    ``norm=False`` because their first block starts with BN+ReLU). ``imagenet``: torchvision's
    7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool (always normalised: the max-pool needs an
    activated input) -- overall stride 4.
    """
    if kind == "cifar":
        layers: list[nn.Module] = [conv3x3(in_channels, out_channels)]
        if norm:
            layers += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers)
    if kind == "imagenet":
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    raise ValueError(f"unknown stem kind {kind!r}")


def init_module(module: nn.Module, zero_init_residual: bool = False) -> nn.Module:
    """Kaiming-init every conv under ``module``; norms to (1, 0); optional zero-init residuals.

    Linear layers keep PyTorch's default initialisation. Blocks that define
    ``zero_init_last()`` get it called when ``zero_init_residual`` is set (torchvision's
    ResNet blocks get their last BN zeroed, as torchvision itself does).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in module.modules():
            zero_last = getattr(m, "zero_init_last", None)
            if callable(zero_last):
                zero_last()
            elif isinstance(m, tv_resnet.Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, tv_resnet.BasicBlock):
                nn.init.zeros_(m.bn2.weight)
    return module


class StagedModel(nn.Module):
    """Backbone = stem -> stages[0..L-1] -> global pool -> classifier. forward(x) -> logits.

    Subclasses build their stem (usually with ``_resolve_stem``), implement ``_make_block`` (or
    ``_build_stage`` for stages that are not a chain of blocks) and call ``_finish(...)``, which
    builds the stages from the plan, the final norm (BN+ReLU when ``preact``) and the classifier.
    """

    stem: nn.Module
    stages: nn.ModuleList
    final_norm: nn.Module
    classifier: nn.Linear
    stem_channels: int
    stage_channels: list[int]
    stage_strides: list[int]
    stage_blocks: list[int]
    feature_dim: int
    preact: bool = False
    zero_init_residual: bool = False

    # ----------------------------------------------------------------- construction helpers
    def _resolve_stem(
        self,
        stem: str,
        image_size: int | Sequence[int],
        in_channels: int,
        stem_channels: int,
        *,
        norm: bool = True,
    ) -> nn.Sequential:
        """Pick the stem kind for the input (``resolve_stem``), record it as ``stem_kind`` and
        build it (``make_stem``)."""
        self.stem_kind = resolve_stem(stem, resolve_image_size(image_size))
        return make_stem(self.stem_kind, in_channels, stem_channels, norm=norm)

    def _finish(
        self,
        *,
        stem: nn.Module,
        stem_channels: int,
        stage_channels: Sequence[int],
        stage_strides: Sequence[int],
        stage_blocks: Sequence[int],
        num_classes: int,
        stages: Sequence[nn.Module] | None = None,
        init: bool = True,
    ) -> None:
        """Register stem, stages, final norm and classifier (in that order), then initialise.

        ``stages=None`` builds them from the plan: stage ``l`` maps the previous width (the stem's
        for ``l = 0``) to ``stage_channels[l]`` with ``_build_stage``.
        """
        if not len(stage_channels) == len(stage_strides) == len(stage_blocks):
            raise ValueError("stage_channels, stage_strides, stage_blocks differ in length")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if stages is None:
            widths_in = [stem_channels, *stage_channels[:-1]]
            plan = zip(widths_in, stage_channels, stage_strides, stage_blocks)
            stages = [self._build_stage(int(i), int(o), int(s), int(n)) for i, o, s, n in plan]
        if len(stages) != len(stage_channels):
            raise ValueError("stages and stage_channels differ in length")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stem_channels = int(stem_channels)
        self.stage_channels = [int(c) for c in stage_channels]
        self.stage_strides = [int(s) for s in stage_strides]
        self.stage_blocks = [int(b) for b in stage_blocks]
        self.feature_dim = self.stage_channels[-1]
        self.final_norm = self._make_final_norm(self.feature_dim)
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        if init:
            init_module(self, self.zero_init_residual)

    def _make_final_norm(self, channels: int) -> nn.Module:
        """BN+ReLU applied before pooling for pre-activation nets; Identity otherwise."""
        if self.preact:
            return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        return nn.Identity()

    def _make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        """One block of this model's type (``in_channels -> out_channels`` at ``stride``)."""
        raise NotImplementedError

    def _build_stage(
        self, in_channels: int, out_channels: int, stride: int, num_blocks: int
    ) -> nn.Sequential:
        """``num_blocks`` blocks in a row: the first one changes width and stride, the others
        keep ``out_channels`` at stride 1."""
        return nn.Sequential(
            self._make_block(in_channels, out_channels, stride),
            *(self._make_block(out_channels, out_channels, 1) for _ in range(num_blocks - 1)),
        )

    # ----------------------------------------------------------------- metadata
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def stage_in_channels(self) -> list[int]:
        """Input width of each stage: the stem's, then the previous stage's output width."""
        return [self.stem_channels, *self.stage_channels[:-1]]

    # ----------------------------------------------------------------- forward API
    def pool(self, h: Tensor) -> Tensor:
        """Final stage output ``[B, C, H, W]`` -> pooled feature ``[B, C]``."""
        return torch.flatten(F.adaptive_avg_pool2d(self.final_norm(h), 1), 1)

    def forward_stages(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Return (stage outputs, pooled features ``[B, feature_dim]``, logits)."""
        h = self.stem(x)
        outs: list[Tensor] = []
        for stage in self.stages:
            h = stage(h)
            outs.append(h)
        feat = self.pool(h)
        return outs, feat, self.classifier(feat)

    def pool_features(self, x: Tensor) -> Tensor:
        """Input -> pooled features ``[B, feature_dim]`` (the classifier's input)."""
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
        return self.pool(h)

    def forward(
        self, x: Tensor, return_stages: bool = False
    ) -> Tensor | tuple[list[Tensor], Tensor, Tensor]:
        """Logits; with ``return_stages=True`` the ``forward_stages`` triple instead.

        Under DistributedDataParallel call ``ddp_model(x, return_stages=True)`` rather than
        ``ddp_model.module.forward_stages(x)``: DDP only synchronises gradients of work done
        through its own ``forward``.
        """
        if return_stages:
            return self.forward_stages(x)
        return self.classifier(self.pool_features(x))

    # ----------------------------------------------------------------- fresh parts for heads
    def make_stage(
        self, in_channels: int, out_channels: int, stride: int, num_blocks: int | None = None
    ) -> nn.Module:
        """A fresh stage of this model's block type, initialised like the backbone."""
        if num_blocks is None:
            num_blocks = self.stage_blocks[-1]
            for c, b in zip(self.stage_channels, self.stage_blocks):
                if c == out_channels:
                    num_blocks = b
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        stage = self._build_stage(int(in_channels), int(out_channels), int(stride), int(num_blocks))
        return init_module(stage, self.zero_init_residual)

    def make_stage_like(self, index: int) -> nn.Module:
        """A fresh (newly initialised) stage with the shape of ``stages[index]``."""
        return self.make_stage(
            self.stage_in_channels[index],
            self.stage_channels[index],
            self.stage_strides[index],
            self.stage_blocks[index],
        )

    def make_pool(self, channels: int | None = None) -> nn.Module:
        """Fresh ``[B, C, H, W] -> [B, C]`` pooling (with a fresh final BN+ReLU if pre-activation)."""
        channels = self.feature_dim if channels is None else int(channels)
        return init_module(
            nn.Sequential(self._make_final_norm(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        )

    def extra_repr(self) -> str:
        return (
            f"stem_channels={self.stem_channels}, stage_channels={self.stage_channels}, "
            f"stage_strides={self.stage_strides}, stage_blocks={self.stage_blocks}"
        )
