"""Train and eval loaders over :class:`~kdrun.data.spec.Datasets`.

Two interchangeable loaders yield ``(x, y, index)`` batches on the training device:

* ``loader=device`` — the whole (small) dataset lives on the training device as uint8 tensors;
  each batch is gathered with one ``index_select`` and augmented with batched tensor ops
  (cifar10-airbench's idea). No worker processes, no host round trips. The crop offsets and
  flips are drawn once per epoch for every sample (a table seeded by ``(seed, epoch)``), so a
  sample's augmentation depends only on ``(seed, epoch, index)`` — not on the batch it lands in,
  the rank that trains it, or where a resumed run restarts. A DDP run therefore sees exactly the
  images of the single-process run with the same global batch.
* ``loader=workers`` — a ``torch.utils.data.DataLoader`` with per-sample torchvision transforms
  in worker processes, for folder datasets (ImageNet) that do not fit in memory.

Both take their batches from a :class:`~kdrun.data.samplers.BatchSampler`, support
``iter_from(step)`` for mid-epoch resume, and honour ``limit_batches``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from kdrun.data import augment as aug
from kdrun.data.samplers import BatchSampler
from kdrun.data.spec import Datasets
from kdrun.data.views import EvalDataset, IndexedDataset
from kdrun.errors import ConfigError

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels-last layout when asked (a copy), else ``x`` itself."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class TrainLoader:
    """What both train loaders share.

    ``TrainLoader(data, sampler, device, seed, *, channels_last=False, limit_batches=None)``;
    ``len()`` is the sampler's number of batches, capped at ``limit_batches``; ``set_epoch``
    reshuffles; ``iter_from(step)`` yields the epoch's ``(x, y, index)`` batches from ``step`` on
    (mid-epoch resume), ``iter()`` from the start.
    """

    def __init__(
        self,
        data: Datasets,
        sampler: BatchSampler,
        device: torch.device,
        seed: int,
        *,
        channels_last: bool = False,
        limit_batches: int | None = None,
    ) -> None:
        self.sampler, self.device, self.seed = sampler, device, int(seed)
        self.channels_last = channels_last
        self.limit_batches = limit_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return min(n, self.limit_batches) if self.limit_batches else n

    def iter_from(self, start: int = 0) -> Iterator[Triple]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Triple]:
        return self.iter_from(0)

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return _memory_format(x, self.channels_last)


class DeviceTrainLoader(TrainLoader):
    """The ``TrainLoader`` arguments plus ``augment`` (crop/flip as the dataset spec says)."""

    def __init__(self, data: Datasets, *args: Any, augment: bool = True, **kwargs: Any) -> None:
        super().__init__(data, *args, **kwargs)
        self.images = data.train_images.to(self.device)
        self.targets = data.train_targets.to(self.device)
        self.spec = data.spec
        self.augment = augment
        self.offsets: torch.Tensor | None = None
        self.flips: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.augment and self.spec.augment != "none":
            gen = aug.seeded_generator(self.device, self.seed, self.epoch)
            n = self.targets.shape[0]
            self.offsets, self.flips = aug.draw_crop_flip(n, self.spec, gen)

    def iter_from(self, start: int = 0) -> Iterator[Triple]:
        for step, index in enumerate(self.sampler.iter_from(start), start=start):
            if step >= len(self):
                return
            index = index.to(self.device, non_blocking=True)
            raw = self.images.index_select(0, index)
            if self.offsets is not None:
                offsets = self.offsets.index_select(1, index)
                x = aug.crop_flip(raw, self.spec, offsets, self.flips.index_select(0, index))
            else:
                x = aug.normalize_batch(raw, self.spec)
            yield self._memory_format(x), self.targets.index_select(0, index), index


class WorkerTrainLoader(TrainLoader):
    """The ``TrainLoader`` arguments plus ``num_workers`` (DataLoader worker processes)."""

    def __init__(self, data: Datasets, *args: Any, num_workers: int = 2, **kwargs: Any) -> None:
        super().__init__(data, *args, **kwargs)
        source = data.train_folder if data.train_folder is not None else data.train_images
        self.dataset = IndexedDataset(
            source, data.train_targets, data.spec, seed=self.seed, train=True
        )
        self.num_workers = int(num_workers)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def iter_from(self, start: int = 0) -> Iterator[Triple]:
        batches = [b.tolist() for b in self.sampler.iter_from(start)][: max(len(self) - start, 0)]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for x, y, index in loader:
            x = self._memory_format(x.to(self.device, non_blocking=True))
            yield x, y.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True)


def eval_batches(
    data: Datasets,
    split: str,
    device: torch.device,
    batch_size: int,
    loader: str,
    num_workers: int = 2,
    channels_last: bool = False,
    limit_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation split ``split`` (``"val"`` or ``"test"``) in order, normalised, without
    augmentation."""
    source, targets = data.split(split)
    if loader == "device" and isinstance(source, torch.Tensor):
        n = targets.shape[0]
        images = source.to(device)
        targets = targets.to(device)
        for i, start in enumerate(range(0, n, batch_size)):
            if limit_batches and i >= limit_batches:
                return
            x = aug.normalize_batch(images[start : start + batch_size], data.spec)
            yield _memory_format(x, channels_last), targets[start : start + batch_size]
        return
    dataset = EvalDataset(source, targets, data.spec)
    dl = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    for i, (x, y) in enumerate(dl):
        if limit_batches and i >= limit_batches:
            return
        x = _memory_format(x.to(device, non_blocking=True), channels_last)
        yield x, y.to(device, non_blocking=True)


def build_train_loader(
    data: Datasets,
    sampler: BatchSampler,
    device: torch.device,
    seed: int,
    loader: str,
    num_workers: int,
    channels_last: bool,
    limit_batches: int | None,
):
    if loader == "device":
        if data.train_images is None:
            raise ConfigError(
                f"dataset.loader=device needs an in-memory dataset; {data.spec.name} is read "
                "from image folders: use dataset.loader=workers"
            )
        return DeviceTrainLoader(
            data, sampler, device, seed, channels_last=channels_last, limit_batches=limit_batches
        )
    if loader == "workers":
        return WorkerTrainLoader(
            data,
            sampler,
            device,
            seed,
            num_workers=num_workers,
            channels_last=channels_last,
            limit_batches=limit_batches,
        )
    raise ConfigError(f"dataset.loader={loader!r} is not one of: device, workers")
