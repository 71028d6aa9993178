"""BYOT — be your own teacher (Zhang et al., "Be Your Own Teacher: Improve the Performance of
Convolutional Neural Networks via Self Distillation", ICCV 2019; docs/methods.md).

Architecture
------------
A backbone with ``L`` stages gets ``L - 1`` auxiliary exits, one after each of stages
``1 .. L-1``; the deep classifier ``p`` is the backbone's own head (stage ``L`` plus its pool and
classifier). This is the usual BYOT layout — ResNet-18: 3 shallow exits + the deep classifier;
3-stage nets (``resnet8``, ``wrn_16_2``, ``small_cnn``): 2 shallow exits. Read as "an exit
after every stage", the deep classifier is the exit of the last stage.

Exit ``l`` (after stage ``l``) maps that stage's output to a pooled feature ``f_l`` with the final
stage's width ``D`` (``model.feature_dim``), so the feature hint against the backbone's pooled
feature ``f_L`` is defined, then classifies it::

    [BN -> ReLU]                              # pre-activation nets only (their stage outputs
                                              # are un-normalised residual streams)
    for each later stage k = l+1 .. L with stride s_k > 1 (one block if there is none, s = 1):
        conv1x1(c_in -> D/4) BN ReLU -> conv3x3 stride s_k (D/4 -> D/4) BN ReLU
        -> conv1x1(D/4 -> D) BN ReLU          # c_in = stage l's width, then D
    global average pool -> f_l [B, D] -> linear D -> C -> q_l

i.e. one strided bottleneck per downsampling stage the exit skips, so the exit reaches the final
stage's resolution exactly as the backbone does (3x3, padding 1, stride s: ``ceil(H / s)``), and a
stack of bottlenecks when the downsampling factor is > 2. The stage strides and widths are
measured in :meth:`BYOT.setup` by running one dummy input ``[1, stem_channels, S, S]`` (``S`` = 4 x
the product of the declared stage strides) through ``model.stages`` and ``model.pool`` in eval mode
without gradients (the stem is skipped because a model does not record its input channels and
resolution); the built exits are checked on the same dummy to produce ``[1, D]`` features.
The bottleneck width ``D/4`` and the exits' BN+ReLU ending follow the public re-implementation
(github.com/luanyunteng/pytorch-be-your-own-teacher and its forks, ``branchBottleNeck``), which
instead uses a single ``k x k`` stride-``k`` conv (``k`` = downsampling factor) in the middle; the
exact exit design is **[reconstructed]** (the paper only says "bottleneck"). Cost: ResNet-18
(``D = 512``) gets 1.56M exit parameters next to its 11.2M; wide final stages are expensive —
ResNet-50 (``D = 2048``) gets 24.6M next to its 23.5M (the re-implementation's exits are about as
large).
Convs are Kaiming-initialised like the backbone (``init_module``), linears keep PyTorch's default.

Loss (one forward pass: ``model.forward_stages(x)`` gives the stage outputs, ``f_L`` and ``p``)::

    loss = (1 - alpha) * [CE(p, y) + sum_l CE(q_l, y)]
           + alpha * sum_l KD_T(q_l, sg[p])
           + beta  * sum_l mean_b sum_d (f_l[b, d] - sg[f_L][b, d])^2

``CE`` and ``KD_T`` (``T^2 KL(softmax(p/T) || softmax(q_l/T))``) are batch means; the feature
term is summed over the ``D`` feature dims and **averaged over the batch**. Defaults
``alpha = 0.1``, ``T = 3``, ``beta = 1e-6`` (the public re-implementation's
defaults). Caveat on ``beta``: the public re-implementation sums the squared error over the batch as well
(``((f - sg f_L)^2).sum()``; its mask ``(f > 0) | (f_L > 0)`` is a no-op for these non-negative
post-ReLU features), so its ``beta`` equals ours divided by the batch size: reproducing it at
batch 128 needs ``beta = 1.28e-4`` here. The default keeps ``1e-6`` with the batch
mean **[reconstructed: reduction]**; the term is then tiny (it mostly acts as a logged
diagnostic).

Exits live on this method module: they are trained (the engine's optimizer covers model + method
parameters), DDP-synchronised and checkpointed with the method's state, but dropped at inference:
:meth:`BYOT.eval_model` returns the bare backbone, which is what is evaluated, exported to
``best.ckpt`` and counted in ``params``.

Logs (detached 0-d tensors; step keys without the ``train/`` prefix, which the engine adds):
``train/ce_final``, ``train/ce_exits`` (sum over exits),
``train/kd`` (sum over exits, before ``alpha``), ``train/feat`` (sum over exits, before ``beta``),
``train/exit{l}_acc`` (training accuracy of the exit after stage ``l``, ``l = 1 .. L-1``).
Summary: ``byot/exits``, ``byot/exit_params``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.methods.base import NON_NEGATIVE, POSITIVE, UNIT, Batch, Method, StepOutput, kd_loss
from kdrun.methods.heads import AuxiliaryHead, forward_heads, head_accuracies
from kdrun.models.base import conv1x1, conv3x3, init_module


def _bottleneck(in_channels: int, mid: int, out_channels: int, stride: int) -> nn.Sequential:
    """conv1x1 -> BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv1x1 -> BN -> ReLU."""
    return nn.Sequential(
        conv1x1(in_channels, mid),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        conv3x3(mid, mid, stride),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        conv1x1(mid, out_channels),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class BYOTExit(AuxiliaryHead):
    """Auxiliary exit: stage output ``[B, c_in, H, W]`` -> (pooled feature ``[B, D]``, logits)."""

    def __init__(
        self,
        in_channels: int,
        feature_dim: int,
        num_classes: int,
        strides: list[int],
        preact: bool = False,
    ) -> None:
        mid = max(feature_dim // 4, 1)
        layers: list[nn.Module] = []
        if preact:
            layers += [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)]
        c_in = in_channels
        for s in strides or [1]:
            layers.append(_bottleneck(c_in, mid, feature_dim, s))
            c_in = feature_dim
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        super().__init__(nn.Sequential(*layers), pool, feature_dim, num_classes)
        self.strides = list(strides or [1])
        init_module(self.body)


def byot_loss(
    logits: torch.Tensor,
    feat_final: torch.Tensor,
    exit_logits: list[torch.Tensor],
    exit_feats: list[torch.Tensor],
    y: torch.Tensor,
    alpha: float,
    T: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The BYOT loss and its (undetached) parts ``ce_final``, ``ce_exits``, ``kd``, ``feat``."""
    ce_final = F.cross_entropy(logits.float(), y)
    target = feat_final.detach().float()
    ce_exits = logits.new_zeros((), dtype=torch.float32)
    kd = ce_exits.clone()
    feat = ce_exits.clone()
    for q, f in zip(exit_logits, exit_feats):
        ce_exits = ce_exits + F.cross_entropy(q.float(), y)
        kd = kd + kd_loss(q, logits, T)  # kd_loss detaches the teacher side
        feat = feat + (f.float() - target).pow(2).sum(dim=1).mean()
    loss = (1.0 - alpha) * (ce_final + ce_exits) + alpha * kd + beta * feat
    return loss, {"ce_final": ce_final, "ce_exits": ce_exits, "kd": kd, "feat": feat}


class BYOT(Method):
    """``byot``: auxiliary exits after stages 1..L-1 distilled from the deep classifier."""

    name = "byot"
    ranges = {"alpha": UNIT, "T": POSITIVE, "beta": NON_NEGATIVE}

    def __init__(
        self,
        *,
        num_classes: int,
        num_samples: int,
        alpha: float = 0.1,
        T: float = 3.0,
        beta: float = 1e-6,
    ) -> None:
        super().__init__(num_classes=num_classes, num_samples=num_samples)
        self.alpha, self.T, self.beta = float(alpha), float(T), float(beta)
        self.exits = nn.ModuleList()

    # ----- construction ---------------------------------------------------------------------
    @torch.no_grad()
    def _measure(self, model: nn.Module) -> tuple[list[int], list[int], list[int], int]:
        """(stage strides, stage widths, stage output sizes, pooled dim) from one dummy pass."""
        param = next(model.parameters())
        declared = [int(s) for s in getattr(model, "stage_strides", [])] or [2]
        size = 4 * math.prod(declared)
        h = torch.zeros(1, int(model.stem_channels), size, size, device=param.device)
        was_training = model.training
        model.eval()
        try:
            strides, widths, sizes = [], [], []
            prev = size
            for stage in model.stages:
                h = stage(h)
                cur = int(h.shape[-1])
                if prev % cur:
                    raise ValueError(
                        f"byot: a stage maps {prev} px to {cur} px, not an integer downsampling"
                    )
                strides.append(prev // cur)
                widths.append(int(h.shape[1]))
                sizes.append(cur)
                prev = cur
            pooled_dim = int(model.pool(h).shape[1])
        finally:
            model.train(was_training)
        return strides, widths, sizes, pooled_dim

    def setup(self, model: nn.Module) -> None:
        """Build one exit after each stage except the last (see the module docstring)."""
        num_stages = len(model.stages)
        if num_stages < 2:
            raise ValueError("byot needs a backbone with at least 2 stages")
        strides, widths, sizes, dim = self._measure(model)
        preact = bool(getattr(model, "preact", False))
        param = next(model.parameters())
        exits = []
        for k in range(num_stages - 1):
            later = [s for s in strides[k + 1 :] if s > 1]
            exits.append(BYOTExit(widths[k], dim, self.num_classes, later, preact))
        self.exits = nn.ModuleList(exits).to(param.device)
        self._check(widths, sizes, dim, param.device)

    @torch.no_grad()
    def _check(self, widths: list[int], sizes: list[int], dim: int, device: torch.device) -> None:
        """Each exit turns its stage's output shape into the final resolution and ``[1, D]``."""
        for k, head in enumerate(self.exits):
            head.eval()
            try:
                h = torch.zeros(1, widths[k], sizes[k], sizes[k], device=device)
                body = head.body(h)
                feat, logits = head(h)
            finally:
                head.train()
            if body.shape[-1] != sizes[-1] or feat.shape != (1, dim):
                raise RuntimeError(
                    f"byot: exit {k + 1} maps {tuple(h.shape)} to {tuple(body.shape)}, expected "
                    f"{sizes[-1]} px and {dim} features"
                )
            if logits.shape != (1, self.num_classes):
                raise RuntimeError(f"byot: exit {k + 1} gives logits {tuple(logits.shape)}")

    # ----- training -------------------------------------------------------------------------
    def forward_exits(
        self, stage_outputs: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(exit features, exit logits) from the backbone's stage outputs (all but the last)."""
        return forward_heads(self.exits, stage_outputs[:-1])

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        stage_outputs, feat_final, logits = model.forward_stages(batch.x)
        exit_feats, exit_logits = self.forward_exits(stage_outputs)
        loss, parts = byot_loss(
            logits, feat_final, exit_logits, exit_feats, batch.y, self.alpha, self.T, self.beta
        )
        logs = {k: v.detach() for k, v in parts.items()}
        logs.update(head_accuracies(exit_logits, batch.y, "exit"))
        return StepOutput(loss=loss, logits=logits, logs=logs)

    # ----- inference / reporting ------------------------------------------------------------
    def eval_model(self, model: nn.Module) -> nn.Module:
        """The bare backbone: exits are dropped at inference."""
        return model

    def summary(self) -> dict[str, int]:
        return {
            "byot/exits": len(self.exits),
            "byot/exit_params": sum(p.numel() for p in self.exits.parameters()),
        }
