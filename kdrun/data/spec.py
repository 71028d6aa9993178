"""What a built dataset is: :class:`DataSpec` (the facts models and methods need) and
:class:`Datasets` (the train, validation and test splits with their spec).

Contract
--------
* In-memory datasets hold ``uint8`` image tensors ``[N, C, H, W]`` (``train_images`` /
  ``val_images`` / ``test_images``); folder datasets hold ``torchvision.datasets.ImageFolder``
  objects (``train_folder`` / ``val_folder`` / ``test_folder``) and leave the image tensors
  ``None``. Exactly one of the two is set per split. ``train_targets`` / ``test_targets`` are
  always ``int64`` tensors ``[N]``.
* The validation split is optional: ``val_targets`` (and its images or folder) is ``None`` when
  the run has none (:attr:`Datasets.has_validation`). It is always carved out of the training
  set (:mod:`kdrun.data.splits`); the test split is never touched.
* :data:`SPLITS` names the evaluation splits; :meth:`Datasets.split` returns one split's images
  (tensor or ImageFolder) and targets.
* ``DataSpec.augment`` names the training augmentation (:data:`AUGMENTS`), applied by
  :mod:`kdrun.data.augment`; ``mean`` / ``std`` have one value per input channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchvision.datasets import ImageFolder

__all__ = ["AUGMENTS", "SPLITS", "DataSpec", "Datasets"]

#: Training augmentations a dataset can declare ('none' turns augmentation off).
AUGMENTS = ("none", "crop_flip", "crop", "imagenet")
#: The evaluation splits a :class:`Datasets` can hold.
SPLITS = ("val", "test")


@dataclass(frozen=True)
class DataSpec:
    """Facts about a dataset that models and methods need."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # one of AUGMENTS
    crop_padding: int

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise ValueError(f"DataSpec.augment must be one of {AUGMENTS}, got {self.augment!r}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("DataSpec.mean/std need one value per input channel")


@dataclass
class Datasets:
    """The train, validation (optional) and test splits of one dataset plus its
    :class:`DataSpec`.

    Exactly one of ``train_images`` / ``train_folder`` is set (same for test, and for val when
    ``val_targets`` is set). ``classes`` holds the class names when the source provides them.
    """

    spec: DataSpec
    train_images: torch.Tensor | None
    train_targets: torch.Tensor
    test_images: torch.Tensor | None
    test_targets: torch.Tensor
    train_folder: ImageFolder | None = None
    test_folder: ImageFolder | None = None
    classes: list[str] | None = field(default=None)
    val_images: torch.Tensor | None = None
    val_targets: torch.Tensor | None = None
    val_folder: ImageFolder | None = None

    @property
    def in_memory(self) -> bool:
        """True when the images are tensors (``dataset.loader=device`` is possible)."""
        return self.train_images is not None

    @property
    def num_train(self) -> int:
        return int(self.train_targets.numel())

    @property
    def num_test(self) -> int:
        return int(self.test_targets.numel())

    @property
    def has_validation(self) -> bool:
        """True when a validation split was held out of the training set."""
        return self.val_targets is not None

    @property
    def num_val(self) -> int:
        return 0 if self.val_targets is None else int(self.val_targets.numel())

    def split(self, name: str) -> tuple[torch.Tensor | ImageFolder, torch.Tensor]:
        """``(images, targets)`` of evaluation split ``name`` (one of :data:`SPLITS`); the
        images are the uint8 tensor, or the ImageFolder of a folder dataset."""
        if name == "test":
            return self.test_source, self.test_targets
        if name == "val" and self.val_targets is not None:
            images = self.val_images if self.val_images is not None else self.val_folder
            return images, self.val_targets
        raise ValueError(f"no evaluation split {name!r} (splits here: {self.splits})")

    @property
    def splits(self) -> tuple[str, ...]:
        """The evaluation splits present: ``("val", "test")`` or ``("test",)``."""
        return SPLITS if self.has_validation else ("test",)

    @property
    def train_source(self) -> torch.Tensor | ImageFolder:
        """The training images: the uint8 tensor, or the ImageFolder of a folder dataset."""
        return self.train_images if self.train_images is not None else self.train_folder

    @property
    def test_source(self) -> torch.Tensor | ImageFolder:
        """The evaluation images: the uint8 tensor, or the ImageFolder of a folder dataset."""
        return self.test_images if self.test_images is not None else self.test_folder
