"""Seeded stratified subsets and splits of a dataset's training set.

Contract
--------
* :func:`stratified_subset` — the training subset of ``dataset.fraction`` (chosen with the run
  seed or ``dataset.subset_seed``); :func:`keep_training_subset` applies it to a
  :class:`~kdrun.data.spec.Datasets` in place. Sample indices are then positions in the subset,
  ``0..N-1``; the evaluation split is never subsampled.
* :func:`stratified_split` — a fixed-size stratified train/test split (the digits split, the
  held-out validation split).
* :func:`hold_out_validation` — ``dataset.val_fraction``: a stratified share of the training set
  replaces the test set as the evaluation split (``test_*`` then hold the validation samples).
  It is fixed by the data (split seed 0), not the run seed, so every trial of a search is scored
  on the same samples.
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
    "check_fraction",
    "hold_out_validation",
    "keep_training_subset",
    "stratified_split",
    "stratified_subset",
]


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


def hold_out_validation(data: Datasets, val_fraction: float) -> None:
    """Replace the test split by a fixed stratified held-out share of the training split."""
    train_idx, val_idx = stratified_split(data.train_targets, val_fraction, seed=0)
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
        subset_folder(data.test_folder, val_idx)
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
