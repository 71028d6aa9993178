"""Batch samplers the methods ask for (:meth:`~kdrun.methods.base.Method.train_batch_sampler`).

* :class:`HalvesBatchSampler` — the base of samplers whose global batch of ``B`` images is two
  halves of ``h = B // 2`` samples (CS-KD's anchors and partners, DLB's repeated and new chunk):
  each rank receives its share of both halves, so it holds whole pairs; needs ``h >= W``.
* :class:`SubsetBatchSampler` — shuffled batches over a subset of the training set.

All are deterministic in ``(seed, epoch)`` like :class:`~kdrun.data.samplers.BatchSampler`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kdrun.data.samplers import BatchSampler, epoch_generator


class HalvesBatchSampler(BatchSampler):
    """Global batches of two halves of ``half = batch_size // 2`` samples (see the module)."""

    #: the method's name in the error for a batch too small for the world size
    method_name: ClassVar[str] = "this method"

    def __init__(self, num_samples: int, batch_size: int, **kwargs) -> None:
        """``kwargs``: ``seed``, ``drop_last``, ``rank``, ``world_size`` (always shuffled)."""
        super().__init__(num_samples, batch_size, shuffle=True, **kwargs)
        self.half = self.batch_size // 2
        if self.half < max(self.world_size, 1):
            raise ValueError(
                f"{self.method_name} needs trainer.batch_size >= 2 * world size (one pair per "
                f"rank), got batch_size {self.batch_size} with world size {self.world_size}"
            )

    def epoch_order(self, salt: int = 0) -> torch.Tensor:
        """This epoch's permutation of the training set."""
        generator = epoch_generator(self.seed, self.epoch, salt)
        return torch.randperm(self.num_samples, generator=generator)

    def chunks(self, order: torch.Tensor) -> list[torch.Tensor]:
        """``order`` cut into chunks of ``half`` samples (a short last one dropped with
        ``drop_last``)."""
        chunks = list(torch.split(order, self.half))
        if self.drop_last and chunks and len(chunks[-1]) < self.half:
            chunks.pop()
        return chunks


class SubsetBatchSampler(BatchSampler):
    """Shuffled global batches over ``indices`` only (a permutation of the subset per epoch,
    deterministic in ``(seed, epoch)``), sliced per rank like :class:`BatchSampler`."""

    def __init__(self, indices: torch.Tensor, batch_size: int, **kwargs) -> None:
        super().__init__(int(indices.numel()), batch_size, **kwargs)
        self.indices = indices.detach().to("cpu", torch.int64).flatten()

    def global_batches(self) -> list[torch.Tensor]:
        return [self.indices[b] for b in super().global_batches()]
