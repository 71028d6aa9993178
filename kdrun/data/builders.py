"""The seven dataset builders and their registry.

Contract
--------
``BUILDERS[name](root, download, **options) -> Datasets`` builds the full train/test splits of
dataset ``name`` from files under ``root`` (an absolute path); ``DATASET_OPTIONS[name]`` lists the
keyword options the builder accepts. Builders raise :class:`DatasetError` with a one-line message
saying what to do for every problem a user can fix (missing files, no network, bad option), with
no traceback chain. The data themselves (digits split, synthetic images) use fixed data seeds
independent of the run seed. :func:`kdrun.data.datasets.build_datasets` is the entry point that
validates options and applies ``fraction`` / ``val_fraction``.

Dataset facts (train / test sizes, classes, shape, augmentation):

==============  =============  =======  ===========  ==============================
name            train / test   classes  C x H x W    augment (padding)
==============  =============  =======  ===========  ==============================
digits          1437 / 360     10       1 x 8 x 8    crop (1)
fashion_mnist   60000 / 10000  10       1 x 28 x 28  crop_flip (2)
cifar10         50000 / 10000  10       3 x 32 x 32  crop_flip (4)
cifar100        50000 / 10000  100      3 x 32 x 32  crop_flip (4)
tiny_imagenet   100000/10000   200      3 x 64 x 64  crop_flip (4)
imagenet        1281167/50000  1000     3 x 224²     imagenet (random resized crop)
synthetic       512 / 256      10       3 x 32 x 32  crop_flip (image_size // 8)
==============  =============  =======  ===========  ==============================
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.datasets import ImageFolder

from kdrun.data.debian import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_SYSTEM_DIR,
    install_system_fashion_mnist,
)
from kdrun.data.seeding import item_seed
from kdrun.data.spec import Datasets, DataSpec
from kdrun.data.splits import stratified_split
from kdrun.data.views import MappedImageFolder
from kdrun.errors import DatasetError, one_line

__all__ = ["BUILDERS", "DATASET_NAMES", "DATASET_OPTIONS"]

DATASET_NAMES: tuple[str, ...] = (
    "digits",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "tiny_imagenet",
    "imagenet",
    "synthetic",
)

# Mean / std of the training pixels scaled to [0, 1] (digits and Fashion-MNIST computed from the
# exact training sets built here; see tests/test_datasets.py).
_DIGITS_MEAN, _DIGITS_STD = (0.3060,), (0.3763,)
_FMNIST_MEAN, _FMNIST_STD = (0.2860,), (0.3530,)
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_TINY_MEAN, _TINY_STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _build_digits(root: str, download: bool) -> Datasets:
    """scikit-learn's bundled 8x8 digits (1,797 images; no network, no files).

    Pixel values 0..16 are scaled to uint8 by ``round(v * 255 / 16)``. The split is a fixed
    stratified 80/20 split (1,437 / 360) with split seed 0, independent of the run seed.
    Augmentation: random 8x8 crop of the 1-pixel zero-padded image, no flips (digits are not
    mirror-symmetric: a flipped 2 or 7 is not a 2 or 7).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - sklearn is a dependency
        raise DatasetError("dataset=digits needs scikit-learn (pip install scikit-learn)") from None
    bunch = load_digits()
    raw = torch.as_tensor(bunch.images).round().to(torch.int64)  # [1797, 8, 8], 0..16
    images = ((raw * 255 + 8) // 16).to(torch.uint8).unsqueeze(1).contiguous()
    targets = torch.as_tensor(bunch.target, dtype=torch.int64)
    tr, te = stratified_split(targets, 0.2, seed=0)
    spec = DataSpec("digits", 10, 1, 8, _DIGITS_MEAN, _DIGITS_STD, "crop", 1)
    return Datasets(
        spec,
        images[tr].contiguous(),
        targets[tr].contiguous(),
        images[te].contiguous(),
        targets[te].contiguous(),
        classes=[str(i) for i in range(10)],
    )


def _build_fashion_mnist(
    root: str, download: bool, system_dir: str = FASHION_MNIST_SYSTEM_DIR
) -> Datasets:
    """Fashion-MNIST via torchvision's ``FashionMNIST``.

    Source order: ``<root>/FashionMNIST/raw/`` (uncompressed idx files), else Debian's
    ``dataset-fashion-mnist`` package in ``system_dir`` (decompressed into that raw dir, no
    network; its ``.gz`` files are re-compressed so torchvision's archive MD5s cannot apply), else
    torchvision's download (if ``download``). Augmentation: random 28x28 crop of the 2-pixel
    zero-padded image plus horizontal flip — clothing classes are left/right symmetric (a mirrored
    sneaker, bag or shirt is still one), and flip is the standard Fashion-MNIST recipe.
    """
    from torchvision.datasets import FashionMNIST

    raw_dir = os.path.join(root, "FashionMNIST", "raw")
    have = install_system_fashion_mnist(raw_dir, system_dir)
    hint = (
        f"install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist, "
        f"files in {system_dir}) or put {', '.join(n + '.gz' for n in FASHION_MNIST_FILES)} from "
        f"{FashionMNIST.mirrors[0]} into {raw_dir}/ and run with dataset.download=true"
    )
    if not have and not download:
        raise DatasetError(
            f"Fashion-MNIST not found in {raw_dir}/ and dataset.download=false: {hint}"
        )
    try:
        train = FashionMNIST(root, train=True, download=not have and download)
        test = FashionMNIST(root, train=False, download=False)
    except Exception as exc:  # network / integrity / format errors from torchvision
        raise DatasetError(
            f"Fashion-MNIST not available in {raw_dir}/ and could not be downloaded "
            f"({one_line(exc)}): {hint}"
        ) from None
    spec = DataSpec("fashion_mnist", 10, 1, 28, _FMNIST_MEAN, _FMNIST_STD, "crop_flip", 2)
    return Datasets(
        spec,
        train.data.unsqueeze(1).contiguous(),
        train.targets.to(torch.int64),
        test.data.unsqueeze(1).contiguous(),
        test.targets.to(torch.int64),
        classes=list(FashionMNIST.classes),
    )


def _cifar_files_present(cls: Any, root: str) -> bool:
    folder = os.path.join(root, cls.base_folder)
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return all(os.path.isfile(os.path.join(folder, n)) for n in names)


def _build_cifar(root: str, download: bool, which: str) -> Datasets:
    """CIFAR-10/100 through torchvision (MD5 of every batch file verified by torchvision).

    Augmentation: random 32x32 crop of the 4-pixel zero-padded image plus horizontal flip.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if which == "cifar10" else CIFAR100
    pretty = "CIFAR-10" if which == "cifar10" else "CIFAR-100"
    folder = os.path.join(root, cls.base_folder)
    place = (
        f"download {cls.filename} from {cls.url} and extract it in {root}/ "
        f"(giving {folder}/), or put the archive at {os.path.join(root, cls.filename)} "
        f"and run with dataset.download=true"
    )
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=False)
    except Exception as exc:  # URLError, OSError, MD5 mismatch, tar errors ...
        if _cifar_files_present(cls, root):
            raise DatasetError(
                f"{pretty} files in {folder}/ failed torchvision's MD5 check or could not be read "
                f"({one_line(exc)}): delete them and {place}"
            ) from None
        if not download:
            raise DatasetError(
                f"{pretty} not found in {folder}/ (dataset.download=false): {place}"
            ) from None
        raise DatasetError(
            f"{pretty} not found in {folder}/ and could not be downloaded ({one_line(exc)}): {place}"
        ) from None
    n_classes = 10 if which == "cifar10" else 100
    mean, std = (
        (_CIFAR10_MEAN, _CIFAR10_STD) if which == "cifar10" else (_CIFAR100_MEAN, _CIFAR100_STD)
    )
    spec = DataSpec(which, n_classes, 3, 32, mean, std, "crop_flip", 4)

    def to_tensor(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        return x, y

    xtr, ytr = to_tensor(train)
    xte, yte = to_tensor(test)
    return Datasets(spec, xtr, ytr, xte, yte, classes=list(train.classes))


def _list_class_dirs(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir())
    except OSError:
        return []


def _build_tiny_imagenet(root: str, download: bool) -> Datasets:
    """Tiny ImageNet (200 classes, 64x64) from its real on-disk layout.

    ``<root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG``; validation (the labelled test split)
    either in the real layout ``val/images/*.JPEG`` + ``val/val_annotations.txt`` or re-organised
    into ``val/<wnid>/...``. Class indices follow the sorted training wnids. Nothing is downloaded.
    Augmentation: random 64x64 crop of the 4-pixel zero-padded image plus horizontal flip.
    """
    base = os.path.join(root, "tiny-imagenet-200")
    train_dir, val_dir = os.path.join(base, "train"), os.path.join(base, "val")
    layout = (
        f"expected {train_dir}/<wnid>/images/*.JPEG and {val_dir}/images/*.JPEG with "
        f"{val_dir}/val_annotations.txt (or {val_dir}/<wnid>/*.JPEG); download "
        f"http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it in {root}/"
    )
    if not _list_class_dirs(train_dir) or not os.path.isdir(val_dir):
        raise DatasetError(f"Tiny ImageNet not found: {layout}")
    ann = os.path.join(val_dir, "val_annotations.txt")
    if not (os.path.isfile(ann) and os.path.isdir(os.path.join(val_dir, "images"))):
        ann = None  # re-organised layout val/<wnid>/...
    train, test = _open_folders("Tiny ImageNet", train_dir, val_dir, layout, annotations=ann)
    spec = DataSpec(
        "tiny_imagenet", len(train.classes), 3, 64, _TINY_MEAN, _TINY_STD, "crop_flip", 4
    )
    return _folder_datasets(spec, train, test)


def _build_imagenet(root: str, download: bool) -> Datasets:
    """ImageNet-1k from ``<root>/imagenet/{train,val}/<class>/*`` (torchvision ImageFolder).

    Class indices follow the sorted training folder names (the validation set must use the same
    folder names, as produced by the usual ``valprep.sh``). Nothing is downloaded.
    Augmentation: RandomResizedCrop(224) + horizontal flip; evaluation Resize(256) + CenterCrop(224).
    """
    base = os.path.join(root, "imagenet")
    train_dir, val_dir = os.path.join(base, "train"), os.path.join(base, "val")
    layout = (
        f"expected class subfolders {train_dir}/<wnid>/*.JPEG and {val_dir}/<wnid>/*.JPEG "
        f"(ImageNet must be obtained from image-net.org and laid out as ImageFolder)"
    )
    if not _list_class_dirs(train_dir) or not _list_class_dirs(val_dir):
        raise DatasetError(f"ImageNet not found: {layout}")
    train, test = _open_folders("ImageNet", train_dir, val_dir, layout)
    spec = DataSpec(
        "imagenet", len(train.classes), 3, 224, _IMAGENET_MEAN, _IMAGENET_STD, "imagenet", 0
    )
    return _folder_datasets(spec, train, test)


def _open_folders(
    pretty: str, train_dir: str, val_dir: str, layout: str, annotations: str | None = None
) -> tuple[ImageFolder, MappedImageFolder]:
    """The training ImageFolder and the validation set labelled with its class map; unreadable or
    empty folders raise a one-line :class:`DatasetError` ending with the expected ``layout``."""
    try:
        train = ImageFolder(train_dir)
        test = MappedImageFolder(val_dir, train.class_to_idx, annotations=annotations)
    except DatasetError:
        raise
    except (OSError, RuntimeError) as exc:
        base = os.path.dirname(train_dir)
        raise DatasetError(
            f"{pretty} in {base} is incomplete ({one_line(exc)}): {layout}"
        ) from None
    if len(test) == 0:
        raise DatasetError(f"{pretty} validation set in {val_dir} is empty: {layout}")
    return train, test


def _folder_datasets(spec: DataSpec, train: ImageFolder, test: ImageFolder) -> Datasets:
    return Datasets(
        spec,
        None,
        torch.as_tensor(train.targets, dtype=torch.int64),
        None,
        torch.as_tensor(test.targets, dtype=torch.int64),
        train_folder=train,
        test_folder=test,
        classes=list(train.classes),
    )


@dataclass(frozen=True)
class _SyntheticOptions:
    """The options of ``synthetic`` (integers; all but ``data_seed`` at least 1), checked on
    construction with a one-line :class:`DatasetError`."""

    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    train_size: int = 512
    test_size: int = 256
    data_seed: int = 0

    def __post_init__(self) -> None:
        for option in fields(self):
            name, value = option.name, getattr(self, option.name)
            positive = name != "data_seed"
            if isinstance(value, bool) or not isinstance(value, int) or (positive and value < 1):
                kind = "a positive integer" if positive else "an integer"
                raise DatasetError(f"dataset.{name} must be {kind}, got {value!r}")


def _build_synthetic(root: str, download: bool, **options: int) -> Datasets:
    """Deterministic, learnable random images (no files); ``options`` as
    :class:`_SyntheticOptions`.

    Each class has a smooth random pattern (4x4 uniform noise upsampled bilinearly to
    ``image_size``, made left/right symmetric so horizontal flips preserve the label); an image is
    ``128 + 64 * pattern[y] + 32 * N(0, 1)`` clamped to uint8. Labels are balanced
    (``arange(n) % num_classes``, shuffled). Patterns, train and test images come from separate
    generators seeded by ``item_seed(data_seed, k)`` — independent of the run seed, and the test
    set does not depend on ``train_size``. mean/std are the exact per-channel statistics of the
    training images. Augmentation: crop_flip with padding ``max(1, image_size // 8)``.
    """
    opts = _SyntheticOptions(**options)
    k, s, c, data_seed = opts.num_classes, opts.image_size, opts.channels, opts.data_seed

    g = torch.Generator().manual_seed(item_seed(data_seed, 0))
    base = torch.rand(k, c, 4, 4, generator=g) * 2 - 1
    patterns = F.interpolate(base, size=(s, s), mode="bilinear", align_corners=False)
    patterns = (patterns + patterns.flip(-1)) / 2
    patterns = patterns / patterns.flatten(1).std(dim=1).clamp_min(1e-6).view(k, 1, 1, 1) * 0.5

    def make(n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(item_seed(data_seed, stream))
        y = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, c, s, s, generator=gen)
        x = (128 + 64 * patterns[y] + 32 * noise).round().clamp(0, 255).to(torch.uint8)
        return x.contiguous(), y.to(torch.int64)

    xtr, ytr = make(opts.train_size, 1)
    xte, yte = make(opts.test_size, 2)
    xf = xtr.to(torch.float64) / 255
    mean = tuple(round(float(v), 6) for v in xf.mean(dim=(0, 2, 3)))
    std = tuple(round(max(float(v), 1e-3), 6) for v in xf.std(dim=(0, 2, 3)))
    spec = DataSpec("synthetic", k, c, s, mean, std, "crop_flip", max(1, s // 8))
    return Datasets(spec, xtr, ytr, xte, yte, classes=[f"class_{i}" for i in range(k)])


BUILDERS: dict[str, Callable[..., Datasets]] = {
    "digits": _build_digits,
    "fashion_mnist": _build_fashion_mnist,
    "cifar10": lambda root, download: _build_cifar(root, download, "cifar10"),
    "cifar100": lambda root, download: _build_cifar(root, download, "cifar100"),
    "tiny_imagenet": _build_tiny_imagenet,
    "imagenet": _build_imagenet,
    "synthetic": _build_synthetic,
}

#: Extra keyword options each builder accepts (everything else is rejected with a DatasetError).
DATASET_OPTIONS: dict[str, tuple[str, ...]] = {
    "digits": (),
    "fashion_mnist": ("system_dir",),
    "cifar10": (),
    "cifar100": (),
    "tiny_imagenet": (),
    "imagenet": (),
    "synthetic": tuple(option.name for option in fields(_SyntheticOptions)),
}
