"""Batch samplers: iterables of index batches, deterministic in ``(seed, epoch)``.

A batch sampler yields ``torch.int64`` index tensors, one per optimizer step, for one epoch.
``trainer.batch_size`` is the *global* batch: under DDP every global batch is cut into
``world_size`` contiguous slices and rank r trains on slice r. Slices differ by at most one sample
when the global batch does not divide (the last batch of an epoch, say): ``rank_sizes`` tells every
rank all slices' lengths without communication, and the engine weights each rank's loss by its
share of the global batch, so the averaged gradient equals the single-process gradient of the same
global batch either way. Because the order is a pure function of
``(seed, epoch)``, a run resumed in the middle of an epoch skips the batches it already did
(``iter_from(step)``) and sees exactly what an uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kdrun.errors import ConfigError


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

    def _parts(self, n: int) -> list[int]:
        """Lengths of the consecutive parts of a global batch of ``n`` that are each split over
        the ranks (one part here; pair samplers have two, so every rank gets whole pairs)."""
        return [n]

    def _local(self, batch: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return batch
        pieces = torch.split(batch, self._parts(batch.shape[0]))
        return torch.cat([torch.tensor_split(p, self.world_size)[self.rank] for p in pieces])

    def rank_sizes(self, n: int) -> tuple[int, ...]:
        """How many samples of a global batch of ``n`` each rank trains (rank order) — the
        lengths of :meth:`_local` on every rank, computed on the host without communication."""
        sizes = [0] * self.world_size
        for part in self._parts(n):
            q, extra = divmod(part, self.world_size)
            for r in range(self.world_size):
                sizes[r] += q + (1 if r < extra else 0)
        return tuple(sizes)

    def epoch_layout(self) -> list[tuple[int, ...]]:
        """``rank_sizes`` of every step of the current epoch; a step that would leave a rank
        without samples is a :class:`~kdrun.errors.ConfigError` (before it runs)."""
        layouts = [self.rank_sizes(b.shape[0]) for b in self.global_batches()]
        for step, sizes in enumerate(layouts):
            if min(sizes) == 0:
                raise ConfigError(
                    f"step {step} of epoch {self.epoch + 1} has {sum(sizes)} samples for "
                    f"{len(sizes)} ranks, so a rank would train on none: set "
                    "trainer.drop_last=true or a trainer.batch_size whose last batch has at "
                    "least one sample per rank"
                )
        return layouts

    def iter_from(self, start: int = 0) -> Iterator[torch.Tensor]:
        for batch in self.global_batches()[start:]:
            yield self._local(batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_from(0)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


def train_sampler(method, targets: torch.Tensor, settings, seed: int, dist) -> BatchSampler:
    """The method's own batch sampler (``Method.train_batch_sampler``: pairs, overlapping
    batches, kept samples) or shuffled global batches, for ``settings.batch_size`` and
    ``settings.drop_last`` on rank ``dist.rank`` of ``dist.world_size``."""
    custom = method.train_batch_sampler(
        targets, settings.batch_size, seed, dist.rank, dist.world_size, settings.drop_last
    )
    return custom or BatchSampler(
        targets.shape[0],
        settings.batch_size,
        seed=seed,
        drop_last=settings.drop_last,
        rank=dist.rank,
        world_size=dist.world_size,
    )
