"""Dataset builders for kdrun: real loaders for every ``dataset=`` option of the spec.

Contract
--------
``build_datasets(name, root, fraction=1.0, seed=0, download=True, **options) -> Datasets``

* In-memory datasets (``digits``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``synthetic``) come
  back as ``uint8`` tensors ``[N, C, H, W]`` plus ``int64`` targets ``[N]``; folder datasets
  (``tiny_imagenet``, ``imagenet``) as ``torchvision.datasets.ImageFolder`` objects (``*_images`` is
  ``None``; ``*_targets`` is still an ``int64`` tensor).
* ``fraction < 1`` replaces the training set by a seeded stratified subset
  (:func:`stratified_subset`); sample indices are positions in the subset, ``0..N-1``. The test set
  is never subsampled. The subset depends on ``seed`` (the run seed); the data themselves
  (digits split, synthetic images) use fixed data seeds independent of the run seed.
* ``val_fraction > 0`` holds a stratified share of the training set out of training and returns
  it as the evaluation split in place of the test set (``test_*`` then hold the validation
  samples), for hyperparameter searches that must not see the test set. The held-out split is
  fixed by the data (seed 0), not the run seed, so every trial of a search is scored on the same
  samples; ``fraction`` then subsamples the remaining training samples.
* Every failure a user can cause or fix (missing files, no network, bad option) raises
  :class:`DatasetError` with a one-line message saying what to do; no traceback chain is attached.
* :class:`IndexedDataset` (training, yields ``(x, y, index)``) and :class:`EvalDataset` (yields
  ``(x, y)``) are the per-sample ``torch.utils.data.Dataset`` views used by the DataLoader path
  (``dataset.loader=workers``). Augmentation randomness of :class:`IndexedDataset` is a pure
  function of ``(seed, epoch, index)``, so it does not depend on the number of workers, the access
  order or on resuming.

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

import copy
import dataclasses
import gzip
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from kdrun.errors import KdrunError

__all__ = [
    "DATASET_NAMES",
    "DATASET_OPTIONS",
    "DataSpec",
    "DatasetError",
    "Datasets",
    "EvalDataset",
    "IndexedDataset",
    "build_datasets",
    "item_seed",
    "stratified_subset",
]

DATASET_NAMES: tuple[str, ...] = (
    "digits",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "tiny_imagenet",
    "imagenet",
    "synthetic",
)

#: Extra keyword options each builder accepts (everything else is rejected with a DatasetError).
DATASET_OPTIONS: dict[str, tuple[str, ...]] = {
    "digits": (),
    "fashion_mnist": ("system_dir",),
    "cifar10": (),
    "cifar100": (),
    "tiny_imagenet": (),
    "imagenet": (),
    "synthetic": (
        "num_classes",
        "image_size",
        "channels",
        "train_size",
        "test_size",
        "data_seed",
    ),
}

#: Keys of the ``dataset`` config node that are not builder options and are silently ignored.
IGNORED_OPTIONS: frozenset[str] = frozenset({"loader"})

#: Where Debian's ``dataset-fashion-mnist`` package installs its files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

_AUGMENTS = ("none", "crop_flip", "crop", "imagenet")

# Mean / std of the training pixels scaled to [0, 1] (digits and Fashion-MNIST computed from the
# exact training sets built here; see tests/test_datasets.py).
_DIGITS_MEAN, _DIGITS_STD = (0.3060,), (0.3763,)
_FMNIST_MEAN, _FMNIST_STD = (0.2860,), (0.3530,)
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_TINY_MEAN, _TINY_STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DatasetError(KdrunError):
    """A user-facing dataset problem; ``str(err)`` is one line saying what to do."""


@dataclass(frozen=True)
class DataSpec:
    """Facts about a dataset that models and methods need."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # 'none' | 'crop_flip' | 'crop' | 'imagenet'
    crop_padding: int

    def __post_init__(self) -> None:
        if self.augment not in _AUGMENTS:
            raise ValueError(f"DataSpec.augment must be one of {_AUGMENTS}, got {self.augment!r}")
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

    def train_dataset(
        self, seed: int = 0, transform: Callable[[Any], torch.Tensor] | None = None
    ) -> IndexedDataset:
        """Per-sample augmented training view yielding ``(x, y, index)``."""
        source = self.train_images if self.train_images is not None else self.train_folder
        return IndexedDataset(source, self.train_targets, self.spec, seed=seed, transform=transform)

    def test_dataset(self, transform: Callable[[Any], torch.Tensor] | None = None) -> EvalDataset:
        """Per-sample evaluation view yielding ``(x, y)``."""
        source = self.test_images if self.test_images is not None else self.test_folder
        return EvalDataset(source, self.test_targets, self.spec, transform=transform)


# --------------------------------------------------------------------------------------------
# Seeding helpers
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_seed(*keys: int) -> int:
    """A well-mixed non-negative 63-bit seed that is a pure function of the integer ``keys``.

    Used as ``item_seed(seed, epoch, index)`` for per-sample augmentation; handy for any other
    seed derivation (e.g. per-batch generators of the device loader).
    """
    h = 0x243F6A8885A308D3
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


# --------------------------------------------------------------------------------------------
# Subsets and splits
# --------------------------------------------------------------------------------------------


def _check_fraction(fraction: float) -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise DatasetError(
            f"dataset.fraction must be a number in (0, 1], got {fraction!r}"
        ) from None
    if not (0.0 < f <= 1.0) or math.isnan(f):
        raise DatasetError(f"dataset.fraction must be in (0, 1], got {fraction!r}")
    return f


def stratified_subset(targets: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted ``int64`` indices of a seeded stratified subset of ``targets``.

    Each class ``c`` with ``n_c`` samples keeps ``max(1, floor(fraction * n_c + 0.5))`` samples
    (round half up), chosen by ``torch.randperm`` with a CPU generator seeded with ``seed``
    (classes visited in increasing label order), so the result is deterministic. ``fraction=1``
    returns all indices.
    """
    f = _check_fraction(fraction)
    targets = torch.as_tensor(targets).reshape(-1).cpu()
    n = targets.numel()
    if f == 1.0:
        return torch.arange(n, dtype=torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in torch.unique(targets).tolist():  # sorted
        idx = torch.nonzero(targets == c, as_tuple=False).reshape(-1)
        k = max(1, math.floor(f * idx.numel() + 0.5))
        perm = torch.randperm(idx.numel(), generator=gen)
        chosen.append(idx[perm[:k]])
    return torch.sort(torch.cat(chosen)).values.to(torch.int64)


def _stratified_split(
    targets: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified train/test split with exactly ``ceil(test_fraction * N)`` test samples.

    The per-class test counts are ``floor(test_fraction * n_c)`` plus one for the classes with the
    largest remainders (ties: lower label first) until the total is reached.
    """
    targets = targets.reshape(-1)
    classes = torch.unique(targets).tolist()
    counts = [int((targets == c).sum()) for c in classes]
    n_test = math.ceil(test_fraction * targets.numel())
    exact = [test_fraction * n for n in counts]
    per_class = [math.floor(e) for e in exact]
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - per_class[i]), i))
    for i in order[: n_test - sum(per_class)]:
        per_class[i] += 1
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c, k in zip(classes, per_class):
        idx = torch.nonzero(targets == c, as_tuple=False).reshape(-1)
        perm = idx[torch.randperm(idx.numel(), generator=gen)]
        test_idx.append(perm[:k])
        train_idx.append(perm[k:])
    return torch.sort(torch.cat(train_idx)).values, torch.sort(torch.cat(test_idx)).values


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


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
    tr, te = _stratified_split(targets, 0.2, seed=0)
    spec = DataSpec("digits", 10, 1, 8, _DIGITS_MEAN, _DIGITS_STD, "crop", 1)
    return Datasets(
        spec,
        images[tr].contiguous(),
        targets[tr].contiguous(),
        images[te].contiguous(),
        targets[te].contiguous(),
        classes=[str(i) for i in range(10)],
    )


_FMNIST_FILES = {
    # uncompressed name -> expected size in bytes (idx header + payload)
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}


def _install_system_fashion_mnist(raw_dir: str, system_dir: str) -> bool:
    """Decompress Debian's ``dataset-fashion-mnist`` files into ``raw_dir`` (atomically).

    Returns True when ``raw_dir`` holds all four uncompressed files of the right size afterwards.
    Files already present with the right size are left alone.
    """

    def ok(name: str) -> bool:
        path = os.path.join(raw_dir, name)
        return os.path.isfile(path) and os.path.getsize(path) == _FMNIST_FILES[name]

    missing = [n for n in _FMNIST_FILES if not ok(n)]
    if not missing:
        return True
    sources = {n: os.path.join(system_dir, n + ".gz") for n in missing}
    if not all(os.path.isfile(p) for p in sources.values()):
        return False
    try:
        os.makedirs(raw_dir, exist_ok=True)
        for name, src in sources.items():
            tmp = os.path.join(raw_dir, f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "xb") as out, gzip.open(src, "rb") as inp:
                    shutil.copyfileobj(inp, out, 1 << 20)
                if os.path.getsize(tmp) != _FMNIST_FILES[name]:
                    raise DatasetError(
                        f"{src} decompresses to {os.path.getsize(tmp)} bytes, expected "
                        f"{_FMNIST_FILES[name]}; reinstall the dataset-fashion-mnist package"
                    )
                os.replace(tmp, os.path.join(raw_dir, name))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except (OSError, EOFError) as exc:
        raise DatasetError(
            f"could not decompress Fashion-MNIST from {system_dir} into {raw_dir} ({_reason(exc)})"
        ) from None
    return all(ok(n) for n in _FMNIST_FILES)


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
    have = _install_system_fashion_mnist(raw_dir, system_dir)
    hint = (
        f"install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist, "
        f"files in {system_dir}) or put {', '.join(n + '.gz' for n in _FMNIST_FILES)} from "
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
            f"({_reason(exc)}): {hint}"
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
                f"({_reason(exc)}): delete them and {place}"
            ) from None
        if not download:
            raise DatasetError(
                f"{pretty} not found in {folder}/ (dataset.download=false): {place}"
            ) from None
        raise DatasetError(
            f"{pretty} not found in {folder}/ and could not be downloaded ({_reason(exc)}): {place}"
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


class _MappedImageFolder(ImageFolder):
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
    try:
        train = ImageFolder(train_dir)
        ann = os.path.join(val_dir, "val_annotations.txt")
        if os.path.isfile(ann) and os.path.isdir(os.path.join(val_dir, "images")):
            test = _MappedImageFolder(val_dir, train.class_to_idx, annotations=ann)
        else:
            test = _MappedImageFolder(val_dir, train.class_to_idx)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(
            f"Tiny ImageNet in {base} is incomplete ({_reason(exc)}): {layout}"
        ) from None
    if len(test) == 0:
        raise DatasetError(f"Tiny ImageNet validation set in {val_dir} is empty: {layout}")
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
    try:
        train = ImageFolder(train_dir)
        test = _MappedImageFolder(val_dir, train.class_to_idx)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"ImageNet in {base} is incomplete ({_reason(exc)}): {layout}") from None
    if len(test) == 0:
        raise DatasetError(f"ImageNet validation set in {val_dir} is empty: {layout}")
    spec = DataSpec(
        "imagenet", len(train.classes), 3, 224, _IMAGENET_MEAN, _IMAGENET_STD, "imagenet", 0
    )
    return _folder_datasets(spec, train, test)


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


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DatasetError(f"dataset.{name} must be a positive integer, got {value!r}")
    return int(value)


def _build_synthetic(
    root: str,
    download: bool,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
    train_size: int = 512,
    test_size: int = 256,
    data_seed: int = 0,
) -> Datasets:
    """Deterministic, learnable random images (no files).

    Each class has a smooth random pattern (4x4 uniform noise upsampled bilinearly to
    ``image_size``, made left/right symmetric so horizontal flips preserve the label); an image is
    ``128 + 64 * pattern[y] + 32 * N(0, 1)`` clamped to uint8. Labels are balanced
    (``arange(n) % num_classes``, shuffled). Patterns, train and test images come from separate
    generators seeded by ``item_seed(data_seed, k)`` — independent of the run seed, and the test
    set does not depend on ``train_size``. mean/std are the exact per-channel statistics of the
    training images. Augmentation: crop_flip with padding ``max(1, image_size // 8)``.
    """
    k = _positive_int("num_classes", num_classes)
    s = _positive_int("image_size", image_size)
    c = _positive_int("channels", channels)
    n_train = _positive_int("train_size", train_size)
    n_test = _positive_int("test_size", test_size)
    if isinstance(data_seed, bool) or not isinstance(data_seed, int):
        raise DatasetError(f"dataset.data_seed must be an integer, got {data_seed!r}")

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

    xtr, ytr = make(n_train, 1)
    xte, yte = make(n_test, 2)
    xf = xtr.to(torch.float64) / 255
    mean = tuple(round(float(v), 6) for v in xf.mean(dim=(0, 2, 3)))
    std = tuple(round(max(float(v), 1e-3), 6) for v in xf.std(dim=(0, 2, 3)))
    spec = DataSpec("synthetic", k, c, s, mean, std, "crop_flip", max(1, s // 8))
    return Datasets(spec, xtr, ytr, xte, yte, classes=[f"class_{i}" for i in range(k)])


_BUILDERS: dict[str, Callable[..., Datasets]] = {
    "digits": _build_digits,
    "fashion_mnist": _build_fashion_mnist,
    "cifar10": lambda root, download: _build_cifar(root, download, "cifar10"),
    "cifar100": lambda root, download: _build_cifar(root, download, "cifar100"),
    "tiny_imagenet": _build_tiny_imagenet,
    "imagenet": _build_imagenet,
    "synthetic": _build_synthetic,
}


def _subset_folder(folder: ImageFolder, idx: torch.Tensor) -> None:
    keep = idx.tolist()
    folder.samples = [folder.samples[i] for i in keep]
    folder.imgs = folder.samples
    folder.targets = [s[1] for s in folder.samples]


def _hold_out_validation(data: Datasets, val_fraction: float) -> None:
    """Replace the test split by a fixed stratified held-out share of the training split."""
    train_idx, val_idx = _stratified_split(data.train_targets, val_fraction, seed=0)
    if train_idx.numel() == 0 or val_idx.numel() == 0:
        raise DatasetError(
            f"dataset.val_fraction={val_fraction} leaves no training or no validation samples "
            f"of {data.num_train}; choose a fraction between them"
        )
    targets = data.train_targets
    data.test_targets = targets[val_idx].contiguous()
    data.train_targets = targets[train_idx].contiguous()
    if data.train_images is not None:
        data.test_images = data.train_images[val_idx].contiguous()
        data.train_images = data.train_images[train_idx].contiguous()
    if data.train_folder is not None:
        data.test_folder = copy.copy(data.train_folder)
        _subset_folder(data.test_folder, val_idx)
        _subset_folder(data.train_folder, train_idx)


def build_datasets(
    name: str,
    root: str | os.PathLike[str],
    fraction: float = 1.0,
    seed: int = 0,
    download: bool = True,
    augment: str = "default",
    subset_seed: int | None = None,
    val_fraction: float = 0.0,
    **options: Any,
) -> Datasets:
    """Build the train/test data of dataset ``name`` with files under ``root``.

    ``fraction`` < 1 keeps a stratified training subset chosen with the run ``seed``
    (:func:`stratified_subset`). ``download`` allows torchvision downloads (CIFAR, Fashion-MNIST).
    ``subset_seed`` fixes the subset independently of the run seed (None: use ``seed``).
    ``val_fraction`` in [0, 1) evaluates on a fixed stratified held-out share of the training set
    instead of the test set (see the module docstring).
    ``augment='none'`` turns the dataset's standard training augmentation off (``'default'``
    keeps it). ``options`` are dataset-specific (:data:`DATASET_OPTIONS`; ``loader`` is ignored).
    Raises :class:`DatasetError` with a one-line message on any user-fixable problem.
    """
    if name not in _BUILDERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    frac = _check_fraction(fraction)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise DatasetError(f"dataset.val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"dataset.val_fraction must be in [0, 1), got {val_fraction!r}")
    opts = {k: v for k, v in options.items() if k not in IGNORED_OPTIONS}
    unknown = sorted(set(opts) - set(DATASET_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(DATASET_OPTIONS[name]) or "none"
        raise DatasetError(
            f"unknown option(s) {', '.join('dataset.' + u for u in unknown)} for dataset={name}; "
            f"allowed: {allowed}"
        )
    root_str = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if augment not in ("default", "none"):
        raise DatasetError(f"dataset.augment={augment!r} must be default or none")
    data = _BUILDERS[name](root_str, bool(download), **opts)
    if augment == "none":
        data.spec = dataclasses.replace(data.spec, augment="none")
    if val_fraction > 0.0:
        _hold_out_validation(data, float(val_fraction))
    if frac < 1.0:
        idx = stratified_subset(
            data.train_targets, frac, seed if subset_seed is None else subset_seed
        )
        data.train_targets = data.train_targets[idx].contiguous()
        if data.train_images is not None:
            data.train_images = data.train_images[idx].contiguous()
        if data.train_folder is not None:
            _subset_folder(data.train_folder, idx)
    return data


# --------------------------------------------------------------------------------------------
# Per-sample datasets (DataLoader path)
# --------------------------------------------------------------------------------------------


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
        from kdrun.data.augment import per_sample_transform

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
        from kdrun.data.augment import per_sample_transform

        super().__init__(source, targets, transform or per_sample_transform(spec, train=False))
        self.spec = spec

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        return self.transform(self._load(index)), int(self.targets[index])
