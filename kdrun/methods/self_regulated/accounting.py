"""Data-efficiency accounting shared by the teacher stage and the students.

Every stage counts per-sample participations in an int32 :class:`~kdrun.methods.bank.SampleBank`
(``counts``). Per epoch (:meth:`Accounting.on_epoch_end`, one host read): ``data/participations``
(this epoch), ``data/participation`` (this epoch / N), ``data/distinct_samples`` (ever taken
part, cumulative) and, for a method that applies the participation rule, ``data/empty_steps``
(cumulative). :meth:`Accounting.accounting_summary` gives the run's totals and the histogram of
counts (:func:`count_stats`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from kdrun.methods.bank import SampleBank
from kdrun.methods.base import Method


def count_stats(counts: torch.Tensor, epochs: int) -> dict[str, Any]:
    """Accounting figures of per-sample participation ``counts`` over ``epochs`` epochs."""
    counts = counts.detach().to("cpu", torch.int64)
    n, epochs = counts.numel(), max(int(epochs), 1)
    total = int(counts.sum())
    top = max(epochs, int(counts.max()) if n else 0)
    return {
        "participations": total,
        "participation": total / max(n * epochs, 1),
        "distinct_samples": int((counts > 0).sum()),
        "hist": torch.bincount(counts.clamp(min=0), minlength=top + 1).tolist(),
    }


class Accounting(Method):
    """Per-sample participation counts (``self.counts``), per-epoch figures, empty steps."""

    #: the participation rule is applied (so steps can be empty)
    uses_rule: ClassVar[bool] = True
    #: the name of the counts bank in consistency errors
    counts_name: ClassVar[str] = "participation"
    counts: SampleBank  # provided by the subclass

    def __init__(self, *, num_classes: int, num_samples: int) -> None:
        super().__init__(num_classes=num_classes, num_samples=num_samples)
        self.register_buffer("empty_steps", torch.zeros((), dtype=torch.int64))
        self.completed_epochs = 0
        self._counted = 0  # participations at the end of the last finished epoch

    @torch.no_grad()
    def record(self, index: torch.Tensor, mask: torch.Tensor, participants: torch.Tensor | None):
        """Count the step's participants; a step with none is counted as empty."""
        self.counts.add(index, mask.to(torch.int32))
        if participants is not None:
            self.empty_steps += (participants == 0).to(torch.int64)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        self.completed_epochs = int(epoch) + 1
        self.counts.check_consistent(self.counts_name)
        total = int(self.counts.values.sum())
        this_epoch, self._counted = total - self._counted, total
        out = {
            "data/participations": float(this_epoch),
            "data/participation": this_epoch / max(self.num_samples, 1),
            "data/distinct_samples": float(int((self.counts.values > 0).sum())),
        }
        if self.uses_rule:
            out["data/empty_steps"] = float(int(self.empty_steps))
        return out

    def accounting_summary(self) -> tuple[dict[str, Any], list[int]]:
        """``(totals, histogram of counts)`` for summary.json."""
        stats = count_stats(self.counts.values, self.completed_epochs or self.epochs)
        out = {
            "data/participations": stats["participations"],
            "data/participation": stats["participation"],
            "data/distinct_samples": stats["distinct_samples"],
        }
        if self.uses_rule:
            out["data/empty_steps"] = int(self.empty_steps)
        return out, stats["hist"]

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "completed_epochs": self.completed_epochs,
            "counted": self._counted,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.completed_epochs = int(state.get("completed_epochs", 0))
        self._counted = int(state.get("counted", 0))
