"""Auxiliary heads on a backbone's stage outputs (BYOT's exits, LSSKD's heads).

An :class:`AuxiliaryHead` maps one stage output ``[B, c, H, W]`` through its ``body`` and ``pool``
to a pooled feature ``[B, D]`` and classifies that feature with a fresh ``Linear(D, out)``
(PyTorch's default initialisation); the method that owns the heads builds ``body`` and ``pool``.
:func:`forward_heads` runs a list of heads over stage outputs, one output each, and
:func:`head_accuracies` gives the training accuracy of each head's logits as detached logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["AuxiliaryHead", "forward_heads", "head_accuracies"]


class AuxiliaryHead(nn.Module):
    """Stage output ``[B, c, H, W]`` -> (pooled feature ``[B, D]``, logits ``[B, out]``)."""

    def __init__(self, body: nn.Module, pool: nn.Module, feature_dim: int, out: int) -> None:
        super().__init__()
        self.body = body
        self.pool = pool
        self.fc = nn.Linear(feature_dim, out)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.pool(self.body(h))
        return feat, self.fc(feat)


def forward_heads(
    heads: Iterable[nn.Module], stage_outputs: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(features, logits) of ``heads[l]`` on ``stage_outputs[l]``, one pair per head."""
    feats, logits = [], []
    for head, h in zip(heads, stage_outputs):
        f, q = head(h)
        feats.append(f)
        logits.append(q)
    return feats, logits


def head_accuracies(
    logits: Sequence[torch.Tensor], targets: torch.Tensor, key: str
) -> dict[str, torch.Tensor]:
    """``{f"{key}{l}_acc": accuracy of logits[l-1]}`` for ``l = 1, 2, ...`` (detached 0-d)."""
    return {
        f"{key}{k}_acc": (q.detach().argmax(dim=-1) == targets).float().mean()
        for k, q in enumerate(logits, start=1)
    }
