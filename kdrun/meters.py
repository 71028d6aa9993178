"""Device-side running sums of a training epoch or logging window.

``update`` adds a step's loss, correct predictions, sample count, method logs and a
non-finite-loss flag without leaving the device; ``read`` is the only host synchronisation (one
all-reduce over DDP ranks and one copy). ``state_dict`` sums all ranks' sums (every rank calls
it), and ``load_state_dict`` gives them to rank 0 only, so a mid-epoch checkpoint resumes on any
number of ranks with the epoch's true averages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kdrun import distributed
from kdrun.methods.base import StepOutput


class Meter:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        z = torch.zeros((), device=self.device, dtype=torch.float64)
        self.loss_sum, self.correct, self.count, self.steps = (z.clone() for _ in range(4))
        self.nonfinite = torch.zeros((), device=self.device, dtype=torch.bool)
        self.logs: dict[str, torch.Tensor] = {}

    def update(self, out: StepOutput, targets: torch.Tensor) -> None:
        loss = out.loss.detach()
        self.nonfinite |= ~torch.isfinite(loss)
        self.loss_sum += loss.double()
        self.steps += 1
        self.correct += (out.logits.detach().argmax(dim=-1) == targets).sum().double()
        self.count += targets.shape[0]  # a Python scalar: no host-to-device copy
        for key, value in out.logs.items():
            acc = self.logs.get(key)
            v = value.detach().double()
            self.logs[key] = v if acc is None else acc + v

    def _stacked(self) -> tuple[list[str], torch.Tensor]:
        keys = sorted(self.logs)
        sums = [self.loss_sum, self.correct, self.count, self.steps, self.nonfinite.double()]
        return keys, torch.stack([*sums, *[self.logs[k] for k in keys]])

    def read(self, reduce: bool = True) -> dict[str, float]:
        """``loss`` and logs per step, ``acc1`` per sample, ``nonfinite``, ``steps``."""
        keys, stacked = self._stacked()
        if reduce:
            stacked = distributed.all_reduce_sum(stacked)
        values = stacked.tolist()
        loss_sum, correct, count, steps, nonfinite = values[:5]
        steps = max(steps, 1.0)
        out = {
            "loss": loss_sum / steps,
            "acc1": correct / max(count, 1.0),
            "nonfinite": nonfinite > 0,
            "steps": steps,
        }
        out.update({k: v / steps for k, v in zip(keys, values[5:])})
        return out

    def state_dict(self) -> dict[str, Any]:
        keys, stacked = self._stacked()
        sums = distributed.all_reduce_sum(stacked)
        return {
            "loss_sum": sums[0],
            "correct": sums[1],
            "count": sums[2],
            "steps": sums[3],
            "logs": dict(zip(keys, sums[5:])),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        if distributed.rank() != 0:
            return
        for key in ("loss_sum", "correct", "count", "steps"):
            setattr(self, key, state[key].to(self.device))
        self.logs = {k: v.to(self.device) for k, v in state["logs"].items()}
