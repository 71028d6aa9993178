"""Seeded stratified subsets and splits of a dataset's training set.

Contract
--------
* :func:`stratified_subset` — the training subset of ``dataset.fraction`` (chosen with the run
  seed or ``dataset.subset_seed``); :func:`keep_training_subset` applies it to a
  :class:`~kdrun.data.spec.Datasets` in place. Sample indices are then positions in the subset,
  ``0..N-1``; the validation and test splits are never subsampled.
* :func:`stratified_split` — a fixed-size stratified train/held-out split (the digits split, the
  validation splits).
* :func:`hold_out_validation` — the validation split, a stratified share of the training set
  moved into ``val_*`` (the test split is kept as it is):

  - ``dataset.val_fraction`` > 0: ``ceil(val_fraction * N)`` samples, split seed
    ``dataset.subset_seed`` (0 when it is null) — fixed by the data, not the run seed, so every
    seed and every trial of a search is scored on the same samples;
  - ``dataset.val_split=standard``: the dataset's conventional held-out share of its training
    set, :data:`STANDARD_VAL_SIZES` samples with split seed 0 (CIFAR-10/100: 45,000 train /
    5,000 val, 500 or 50 per class; Tiny ImageNet: 90,000 / 10,000, 50 per class; ImageNet:
    50,000 of the training images, about 39 per class in proportion to the class sizes).
* Selection is deterministic: CPU generators seeded with the given seed, classes visited in
  increasing label order, returned indices sorted.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from kdrun.data.spec import Datasets
from kdrun.data.views import subset_folder
from kdrun.errors import DatasetError

__all__ = [
    "STANDARD_VAL_SIZES",
    "check_fraction",
    "hold_out_validation",
    "keep_training_subset",
    "stratified_split",
    "stratified_subset",
]

#: ``dataset.val_split=standard``: validation samples held out of each dataset's training set.
STANDARD_VAL_SIZES: dict[str, int] = {
    "cifar10": 5_000,
    "cifar100": 5_000,
    "tiny_imagenet": 10_000,
    "imagenet": 50_000,
}


def check_fraction(fraction: Any) -> float:
    """``dataset.fraction`` as a float in (0, 1], or a :class:`DatasetError` naming the key."""
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
    f = check_fraction(fraction)
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


def stratified_split(
    targets: torch.Tensor, test_fraction: float, seed: int, n_test: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified train/test split with exactly ``ceil(test_fraction * N)`` test samples
    (or ``n_test`` when given; ``test_fraction`` is then ``n_test / N``).

    The per-class test counts are ``floor(test_fraction * n_c)`` plus one for the classes with the
    largest remainders (ties: lower label first) until the total is reached.
    """
    targets = targets.reshape(-1)
    classes = torch.unique(targets).tolist()
    counts = [int((targets == c).sum()) for c in classes]
    if n_test is None:
        n_test = math.ceil(test_fraction * targets.numel())
    else:
        test_fraction = n_test / max(targets.numel(), 1)
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


def hold_out_validation(
    data: Datasets, val_fraction: float = 0.0, seed: int = 0, val_split: str = "none"
) -> None:
    """Move a fixed stratified share of the training split into the validation split
    (``dataset.val_fraction`` or ``dataset.val_split=standard``; see the module docstring)."""
    if val_split == "standard":
        size = STANDARD_VAL_SIZES.get(data.spec.name)
        if size is None:
            raise DatasetError(
                f"dataset={data.spec.name} has no standard validation split "
                f"(dataset.val_split=standard is for {', '.join(STANDARD_VAL_SIZES)}): "
                "use dataset.val_fraction=0.1 instead"
            )
        train_idx, val_idx = stratified_split(data.train_targets, 0.0, seed=0, n_test=size)
        what = f"dataset.val_split=standard ({size} samples)"
    else:
        train_idx, val_idx = stratified_split(data.train_targets, val_fraction, seed=seed)
        what = f"dataset.val_fraction={val_fraction}"
    if train_idx.numel() == 0 or val_idx.numel() == 0:
        raise DatasetError(
            f"{what} leaves no training or no validation samples of {data.num_train}; "
            "choose a fraction between them"
        )
    targets = data.train_targets
    data.val_targets = targets[val_idx].contiguous()
    data.train_targets = targets[train_idx].contiguous()
    if data.train_images is not None:
        data.val_images = data.train_images[val_idx].contiguous()
        data.train_images = data.train_images[train_idx].contiguous()
    if data.train_folder is not None:
        data.val_folder = copy.copy(data.train_folder)
        subset_folder(data.val_folder, val_idx)
        subset_folder(data.train_folder, train_idx)


def keep_training_subset(data: Datasets, fraction: float, seed: int) -> None:
    """Replace the training split by its :func:`stratified_subset` (no-op for ``fraction=1``)."""
    if check_fraction(fraction) == 1.0:
        return
    idx = stratified_subset(data.train_targets, fraction, seed)
    data.train_targets = data.train_targets[idx].contiguous()
    if data.train_images is not None:
        data.train_images = data.train_images[idx].contiguous()
    if data.train_folder is not None:
        subset_folder(data.train_folder, idx)
