"""Single-stage, stateless baselines: cross-entropy and label smoothing (docs/methods.md)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdrun.methods.base import UNIT, Batch, Method, StepOutput


class CrossEntropy(Method):
    """``ce``: plain ``SCE(z, onehot(y))``, the reference every method is compared with."""

    name = "ce"

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.x)
        loss = F.cross_entropy(logits.float(), batch.y)
        return StepOutput(loss=loss, logits=logits)


class LabelSmoothing(Method):
    """``label_smoothing``: target ``(1 - eps) onehot(y) + eps / C``. Default ``eps = 0.1``."""

    name = "label_smoothing"
    ranges = {"eps": UNIT}

    def __init__(self, *, num_classes: int, num_samples: int, eps: float = 0.1) -> None:
        super().__init__(num_classes=num_classes, num_samples=num_samples)
        self.eps = float(eps)

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.x)
        # PyTorch's label_smoothing spreads eps uniformly over all C classes: exactly the rule.
        loss = F.cross_entropy(logits.float(), batch.y, label_smoothing=self.eps)
        return StepOutput(loss=loss, logits=logits)
