"""Tests of kdrun.data (builders, splits, views, augment) and of the fake datasets in
tests/fake_datasets.py, against independent computations."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.utils as tv_utils
from torchvision.datasets import CIFAR10, CIFAR100

from kdrun.data.augment import (
    augment_batch,
    normalize_batch,
    per_sample_transform,
    seeded_generator,
)
from kdrun.data.datasets import build_datasets
from kdrun.data.spec import DataSpec
from kdrun.data.splits import STANDARD_VAL_SIZES, stratified_split, stratified_subset
from kdrun.data.views import EvalDataset, IndexedDataset
from kdrun.errors import DatasetError
from tests.fake_datasets import (
    patched_cifar_checksums,
    write_fake_cifar,
    write_fake_imagefolder,
    write_fake_tiny_imagenet,
)

FMNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails immediately with URLError."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(tv_utils, "download_url", refuse)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", refuse)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return refuse


def _candidates(img: torch.Tensor, pad: int, flips: bool) -> torch.Tensor:
    """All crops (and flipped crops) of the zero-padded image, by explicit slicing."""
    _, h, w = img.shape
    padded = F.pad(img, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out.append(crop)
            if flips:
                out.append(crop.flip(-1))
    return torch.stack(out)


def _match(outputs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Index of the candidate equal to each output (-1 if none)."""
    eq = (outputs.flatten(1)[:, None, :] == candidates.flatten(1)[None, :, :]).all(-1)
    return torch.where(
        eq.any(1), eq.float().argmax(1), torch.full_like(eq[:, 0], -1, dtype=torch.long)
    )


# ---------------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_stats(tmp_path):
    from sklearn.datasets import load_digits

    d = build_datasets("digits", tmp_path)
    s = d.spec
    assert (s.num_classes, s.in_channels, s.image_size, s.augment, s.crop_padding) == (
        10,
        1,
        8,
        "crop",
        1,
    )
    assert d.train_images.shape == (1437, 1, 8, 8) and d.test_images.shape == (360, 1, 8, 8)
    assert d.train_images.dtype == torch.uint8 and d.train_targets.dtype == torch.int64
    assert d.train_folder is None and d.test_folder is None
    # every original image appears exactly once across the two splits, with its label
    ref = load_digits()
    ref_u8 = np.rint(ref.images * 255 / 16).astype(np.int64)
    both = torch.cat([d.train_images, d.test_images]).reshape(-1, 64).numpy().astype(np.int64)
    labels = torch.cat([d.train_targets, d.test_targets]).numpy()
    key = {tuple(r): t for r, t in zip(ref_u8.reshape(-1, 64), ref.target)}
    assert all(key[tuple(r)] == t for r, t in zip(both, labels))
    assert sorted(map(tuple, both)) == sorted(map(tuple, ref_u8.reshape(-1, 64)))
    # stratified: each class's test share is within one sample of 20%
    for c in range(10):
        n_c = int((ref.target == c).sum())
        assert abs(int((d.test_targets == c).sum()) - 0.2 * n_c) <= 1
    # spec mean/std are the training-pixel statistics
    x = d.train_images.double() / 255
    assert s.mean[0] == pytest.approx(x.mean().item(), abs=1e-4)
    assert s.std[0] == pytest.approx(x.std().item(), abs=1e-4)
    # the split is fixed: independent of the run seed
    d2 = build_datasets("digits", tmp_path, seed=123)
    assert torch.equal(d.train_images, d2.train_images) and torch.equal(
        d.test_targets, d2.test_targets
    )


def test_fraction_subsets_training_set_only(tmp_path):
    full = build_datasets("digits", tmp_path)
    sub = build_datasets("digits", tmp_path, fraction=0.1, seed=3)
    idx = stratified_subset(full.train_targets, 0.1, 3)
    assert torch.equal(sub.train_images, full.train_images[idx])
    assert torch.equal(sub.train_targets, full.train_targets[idx])
    assert torch.equal(sub.test_images, full.test_images)
    assert sub.num_train == idx.numel() and sub.num_test == 360


def test_val_fraction_holds_out_a_fixed_stratified_share(tmp_path):
    full = build_datasets("digits", tmp_path)
    d = build_datasets("digits", tmp_path, val_fraction=0.2, seed=5)
    n = full.num_train
    assert d.num_val == math.ceil(0.2 * n) and d.num_train == n - d.num_val
    assert d.has_validation and d.splits == ("val", "test") and not full.has_validation
    # the test split is untouched
    assert torch.equal(d.test_images, full.test_images) and d.num_test == full.num_test
    # every held-out sample is a training sample, none of them is trained on, none is lost
    rows = {
        tuple(img.flatten().tolist()) + (int(y),) for img, y in zip(d.val_images, d.val_targets)
    }
    train_rows = {
        tuple(img.flatten().tolist()) + (int(y),) for img, y in zip(d.train_images, d.train_targets)
    }
    all_rows = {
        tuple(img.flatten().tolist()) + (int(y),)
        for img, y in zip(full.train_images, full.train_targets)
    }
    assert rows <= all_rows and train_rows <= all_rows and not rows & train_rows
    # stratified: per-class shares within one sample of 20 %
    for c in range(10):
        n_c = int((full.train_targets == c).sum())
        assert abs(int((d.val_targets == c).sum()) - 0.2 * n_c) <= 1
    # fixed by the data (subset_seed, 0 when null), not the run seed; fraction subsamples the rest
    d2 = build_datasets("digits", tmp_path, val_fraction=0.2, seed=9)
    assert torch.equal(d.val_images, d2.val_images)
    assert torch.equal(
        d.val_images, build_datasets("digits", tmp_path, val_fraction=0.2, subset_seed=0).val_images
    )
    other = build_datasets("digits", tmp_path, val_fraction=0.2, subset_seed=3)
    assert not torch.equal(d.val_targets, other.val_targets) or not torch.equal(
        d.val_images, other.val_images
    )
    sub = build_datasets("digits", tmp_path, val_fraction=0.2, fraction=0.5, seed=9)
    assert torch.equal(sub.val_targets, d.val_targets)
    assert sub.num_train == stratified_subset(d.train_targets, 0.5, 9).numel()


def test_val_fraction_on_folder_datasets(tmp_path):
    write_fake_tiny_imagenet(tmp_path, n_classes=3, n_per_class=4, n_val_per_class=2)
    d = build_datasets("tiny_imagenet", tmp_path, val_fraction=0.25)
    assert len(d.val_folder) == 3 == d.num_val and len(d.train_folder) == 9 == d.num_train
    assert "/train/" in d.val_folder.samples[0][0] and len(d.test_folder) == 6
    assert not {s for s, _ in d.val_folder.samples} & {s for s, _ in d.train_folder.samples}
    assert d.val_targets.tolist() == [y for _, y in d.val_folder.samples]


def test_standard_validation_split(tmp_path):
    # CIFAR's 45k/5k: exactly 500 of each class's 5,000 training images (50 of 500 for CIFAR-100)
    for classes in (10, 100):
        targets = torch.arange(50_000) % classes
        size = STANDARD_VAL_SIZES["cifar10" if classes == 10 else "cifar100"]
        train, val = stratified_split(targets, 0.0, seed=0, n_test=size)
        assert val.numel() == 5_000 and train.numel() == 45_000
        assert (
            torch.bincount(targets[val], minlength=classes).tolist() == [5_000 // classes] * classes
        )
    write_fake_tiny_imagenet(tmp_path, n_classes=3, n_per_class=4, n_val_per_class=2)
    with pytest.raises(DatasetError, match=r"val_split=standard \(10000 samples\) leaves no"):
        build_datasets("tiny_imagenet", tmp_path, val_split="standard")  # 12 training images
    with pytest.raises(DatasetError, match="no standard validation split"):
        build_datasets("digits", tmp_path, val_split="standard")
    with pytest.raises(DatasetError, match="set one of them"):
        build_datasets("tiny_imagenet", tmp_path, val_split="standard", val_fraction=0.1)
    with pytest.raises(DatasetError, match="dataset.val_split='x' must be none or standard"):
        build_datasets("digits", tmp_path, val_split="x")


@pytest.mark.parametrize("bad", [-0.1, 1.0, "x", True])
def test_bad_val_fraction_rejected(tmp_path, bad):
    with pytest.raises(DatasetError, match="val_fraction"):
        build_datasets("digits", tmp_path, val_fraction=bad)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "x"])
def test_bad_fraction_rejected(tmp_path, bad):
    with pytest.raises(DatasetError, match="fraction"):
        build_datasets("digits", tmp_path, fraction=bad)


def test_unknown_dataset_and_option(tmp_path):
    with pytest.raises(DatasetError, match="choose one of: digits"):
        build_datasets("mnist", tmp_path)
    with pytest.raises(DatasetError, match="dataset.image_size"):
        build_datasets("digits", tmp_path, image_size=4)
    build_datasets("digits", tmp_path, loader="device")  # the loader key is tolerated


# --------------------------------------------------------------------------- stratified_subset


def test_stratified_subset_proportions_determinism_and_seed():
    g = torch.Generator().manual_seed(0)
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate([100, 37, 5, 1, 250])])
    targets = targets[torch.randperm(targets.numel(), generator=g)]
    for frac in (0.1, 0.25, 0.5, 0.9):
        idx = stratified_subset(targets, frac, seed=7)
        assert idx.dtype == torch.int64
        assert torch.equal(idx, torch.sort(idx).values) and idx.unique().numel() == idx.numel()
        for c, n in enumerate([100, 37, 5, 1, 250]):
            expected = max(1, int(np.floor(frac * n + 0.5)))
            assert int((targets[idx] == c).sum()) == expected
        assert torch.equal(idx, stratified_subset(targets, frac, seed=7))
        assert not torch.equal(idx, stratified_subset(targets, frac, seed=8))
    assert torch.equal(stratified_subset(targets, 1.0, 5), torch.arange(targets.numel()))


# ------------------------------------------------------------------------------- Fashion-MNIST


def _pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Exact mean/std of uint8 pixels scaled to [0, 1], from the value histogram."""
    counts = torch.bincount(images.reshape(-1), minlength=256).double()
    v = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * v).sum() / counts.sum()
    return mean.item(), ((counts * (v - mean) ** 2).sum() / counts.sum()).sqrt().item()


def _read_idx_gz(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


@pytest.mark.skipif(
    not all(os.path.isfile(f"{FMNIST_SYSTEM_DIR}/{n}.gz") for n in FMNIST_NAMES),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_fashion_mnist_from_debian_package_without_network(tmp_path, no_network):
    d = build_datasets("fashion_mnist", tmp_path)
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(FMNIST_NAMES)  # no temp files left behind
    assert d.train_images.shape == (60000, 1, 28, 28) and d.test_images.shape == (10000, 1, 28, 28)
    assert d.train_targets.shape == (60000,) and d.test_targets.shape == (10000,)
    assert d.spec.num_classes == 10 and d.spec.image_size == 28 and d.spec.in_channels == 1
    # compare with an independent parse of the Debian files
    labels = _read_idx_gz(f"{FMNIST_SYSTEM_DIR}/t10k-labels-idx1-ubyte.gz", 8)
    images = _read_idx_gz(f"{FMNIST_SYSTEM_DIR}/t10k-images-idx3-ubyte.gz", 16)
    assert np.array_equal(d.test_targets.numpy(), labels)
    assert np.array_equal(d.test_images.numpy().reshape(-1), images)
    assert np.bincount(d.train_targets.numpy()).tolist() == [6000] * 10
    mean, std = _pixel_stats(d.train_images)
    assert d.spec.mean[0] == pytest.approx(mean, abs=1e-4)
    assert d.spec.std[0] == pytest.approx(std, abs=1e-4)
    # second build reuses the decompressed files
    mtimes = {n: os.stat(raw / n).st_mtime_ns for n in FMNIST_NAMES}
    build_datasets("fashion_mnist", tmp_path)
    assert mtimes == {n: os.stat(raw / n).st_mtime_ns for n in FMNIST_NAMES}


def _write_idx_gz(path, magic: int, dims: tuple[int, ...], payload: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header + payload.astype(np.uint8).tobytes())


def test_fashion_mnist_from_a_package_layout_dir(tmp_path, no_network):
    """The Debian-package path on files in the package's layout (idx files, re-compressed)."""
    system = tmp_path / "system"
    system.mkdir()
    rng = np.random.default_rng(0)
    test_labels = rng.integers(0, 10, 10000)
    test_images = np.zeros((10000, 28, 28), np.uint8)
    test_images[:, 3, 5] = test_labels * 20
    _write_idx_gz(system / "t10k-labels-idx1-ubyte.gz", 0x801, (10000,), test_labels)
    _write_idx_gz(system / "t10k-images-idx3-ubyte.gz", 0x803, (10000, 28, 28), test_images)
    _write_idx_gz(system / "train-labels-idx1-ubyte.gz", 0x801, (60000,), np.arange(60000) % 10)
    _write_idx_gz(
        system / "train-images-idx3-ubyte.gz", 0x803, (60000, 28, 28), np.zeros(60000 * 784)
    )
    d = build_datasets("fashion_mnist", tmp_path / "data", download=False, system_dir=str(system))
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(FMNIST_NAMES)  # no temp files left behind
    assert np.array_equal(d.test_targets.numpy(), test_labels)
    assert np.array_equal(d.test_images[:, 0].numpy(), test_images)
    assert d.train_images.shape == (60000, 1, 28, 28)
    # a package file that decompresses to the wrong size is reported, and nothing is installed
    os.unlink(raw / "t10k-labels-idx1-ubyte")
    _write_idx_gz(system / "t10k-labels-idx1-ubyte.gz", 0x801, (9999,), test_labels[:9999])
    with pytest.raises(DatasetError, match="expected 10008; reinstall") as info:
        build_datasets("fashion_mnist", tmp_path / "data", download=False, system_dir=str(system))
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(raw)) == sorted(set(FMNIST_NAMES) - {"t10k-labels-idx1-ubyte"})


def test_fashion_mnist_missing_gives_one_line_error(tmp_path, no_network):
    empty = tmp_path / "no-system-files"
    empty.mkdir()
    for download in (True, False):
        with pytest.raises(DatasetError) as info:
            build_datasets(
                "fashion_mnist", tmp_path / "data", download=download, system_dir=str(empty)
            )
        msg = str(info.value)
        assert "\n" not in msg and "dataset-fashion-mnist" in msg
        assert str(tmp_path / "data" / "FashionMNIST" / "raw") in msg
        assert "train-images-idx3-ubyte.gz" in msg


# ------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("which", ["cifar100", "cifar10"])
def test_fake_cifar_loads_through_torchvision(tmp_path, which, no_network):
    md5s = write_fake_cifar(tmp_path, which, n_train=250, n_test=60)
    folder = "cifar-100-python" if which == "cifar100" else "cifar-10-batches-py"
    names = (
        ["train", "test", "meta"]
        if which == "cifar100"
        else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )
    assert sorted(md5s) == sorted(f"{folder}/{n}" for n in names)
    # users keep torchvision's verification: the fake files are rejected unpatched
    with pytest.raises(DatasetError, match="MD5"):
        build_datasets(which, tmp_path, download=False)
    originals = (CIFAR10.train_list, CIFAR100.test_list, dict(CIFAR100.meta))
    with patched_cifar_checksums(md5s):
        d = build_datasets(which, tmp_path, download=True)
    assert (CIFAR10.train_list, CIFAR100.test_list, CIFAR100.meta) == originals
    n_classes = 100 if which == "cifar100" else 10
    assert d.spec.num_classes == n_classes and d.spec.augment == "crop_flip"
    assert d.spec.crop_padding == 4 and len(d.classes) == n_classes
    assert d.train_images.shape == (250, 3, 32, 32) and d.test_images.shape == (60, 3, 32, 32)
    # independent read of the pickles
    train_files = ["train"] if which == "cifar100" else [f"data_batch_{i}" for i in range(1, 6)]
    data, labels = [], []
    for name in train_files:
        with open(tmp_path / folder / name, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        assert {"data", "filenames", "batch_label"} <= set(entry)
        data.append(entry["data"])
        labels += entry["fine_labels"] if which == "cifar100" else entry["labels"]
        if which == "cifar100":
            assert len(entry["coarse_labels"]) == len(entry["fine_labels"])
    ref = np.concatenate(data).reshape(-1, 3, 32, 32)
    assert np.array_equal(d.train_images.numpy(), ref)
    assert d.train_targets.tolist() == labels
    with open(tmp_path / folder / ("meta" if which == "cifar100" else "batches.meta"), "rb") as fh:
        meta = pickle.load(fh, encoding="latin1")
    key = "fine_label_names" if which == "cifar100" else "label_names"
    assert d.classes == meta[key]
    if which == "cifar100":
        assert len(meta["coarse_label_names"]) == 20


@pytest.mark.parametrize(
    "which,archive,folder",
    [
        ("cifar100", "cifar-100-python.tar.gz", "cifar-100-python"),
        ("cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py"),
    ],
)
def test_cifar_offline_error_names_file_url_and_dir(tmp_path, no_network, which, archive, folder):
    root = tmp_path / "data"
    for download in (True, False):
        with pytest.raises(DatasetError) as info:
            build_datasets(which, root, download=download)
        msg = str(info.value)
        assert "\n" not in msg
        assert archive in msg and f"https://www.cs.toronto.edu/~kriz/{archive}" in msg
        assert str(root / folder) in msg
        assert info.value.__cause__ is None and info.value.__suppress_context__


# ----------------------------------------------------------------------------- augmentation


def _spec(augment: str, pad: int, channels: int = 2, size: int = 5) -> DataSpec:
    mean = tuple(0.3 + 0.1 * i for i in range(channels))
    std = tuple(0.2 + 0.05 * i for i in range(channels))
    return DataSpec("t", 3, channels, size, mean, std, augment, pad)


def _distinct_image(channels: int = 2, size: int = 5) -> torch.Tensor:
    return (torch.arange(channels * size * size) * 3 + 1).to(torch.uint8).view(channels, size, size)


def test_normalize_batch_matches_torchvision_eval_pipeline():
    spec = _spec("crop_flip", 1)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (4, 2, 5, 5), generator=g, dtype=torch.uint8)
    ref = (imgs.double() / 255 - torch.tensor(spec.mean, dtype=torch.float64).view(1, -1, 1, 1)) / (
        torch.tensor(spec.std, dtype=torch.float64).view(1, -1, 1, 1)
    )
    out = normalize_batch(imgs, spec)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, atol=1e-5)
    tv = per_sample_transform(spec, train=False)
    assert torch.allclose(torch.stack([tv(im) for im in imgs]), out, atol=1e-6)
    assert torch.equal(augment_batch(imgs, _spec("none", 1), g), normalize_batch(imgs, spec))


@pytest.mark.parametrize("augment,pad", [("crop_flip", 1), ("crop", 1), ("crop_flip", 2)])
def test_augment_batch_outputs_are_shifted_or_flipped_crops(augment, pad):
    spec = _spec(augment, pad)
    img = _distinct_image()
    cands = normalize_batch(_candidates(img, pad, augment == "crop_flip"), spec)
    n = 600
    batch = img.expand(n, -1, -1, -1).contiguous()
    out = augment_batch(batch, spec, torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.dtype == torch.float32
    hit = _match(out, cands)
    assert (hit >= 0).all(), "every output is a (flipped) shift of the padded image"
    assert set(hit.tolist()) == set(range(len(cands))), "all shifts/flips occur"
    # the torchvision per-sample pipeline has the same set of outputs
    tv = per_sample_transform(spec, train=True)
    torch.manual_seed(0)
    tv_out = torch.stack([tv(img) for _ in range(n)])
    tv_hit = _match(tv_out, cands)
    assert (tv_hit >= 0).all() and set(tv_hit.tolist()) == set(hit.tolist())


def test_augment_batch_crop_equals_shift_of_original_per_sample():
    spec = _spec("crop_flip", 2, channels=3, size=6)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(1, 256, (64, 3, 6, 6), generator=g, dtype=torch.uint8)
    out = augment_batch(imgs, spec, torch.Generator().manual_seed(5))
    for i in range(imgs.shape[0]):  # test-only loop: each sample is one of its own candidates
        cands = normalize_batch(_candidates(imgs[i], 2, True), spec)
        assert (_match(out[i : i + 1], cands) >= 0).all()


def test_augment_batch_is_deterministic_and_generator_driven():
    spec = _spec("crop_flip", 2, channels=3, size=8)
    imgs = torch.randint(0, 256, (32, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )
    a = augment_batch(imgs, spec, torch.Generator().manual_seed(11))
    b = augment_batch(imgs, spec, torch.Generator().manual_seed(11))
    c = augment_batch(imgs, spec, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    augment_batch(imgs, spec, seeded_generator("cpu", 1, 2, 3))
    assert torch.equal(state, torch.get_rng_state()), "the global RNG is not used"
    with pytest.raises(ValueError, match="loader=workers"):
        augment_batch(imgs, DataSpec("i", 3, 3, 8, (0.5,) * 3, (0.2,) * 3, "imagenet", 0), None)


# -------------------------------------------------------------------- per-sample datasets


def test_indexed_dataset_is_a_pure_function_of_seed_epoch_index():
    d = build_datasets("synthetic", "unused", train_size=40, test_size=8, image_size=8)
    ds = IndexedDataset(d.train_images, d.train_targets, d.spec, seed=3)
    assert len(ds) == 40
    x, y, i = ds[7]
    assert x.dtype == torch.float32 and x.shape == (3, 8, 8) and y == int(d.train_targets[7])
    assert i == 7 and isinstance(y, int)
    forward = [ds[j][0] for j in range(40)]
    state = torch.get_rng_state()
    backward = [ds[j][0] for j in reversed(range(40))][::-1]
    assert torch.equal(state, torch.get_rng_state()), "caller's RNG untouched"
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    ds.set_epoch(1)
    assert ds.epoch == 1
    epoch1 = [ds[j][0] for j in range(40)]
    assert any(not torch.equal(a, b) for a, b in zip(forward, epoch1))
    other = IndexedDataset(d.train_images, d.train_targets, d.spec, seed=4)
    assert any(not torch.equal(a, other[j][0]) for j, a in enumerate(forward))
    # every augmented sample is a valid crop/flip of its source image
    cands = normalize_batch(_candidates(d.train_images[7], d.spec.crop_padding, True), d.spec)
    assert (_match(ds[7][0][None], cands) >= 0).all()
    # un-augmented view and the eval dataset
    plain = IndexedDataset(d.train_images, d.train_targets, d.spec, train=False)
    assert torch.allclose(plain[5][0], normalize_batch(d.train_images[5:6], d.spec)[0])
    ev = EvalDataset(d.test_images, d.test_targets, d.spec)
    xe, ye = ev[2]
    assert (
        torch.allclose(xe, normalize_batch(d.test_images[2:3], d.spec)[0])
        and ye == d.test_targets[2]
    )


def test_indexed_dataset_independent_of_worker_count():
    d = build_datasets("synthetic", "unused", train_size=24, test_size=4, image_size=8)
    ds = IndexedDataset(d.train_source, d.train_targets, d.spec, seed=9)
    batches = [[5, 1, 17], [0, 23, 2, 9], [11]]

    def run(workers: int, epochs: list[int]) -> list[torch.Tensor]:
        dl = torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=workers, persistent_workers=workers > 0
        )
        out = []
        for e in epochs:
            ds.set_epoch(e)  # reaches persistent workers through shared memory
            out += [torch.cat([x.flatten(1), idx[:, None].float()], 1) for x, _, idx in dl]
        return out

    ref = run(0, [0, 1])
    got = run(2, [0, 1])
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert not torch.equal(ref[0], ref[3])


# ------------------------------------------------------------------------- folder datasets


def test_tiny_imagenet_fixture_real_layout(tmp_path):
    base = write_fake_tiny_imagenet(tmp_path, n_classes=3, n_per_class=4, n_val_per_class=2)
    d = build_datasets("tiny_imagenet", tmp_path)
    assert d.spec.num_classes == 3 and d.spec.image_size == 64 and d.spec.augment == "crop_flip"
    assert d.train_images is None and d.test_images is None
    assert len(d.train_folder) == 12 and len(d.test_folder) == 6
    assert d.test_folder.class_to_idx == d.train_folder.class_to_idx
    wnids = sorted(open(os.path.join(base, "wnids.txt")).read().split())
    assert d.classes == wnids
    # labels follow val_annotations.txt
    ann = dict(
        line.split("\t")[:2] for line in open(os.path.join(base, "val", "val_annotations.txt"))
    )
    for path, y in d.test_folder.samples:
        assert wnids[y] == ann[os.path.basename(path)]
    assert d.test_targets.tolist() == [y for _, y in d.test_folder.samples]
    x, y, i = IndexedDataset(d.train_source, d.train_targets, d.spec, seed=0)[5]
    assert x.shape == (3, 64, 64) and i == 5 and y == d.train_targets[5]
    xe, _ = EvalDataset(d.test_source, d.test_targets, d.spec)[0]
    assert xe.shape == (3, 64, 64)
    # fraction subsets the folder samples consistently with the targets
    sub = build_datasets("tiny_imagenet", tmp_path, fraction=0.5, seed=1)
    assert len(sub.train_folder) == 6 == sub.num_train
    assert sub.train_targets.tolist() == [y for _, y in sub.train_folder.samples]


def test_tiny_imagenet_reorganised_val_and_missing(tmp_path):
    base = write_fake_tiny_imagenet(tmp_path, n_classes=2, n_per_class=2, n_val_per_class=1)
    val = os.path.join(base, "val")
    for line in open(os.path.join(val, "val_annotations.txt")).read().splitlines():
        name, wnid = line.split("\t")[:2]
        os.makedirs(os.path.join(val, wnid), exist_ok=True)
        os.replace(os.path.join(val, "images", name), os.path.join(val, wnid, name))
    os.rmdir(os.path.join(val, "images"))
    d = build_datasets("tiny_imagenet", tmp_path)
    assert len(d.test_folder) == 2
    for path, y in d.test_folder.samples:
        assert os.path.basename(os.path.dirname(path)) == d.classes[y]
    with pytest.raises(DatasetError, match="tiny-imagenet-200/train/<wnid>/images") as info:
        build_datasets("tiny_imagenet", tmp_path / "nothing")
    assert "\n" not in str(info.value)


def test_imagenet_imagefolder_fixture(tmp_path):
    names = write_fake_imagefolder(tmp_path / "imagenet" / "train", n_classes=3, n_per_class=2)
    write_fake_imagefolder(tmp_path / "imagenet" / "val", class_names=names[:2], n_per_class=1)
    d = build_datasets("imagenet", tmp_path)
    assert d.spec.num_classes == 3 and d.spec.image_size == 224 and d.spec.augment == "imagenet"
    assert d.test_folder.class_to_idx == d.train_folder.class_to_idx  # val lacks a class
    assert d.test_targets.tolist() == [0, 1]
    assert IndexedDataset(d.train_source, d.train_targets, d.spec)[0][0].shape == (3, 224, 224)
    assert EvalDataset(d.test_source, d.test_targets, d.spec)[1][0].shape == (3, 224, 224)
    with pytest.raises(DatasetError, match=str(tmp_path / "nothing" / "imagenet" / "train")):
        build_datasets("imagenet", tmp_path / "nothing")


# ------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_configurable_and_learnable():
    a = build_datasets("synthetic", "unused", seed=0)
    b = build_datasets("synthetic", "unused", seed=99)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(
        a.test_targets, b.test_targets
    )
    assert a.train_images.shape == (512, 3, 32, 32) and a.test_images.shape == (256, 3, 32, 32)
    assert (
        a.spec.num_classes == 10 and torch.bincount(a.train_targets).tolist() == [52] * 2 + [51] * 8
    )
    x = a.train_images.double() / 255
    assert torch.allclose(
        torch.tensor(a.spec.mean, dtype=torch.float64), x.mean((0, 2, 3)), atol=1e-5
    )
    c = build_datasets(
        "synthetic", "unused", num_classes=4, image_size=12, channels=1, train_size=40, test_size=20
    )
    assert c.train_images.shape == (40, 1, 12, 12) and c.test_images.shape == (20, 1, 12, 12)
    assert c.spec.num_classes == 4 and c.spec.in_channels == 1 and len(c.spec.mean) == 1
    # the test set does not depend on train_size
    d = build_datasets("synthetic", "unused", train_size=100)
    assert torch.equal(d.test_images, a.test_images)
    # learnable: nearest class mean (fitted on train) classifies the test set well
    means = torch.stack([x[a.train_targets == k].mean(0) for k in range(10)]).flatten(1)
    xt = (a.test_images.double() / 255).flatten(1)
    pred = torch.cdist(xt, means).argmin(1)
    assert (pred == a.test_targets).double().mean() > 0.9
    # flips preserve the class signal (the patterns are mirror-symmetric)
    pred_f = torch.cdist((a.test_images.flip(-1).double() / 255).flatten(1), means).argmin(1)
    assert (pred_f == a.test_targets).double().mean() > 0.9
    with pytest.raises(DatasetError, match="dataset.image_size"):
        build_datasets("synthetic", "unused", image_size=0)
