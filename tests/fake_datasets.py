"""Small fake datasets in the exact real on-disk formats, for the tests.

Contract
--------
* ``write_fake_cifar(root, which='cifar100'|'cifar10', n_train=..., n_test=..., seed=0)`` writes
  ``<root>/cifar-100-python/{train,test,meta}`` or
  ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` as pickles with the real
  keys (``data`` uint8 ``[n, 3072]`` in CHW order, ``fine_labels``/``coarse_labels`` or
  ``labels``, ``filenames``, ``batch_label``; meta ``fine_label_names``/``coarse_label_names`` or
  ``label_names``/``num_cases_per_batch``/``num_vis``) and returns ``{"<base_folder>/<file>":
  md5}`` of every file written.
* ``patched_cifar_checksums(md5s)`` — context manager that temporarily replaces the expected MD5s
  in torchvision's ``CIFAR10``/``CIFAR100`` ``train_list``, ``test_list`` and ``meta`` by ``md5s``
  (as returned above). This is the explicit *test* path: torchvision still verifies every file,
  against the fixture's checksums; the user path is never changed.
* ``write_fake_tiny_imagenet(root, n_classes, n_per_class, n_val_per_class=2, ...)`` writes the
  real Tiny ImageNet layout under ``<root>/tiny-imagenet-200`` (``wnids.txt``, ``words.txt``,
  ``train/<wnid>/images/<wnid>_<i>.JPEG`` + ``<wnid>_boxes.txt``, ``val/images/val_<i>.JPEG`` +
  ``val/val_annotations.txt``, ``test/images/test_<i>.JPEG``) and returns that directory.
* ``write_fake_imagefolder(path, n_classes, n_per_class, ...)`` writes ``<path>/<class>/*.JPEG``
  and returns the class names.
Images are deterministic (``seed``) with a class-dependent colour so the classes are learnable.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "CIFAR100_COARSE_LABEL_NAMES",
    "CIFAR100_FINE_LABEL_NAMES",
    "CIFAR10_LABEL_NAMES",
    "patched_cifar_checksums",
    "write_fake_cifar",
    "write_fake_imagefolder",
    "write_fake_tiny_imagenet",
]

CIFAR10_LABEL_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

CIFAR100_FINE_LABEL_NAMES = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange
orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm
""".split()

CIFAR100_COARSE_LABEL_NAMES = """
aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices
household_furniture insects large_carnivores large_man-made_outdoor_things
large_natural_outdoor_scenes large_omnivores_and_herbivores medium_mammals
non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2
""".split()


def _md5(path: str) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dump(path: str, obj: object) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)  # the real files are Python-2 pickles (protocol 2)


def _balanced_labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def _cifar_images(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, 3072] (channel-major rows like the real files) with a class-dependent tint."""
    colours = np.random.default_rng(12345).integers(40, 216, size=(k, 3, 1, 1))
    noise = rng.integers(-40, 41, size=(len(labels), 3, 32, 32))
    imgs = np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)
    return imgs.reshape(len(labels), 3 * 32 * 32)


def write_fake_cifar(
    root: str | os.PathLike[str],
    which: str = "cifar100",
    n_train: int = 500,
    n_test: int = 100,
    seed: int = 0,
) -> dict[str, str]:
    """Write a small CIFAR-10/100 in the real pickled format; return ``{relative path: md5}``.

    CIFAR-10 training samples are spread over the five ``data_batch_*`` files (like the real
    10,000-image batches, here ``n_train // 5`` each, the last one taking the remainder).
    """
    if which not in ("cifar10", "cifar100"):
        raise ValueError("which must be 'cifar10' or 'cifar100'")
    rng = np.random.default_rng(seed)
    root = os.fspath(root)
    written: dict[str, str] = {}

    def put(folder: str, name: str, obj: object) -> None:
        path = os.path.join(root, folder, name)
        _dump(path, obj)
        written[f"{folder}/{name}"] = _md5(path)

    if which == "cifar100":
        folder = "cifar-100-python"
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for split, n, label in (("train", n_train, "training"), ("test", n_test, "testing")):
            fine = _balanced_labels(n, 100, rng)
            put(
                folder,
                split,
                {
                    "filenames": [f"fake_{split}_{i:06d}.png" for i in range(n)],
                    "batch_label": f"{label} batch 1 of 1",
                    "fine_labels": fine.tolist(),
                    "coarse_labels": (fine // 5).tolist(),
                    "data": _cifar_images(fine, 100, rng),
                },
            )
        put(
            folder,
            "meta",
            {
                "fine_label_names": list(CIFAR100_FINE_LABEL_NAMES),
                "coarse_label_names": list(CIFAR100_COARSE_LABEL_NAMES),
            },
        )
        return written

    folder = "cifar-10-batches-py"
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    labels = _balanced_labels(n_train, 10, rng)
    data = _cifar_images(labels, 10, rng)
    per = n_train // 5
    for b in range(5):
        lo, hi = b * per, (n_train if b == 4 else (b + 1) * per)
        put(
            folder,
            f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": labels[lo:hi].tolist(),
                "data": data[lo:hi],
                "filenames": [f"fake_train_{i:06d}.png" for i in range(lo, hi)],
            },
        )
    test_labels = _balanced_labels(n_test, 10, rng)
    put(
        folder,
        "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels.tolist(),
            "data": _cifar_images(test_labels, 10, rng),
            "filenames": [f"fake_test_{i:06d}.png" for i in range(n_test)],
        },
    )
    put(
        folder,
        "batches.meta",
        {"num_cases_per_batch": per, "label_names": list(CIFAR10_LABEL_NAMES), "num_vis": 3072},
    )
    return written


@contextlib.contextmanager
def patched_cifar_checksums(md5s: Mapping[str, str]) -> Iterator[None]:
    """Temporarily make torchvision's CIFAR classes expect the checksums in ``md5s``.

    ``md5s`` maps ``"<base_folder>/<file>"`` (or a bare file name) to an MD5, as returned by
    :func:`write_fake_cifar`. Entries of ``train_list``/``test_list``/``meta`` not in ``md5s`` keep
    torchvision's real checksum. Test use only: the patch is process-wide while active.
    """
    from unittest import mock

    from torchvision.datasets import CIFAR10, CIFAR100

    def lookup(cls: type, name: str, default: str) -> str:
        return md5s.get(f"{cls.base_folder}/{name}", md5s.get(name, default))

    with contextlib.ExitStack() as stack:
        for cls in (CIFAR10, CIFAR100):
            train = [
                [n, lookup(cls, n, m)] for n, m in cls.__dict__.get("train_list", cls.train_list)
            ]
            test = [[n, lookup(cls, n, m)] for n, m in cls.__dict__.get("test_list", cls.test_list)]
            meta = dict(cls.meta)
            meta["md5"] = lookup(cls, meta["filename"], meta["md5"])
            stack.enter_context(mock.patch.object(cls, "train_list", train))
            stack.enter_context(mock.patch.object(cls, "test_list", test))
            stack.enter_context(mock.patch.object(cls, "meta", meta))
        yield


def _save_jpeg(path: str, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path, format="JPEG", quality=90)


def _class_image(colour: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.integers(-30, 31, size=(size, size, 3))
    return np.clip(colour[None, None, :] + noise, 0, 255).astype(np.uint8)


def _wnids(n: int) -> list[str]:
    return [f"n{1443537 + 1000 * i:08d}" for i in range(n)]


def write_fake_tiny_imagenet(
    root: str | os.PathLike[str],
    n_classes: int = 3,
    n_per_class: int = 4,
    n_val_per_class: int = 2,
    n_test: int = 2,
    image_size: int = 64,
    seed: int = 0,
) -> str:
    """Write a small Tiny ImageNet in its real layout; return ``<root>/tiny-imagenet-200``."""
    rng = np.random.default_rng(seed)
    base = os.path.join(os.fspath(root), "tiny-imagenet-200")
    wnids = _wnids(n_classes)
    colours = rng.integers(40, 216, size=(n_classes, 3))
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "wnids.txt"), "w", encoding="utf-8") as fh:
        fh.write("".join(w + "\n" for w in wnids))
    with open(os.path.join(base, "words.txt"), "w", encoding="utf-8") as fh:
        fh.write("".join(f"{w}\tfake class {i}\n" for i, w in enumerate(wnids)))
    box = f"0\t0\t{image_size - 1}\t{image_size - 1}"
    for c, w in enumerate(wnids):
        img_dir = os.path.join(base, "train", w, "images")
        os.makedirs(img_dir, exist_ok=True)
        lines = []
        for i in range(n_per_class):
            name = f"{w}_{i}.JPEG"
            _save_jpeg(os.path.join(img_dir, name), _class_image(colours[c], image_size, rng))
            lines.append(f"{name}\t{box}\n")
        with open(os.path.join(base, "train", w, f"{w}_boxes.txt"), "w", encoding="utf-8") as fh:
            fh.writelines(lines)
    val_dir = os.path.join(base, "val", "images")
    os.makedirs(val_dir, exist_ok=True)
    order = rng.permutation(np.repeat(np.arange(n_classes), n_val_per_class))
    with open(os.path.join(base, "val", "val_annotations.txt"), "w", encoding="utf-8") as fh:
        for i, c in enumerate(order):
            name = f"val_{i}.JPEG"
            _save_jpeg(os.path.join(val_dir, name), _class_image(colours[c], image_size, rng))
            fh.write(f"{name}\t{wnids[c]}\t{box}\n")
    test_dir = os.path.join(base, "test", "images")
    os.makedirs(test_dir, exist_ok=True)
    for i in range(n_test):
        c = int(rng.integers(n_classes))
        _save_jpeg(
            os.path.join(test_dir, f"test_{i}.JPEG"), _class_image(colours[c], image_size, rng)
        )
    return base


def write_fake_imagefolder(
    path: str | os.PathLike[str],
    n_classes: int = 3,
    n_per_class: int = 2,
    image_size: int = 32,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> list[str]:
    """Write ``<path>/<class>/<class>_<i>.JPEG`` (ImageFolder layout); return the class names.

    The colour of class ``c`` depends only on its position ``c`` (``seed`` only changes the
    noise), so a train and a val folder written with the same class names match.
    """
    names = list(class_names) if class_names is not None else _wnids(n_classes)
    colours = np.random.default_rng(4321).integers(40, 216, size=(len(names), 3))
    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        d = os.path.join(os.fspath(path), name)
        os.makedirs(d, exist_ok=True)
        for i in range(n_per_class):
            _save_jpeg(
                os.path.join(d, f"{name}_{i}.JPEG"), _class_image(colours[c], image_size, rng)
            )
    return names
