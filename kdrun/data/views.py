"""Per-sample ``torch.utils.data.Dataset`` views and folder datasets.

Contract
--------
* :class:`IndexedDataset` (training, ``ds[i] -> (x, y, i)``) and :class:`EvalDataset`
  (``ds[i] -> (x, y)``) wrap a uint8 image tensor ``[N, C, H, W]`` or an ``ImageFolder`` (the
  ``train_source`` / ``test_source`` of a :class:`~kdrun.data.spec.Datasets`) for the DataLoader
  path (``dataset.loader=workers``). Augmentation randomness of :class:`IndexedDataset` is a pure
  function of ``(seed, epoch, index)``, so it does not depend on the number of workers, the access
  order or on resuming.
* :class:`MappedImageFolder` is an ``ImageFolder`` with a fixed class-to-index map (the training
  set's), optionally labelled by an annotation file (Tiny ImageNet's validation layout).
* :func:`subset_folder` keeps only some samples of an ``ImageFolder`` in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from kdrun.data.augment import per_sample_transform
from kdrun.data.seeding import item_seed
from kdrun.data.spec import DataSpec
from kdrun.errors import DatasetError

__all__ = ["EvalDataset", "IndexedDataset", "MappedImageFolder", "subset_folder"]


def _check_source(source: Any, targets: torch.Tensor | None) -> torch.Tensor:
    if isinstance(source, ImageFolder):
        t = torch.as_tensor(source.targets, dtype=torch.int64)
        if targets is not None and not torch.equal(torch.as_tensor(targets, dtype=torch.int64), t):
            raise ValueError("targets do not match the ImageFolder's targets")
        return t
    if not isinstance(source, torch.Tensor) or source.dtype != torch.uint8 or source.ndim != 4:
        raise TypeError("source must be a uint8 tensor [N, C, H, W] or an ImageFolder")
    if targets is None or len(targets) != len(source):
        raise ValueError("targets must be given with one label per image")
    return torch.as_tensor(targets, dtype=torch.int64).cpu()


class _PerSampleBase(Dataset):
    def __init__(
        self,
        source: torch.Tensor | ImageFolder,
        targets: torch.Tensor | None,
        transform: Callable[[Any], torch.Tensor],
    ) -> None:
        self.targets = _check_source(source, targets)
        self.source = source.cpu() if isinstance(source, torch.Tensor) else source
        self.transform = transform

    def __len__(self) -> int:
        return int(self.targets.numel())

    def _load(self, index: int) -> Any:
        if isinstance(self.source, ImageFolder):
            path, _ = self.source.samples[index]
            return self.source.loader(path)  # PIL image (RGB)
        return self.source[index]  # uint8 [C, H, W]


class IndexedDataset(_PerSampleBase):
    """Training view: ``ds[i] -> (x float [C, H, W] normalised, y int, i int)``.

    ``transform`` defaults to ``per_sample_transform(spec, train=train)`` (``train=False`` gives
    the un-augmented training images, still with their index). Before each item the global CPU
    generator is seeded with ``item_seed(seed, epoch, index)`` and restored afterwards (the
    caller's RNG state is left untouched), so the augmentation is a pure function of
    (seed, epoch, index).

    The epoch lives in a shared-memory tensor: ``set_epoch`` (called before iterating a
    DataLoader, like ``DistributedSampler.set_epoch``) also reaches persistent workers.
    """

    def __init__(
        self,
        source: torch.Tensor | ImageFolder,
        targets: torch.Tensor | None,
        spec: DataSpec,
        seed: int = 0,
        transform: Callable[[Any], torch.Tensor] | None = None,
        train: bool = True,
    ) -> None:
        super().__init__(source, targets, transform or per_sample_transform(spec, train=train))
        self.spec = spec
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64)
        try:
            self._epoch.share_memory_()
        except (RuntimeError, OSError):  # pragma: no cover - no shm: non-persistent workers only
            pass

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        index = int(index)
        img = self._load(index)
        # torchvision transforms draw from the global CPU generator: seed it for this item and
        # restore the caller's state afterwards (cheaper than torch.manual_seed + fork_rng, which
        # also touch the accelerator generators)
        gen = torch.default_generator
        state = gen.get_state()
        try:
            gen.manual_seed(item_seed(self.seed, int(self._epoch), index))
            x = self.transform(img)
        finally:
            gen.set_state(state)
        return x, int(self.targets[index]), index


class EvalDataset(_PerSampleBase):
    """Evaluation view: ``ds[i] -> (x float [C, H, W] normalised, y int)``; no augmentation
    (``transform`` defaults to ``per_sample_transform(spec, train=False)``)."""

    def __init__(
        self,
        source: torch.Tensor | ImageFolder,
        targets: torch.Tensor | None,
        spec: DataSpec,
        transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(source, targets, transform or per_sample_transform(spec, train=False))
        self.spec = spec

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        return self.transform(self._load(index)), int(self.targets[index])


class MappedImageFolder(ImageFolder):
    """ImageFolder whose class-to-index map is fixed (the training set's), so validation labels
    always agree with training labels even if some classes have no validation images.

    With ``annotations`` (Tiny ImageNet's ``val_annotations.txt``: ``file<TAB>wnid<TAB>box...``)
    the samples are ``<root>/images/<file>`` labelled by the annotation file instead of by folder.
    """

    def __init__(
        self, root: str, class_to_idx: Mapping[str, int], annotations: str | None = None
    ) -> None:
        self._fixed_class_to_idx = dict(class_to_idx)
        self._annotations = annotations
        super().__init__(root, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:  # type: ignore[override]
        classes = sorted(self._fixed_class_to_idx, key=self._fixed_class_to_idx.__getitem__)
        return classes, dict(self._fixed_class_to_idx)

    def make_dataset(  # type: ignore[override]
        self,
        directory: str,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        if self._annotations is None:
            return ImageFolder.make_dataset(
                directory,
                class_to_idx,
                extensions=extensions,
                is_valid_file=is_valid_file,
                allow_empty=allow_empty,
            )
        samples = []
        with open(self._annotations, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                parts = line.strip().split("\t")
                if not parts or not parts[0]:
                    continue
                if len(parts) < 2 or parts[1] not in class_to_idx:
                    raise DatasetError(
                        f"{self._annotations}:{lineno}: expected '<file>\\t<wnid>...' with a wnid "
                        f"from the training classes, got {line.strip()!r}"
                    )
                path = os.path.join(directory, "images", parts[0])
                if not os.path.isfile(path):
                    raise DatasetError(f"{self._annotations}:{lineno}: image {path} is missing")
                samples.append((path, class_to_idx[parts[1]]))
        return samples


def subset_folder(folder: ImageFolder, idx: torch.Tensor) -> None:
    """Keep only the samples ``idx`` (positions) of ``folder``, in that order, in place."""
    keep = idx.tolist()
    folder.samples = [folder.samples[i] for i in keep]
    folder.imgs = folder.samples
    folder.targets = [s[1] for s in folder.samples]
