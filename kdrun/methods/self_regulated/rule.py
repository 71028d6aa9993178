"""The participation rule, its masked loss reduction and the significance weights.

``m_i = 1`` if the model misclassifies sample ``i`` or gives its true class a probability below
``beta``; :func:`masked_reduce` sums the participants' losses over the batch size (``batch``) or
over the global number of participants (``participants``); :func:`significance_weights` turns a
teacher's participation counts ``s`` into ``w = s / D``.
"""

from __future__ import annotations

import torch

from kdrun import distributed
from kdrun.errors import ConfigError

NORMALIZATIONS = ("mean_nonzero", "epochs", "max")


def participation_mask(logits: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """``m_i = argmax p_i != y_i or p_i[y_i] < beta`` (bool ``[B]``; detached, fp32 softmax)."""
    z = logits.detach().float()
    p_true = z.softmax(dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return (z.argmax(dim=-1) != targets) | (p_true < beta)


def masked_reduce(
    per_sample: torch.Tensor, mask: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, participants)``: the masked sum over the batch size (``batch``) or over the number
    of participants (``participants``, 0 when none); ``participants`` is the global count (0-d
    float, summed over DDP ranks). No host sync."""
    masked = torch.where(mask, per_sample, torch.zeros_like(per_sample))
    participants = distributed.all_reduce_sum(mask.sum().to(torch.float32))
    if reduction == "batch":
        loss = masked.sum() / max(per_sample.shape[0], 1)
    else:
        loss = masked.sum() * float(distributed.world_size()) / participants.clamp(min=1.0)
    return loss, participants


def significance_weights(
    counts: torch.Tensor, normalize: str, teacher_epochs: int
) -> tuple[torch.Tensor, float]:
    """``(w, D)`` with ``w = s / D`` (fp32 ``[N]``): ``D`` is the mean of the non-zero counts
    (``mean_nonzero``), ``E_T`` (``epochs``) or the largest count (``max``)."""
    s = counts.to(torch.float64)
    if normalize == "mean_nonzero":
        nonzero = s[s > 0]
        denom = float(nonzero.mean()) if nonzero.numel() else 1.0
    elif normalize == "epochs":
        denom = float(max(int(teacher_epochs), 1))
    elif normalize == "max":
        denom = float(s.max()) if s.numel() and float(s.max()) > 0 else 1.0
    else:
        raise ConfigError(f"method.normalize={normalize!r} must be one of {NORMALIZATIONS}")
    return (s / denom).to(torch.float32), denom
