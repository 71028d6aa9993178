"""What a built dataset is: :class:`DataSpec` (the facts models and methods need) and
:class:`Datasets` (the train and evaluation splits with their spec).

Contract
--------
* In-memory datasets hold ``uint8`` image tensors ``[N, C, H, W]`` (``train_images`` /
  ``test_images``); folder datasets hold ``torchvision.datasets.ImageFolder`` objects
  (``train_folder`` / ``test_folder``) and leave the image tensors ``None``. Exactly one of the two
  is set per split. ``train_targets`` / ``test_targets`` are always ``int64`` tensors ``[N]``.
* ``DataSpec.augment`` names the training augmentation (:data:`AUGMENTS`), applied by
  :mod:`kdrun.data.augment`; ``mean`` / ``std`` have one value per input channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchvision.datasets import ImageFolder

__all__ = ["AUGMENTS", "DataSpec", "Datasets"]

#: Training augmentations a dataset can declare ('none' turns augmentation off).
AUGMENTS = ("none", "crop_flip", "crop", "imagenet")


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
    """The train and test splits of one dataset plus its :class:`DataSpec`.

    Exactly one of ``train_images`` / ``train_folder`` is set (same for test).
    ``classes`` holds the class names when the source provides them.
    """

    spec: DataSpec
    train_images: torch.Tensor | None
    train_targets: torch.Tensor
    test_images: torch.Tensor | None
    test_targets: torch.Tensor
    train_folder: ImageFolder | None = None
    test_folder: ImageFolder | None = None
    classes: list[str] | None = field(default=None)

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
    def train_source(self) -> torch.Tensor | ImageFolder:
        """The training images: the uint8 tensor, or the ImageFolder of a folder dataset."""
        return self.train_images if self.train_images is not None else self.train_folder

    @property
    def test_source(self) -> torch.Tensor | ImageFolder:
        """The evaluation images: the uint8 tensor, or the ImageFolder of a folder dataset."""
        return self.test_images if self.test_images is not None else self.test_folder
