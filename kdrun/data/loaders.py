"""Train and eval loaders over :class:`~kdrun.data.datasets.Datasets`.

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

import torch

from kdrun.data import augment as aug
from kdrun.data.samplers import BatchSampler
from kdrun.data.spec import Datasets
from kdrun.data.views import EvalDataset, IndexedDataset
from kdrun.errors import ConfigError

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class DeviceTrainLoader:
    def __init__(
        self,
        data: Datasets,
        sampler: BatchSampler,
        device: torch.device,
        seed: int,
        augment: bool = True,
        channels_last: bool = False,
        limit_batches: int | None = None,
    ) -> None:
        self.images = data.train_images.to(device)
        self.targets = data.train_targets.to(device)
        self.spec = data.spec
        self.sampler, self.device, self.seed = sampler, device, int(seed)
        self.augment, self.channels_last = augment, channels_last
        self.limit_batches = limit_batches
        self.epoch = 0

        self.offsets: torch.Tensor | None = None
        self.flips: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)
        if self.augment and self.spec.augment != "none":
            gen = aug.seeded_generator(self.device, self.seed, self.epoch)
            n = self.targets.shape[0]
            self.offsets, self.flips = aug.draw_crop_flip(n, self.spec, gen)

    def __len__(self) -> int:
        n = len(self.sampler)
        return min(n, self.limit_batches) if self.limit_batches else n

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
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.targets.index_select(0, index), index

    def __iter__(self) -> Iterator[Triple]:
        return self.iter_from(0)


class WorkerTrainLoader:
    def __init__(
        self,
        data: Datasets,
        sampler: BatchSampler,
        device: torch.device,
        seed: int,
        num_workers: int = 2,
        channels_last: bool = False,
        limit_batches: int | None = None,
    ) -> None:
        source = data.train_folder if data.train_folder is not None else data.train_images
        self.dataset = IndexedDataset(source, data.train_targets, data.spec, seed=seed, train=True)
        self.sampler, self.device = sampler, device
        self.num_workers, self.channels_last = int(num_workers), channels_last
        self.limit_batches = limit_batches

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return min(n, self.limit_batches) if self.limit_batches else n

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
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[Triple]:
        return self.iter_from(0)


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
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, targets[start : start + batch_size]
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
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
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
