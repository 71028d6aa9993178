"""Learning-rate schedules as pure functions of the (fractional) epoch.

A schedule object maps ``(epoch: float, total_epochs: int) -> factor`` where the learning rate
at that point is ``optim.lr * factor``. The engine evaluates it once per optimizer step with
``epoch = global_step / steps_per_epoch`` (a ``LambdaLR``), so step and epoch schedules share one
code path and a resumed run recomputes exactly the same factors.

Warm-up (``warmup_epochs > 0``) ramps the factor linearly from ``1/steps`` to 1 over the first
``warmup_epochs`` epochs and multiplies whatever the main schedule gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class Schedule:
    ranges = {"warmup_epochs": (0.0, None)}

    def __init__(self, warmup_epochs: float = 0.0) -> None:
        self.warmup_epochs = float(warmup_epochs)

    def main(self, epoch: float, total_epochs: int) -> float:
        raise NotImplementedError

    def __call__(self, epoch: float, total_epochs: int) -> float:
        factor = self.main(epoch, total_epochs)
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            factor *= max(epoch, 1e-3) / self.warmup_epochs
        return factor


class Constant(Schedule):
    """Constant learning rate (after optional warm-up)."""

    def main(self, epoch: float, total_epochs: int) -> float:
        return 1.0


class MultiStep(Schedule):
    """Multiply by ``gamma`` at each milestone epoch (e.g. x0.1 at 150 and 225)."""

    ranges = {"warmup_epochs": (0.0, None), "gamma": (0.0, 1.0)}

    def __init__(
        self, milestones: Sequence[int] = (), gamma: float = 0.1, warmup_epochs: float = 0.0
    ) -> None:
        super().__init__(warmup_epochs)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)

    def main(self, epoch: float, total_epochs: int) -> float:
        passed = sum(1 for m in self.milestones if math.floor(epoch + 1e-9) >= m)
        return self.gamma**passed


class Cosine(Schedule):
    """Half-cosine decay from 1 to ``min_factor`` over the run, evaluated per step."""

    ranges = {"warmup_epochs": (0.0, None), "min_factor": (0.0, 1.0)}

    def __init__(self, min_factor: float = 0.0, warmup_epochs: float = 0.0) -> None:
        super().__init__(warmup_epochs)
        self.min_factor = float(min_factor)

    def main(self, epoch: float, total_epochs: int) -> float:
        progress = min(max(epoch / max(total_epochs, 1), 0.0), 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
