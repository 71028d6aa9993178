"""Batch samplers: iterables of index batches, deterministic in ``(seed, epoch)``.

A batch sampler yields ``torch.int64`` index tensors, one per optimizer step, for one epoch.
``trainer.batch_size`` is the *global* batch: under DDP every global batch is cut into
``world_size`` contiguous slices and rank r trains on slice r, so the averaged gradient equals the
single-process gradient of the same global batch. Because the order is a pure function of
``(seed, epoch)``, a run resumed in the middle of an epoch skips the batches it already did
(``iter_from(step)``) and sees exactly what an uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, salt) — independent streams per epoch."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7_919 + int(salt) * 104_729) % (2**63))
    return g


class BatchSampler:
    """Shuffled global batches, sliced per rank."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} is smaller than world size {world_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self) -> list[torch.Tensor]:
        """This epoch's global batches (before the per-rank slice)."""
        if self.shuffle:
            order = torch.randperm(
                self.num_samples, generator=epoch_generator(self.seed, self.epoch)
            )
        else:
            order = torch.arange(self.num_samples)
        batches = list(torch.split(order, self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def _local(self, batch: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return batch
        return torch.tensor_split(batch, self.world_size)[self.rank]

    def iter_from(self, start: int = 0) -> Iterator[torch.Tensor]:
        for batch in self.global_batches()[start:]:
            yield self._local(batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_from(0)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)
