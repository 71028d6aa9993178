"""The entry point that builds a run's data: ``build_datasets``.

Contract
--------
``build_datasets(name, root, fraction=1.0, seed=0, download=True, augment="default",
subset_seed=None, val_fraction=0.0, val_split="none", **options) -> Datasets``

* ``name`` is one of :data:`~kdrun.data.builders.DATASET_NAMES`; ``options`` are the dataset's own
  keys (:data:`~kdrun.data.builders.DATASET_OPTIONS`; ``loader`` is not a builder option and is
  ignored). Built by :data:`~kdrun.data.builders.BUILDERS` from files under ``root``; in-memory
  datasets come back as uint8 tensors, folder datasets as ``ImageFolder`` objects
  (:class:`~kdrun.data.spec.Datasets`).
* ``val_fraction`` in [0, 1) (> 0), or ``val_split='standard'`` for the datasets with a
  conventional split: a validation split, a fixed stratified share of the training set held out
  into ``val_*`` beside the untouched test split (:func:`~kdrun.data.splits.hold_out_validation`;
  ``val_fraction`` is fixed by ``subset_seed``, 0 when None). The two are exclusive.
  ``fraction`` then subsamples the remaining training samples.
* ``fraction`` in (0, 1]: keep a seeded stratified training subset chosen with ``subset_seed``, or
  the run ``seed`` when it is None (:func:`~kdrun.data.splits.keep_training_subset`). The
  validation and test splits are never subsampled.
* ``augment='none'`` turns the dataset's standard training augmentation off (``'default'`` keeps
  it).
* Every failure a user can cause or fix raises :class:`~kdrun.errors.DatasetError` with a
  one-line message naming the key or the files and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from kdrun.data.builders import BUILDERS, DATASET_NAMES, DATASET_OPTIONS
from kdrun.data.spec import Datasets
from kdrun.data.splits import check_fraction, hold_out_validation, keep_training_subset
from kdrun.errors import DatasetError

__all__ = ["IGNORED_OPTIONS", "build_datasets"]

#: Keys of the ``dataset`` config node that are not builder options and are silently ignored.
IGNORED_OPTIONS: frozenset[str] = frozenset({"loader"})


def _check_val_fraction(val_fraction: Any) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise DatasetError(f"dataset.val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"dataset.val_fraction must be in [0, 1), got {val_fraction!r}")
    return float(val_fraction)


def _builder_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    opts = {k: v for k, v in options.items() if k not in IGNORED_OPTIONS}
    unknown = sorted(set(opts) - set(DATASET_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(DATASET_OPTIONS[name]) or "none"
        raise DatasetError(
            f"unknown option(s) {', '.join('dataset.' + u for u in unknown)} for dataset={name}; "
            f"allowed: {allowed}"
        )
    return opts


def build_datasets(
    name: str,
    root: str | os.PathLike[str],
    fraction: float = 1.0,
    seed: int = 0,
    download: bool = True,
    augment: str = "default",
    subset_seed: int | None = None,
    val_fraction: float = 0.0,
    val_split: str = "none",
    **options: Any,
) -> Datasets:
    """Build the train/evaluation data of dataset ``name`` with files under ``root``
    (see the module docstring)."""
    if name not in BUILDERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    frac = check_fraction(fraction)
    val = _check_val_fraction(val_fraction)
    opts = _builder_options(name, options)
    if val_split not in ("none", "standard"):
        raise DatasetError(f"dataset.val_split={val_split!r} must be none or standard")
    if val_split == "standard" and val > 0.0:
        raise DatasetError(
            "dataset.val_split=standard and dataset.val_fraction>0 both ask for a validation "
            "split: set one of them (dataset.val_fraction=0 or dataset.val_split=none)"
        )
    if augment not in ("default", "none"):
        raise DatasetError(f"dataset.augment={augment!r} must be default or none")
    root_str = os.path.abspath(os.path.expanduser(os.fspath(root)))
    data = BUILDERS[name](root_str, bool(download), **opts)
    if augment == "none":
        data.spec = dataclasses.replace(data.spec, augment="none")
    if val > 0.0 or val_split == "standard":
        hold_out_validation(data, val, 0 if subset_seed is None else subset_seed, val_split)
    keep_training_subset(data, frac, seed if subset_seed is None else subset_seed)
    return data
