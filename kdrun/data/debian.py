"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (no network needed).

Contract
--------
``install_system_fashion_mnist(raw_dir, system_dir)`` makes ``raw_dir`` hold the four
uncompressed idx files torchvision's ``FashionMNIST`` reads (``train-images-idx3-ubyte`` ...),
decompressing the package's ``.gz`` files from ``system_dir`` (default
:data:`FASHION_MNIST_SYSTEM_DIR`). Files already present with the right size are left alone; each
file is written atomically and its size checked. Returns True when all four files are in place,
False when the package is not installed; a broken package raises :class:`DatasetError`.
The package's ``.gz`` files are re-compressed, so torchvision's archive MD5s cannot apply to them:
the uncompressed sizes are checked instead.
"""

from __future__ import annotations

import gzip
import os
import shutil

from kdrun.atomic import atomic_write
from kdrun.errors import DatasetError, one_line

__all__ = ["FASHION_MNIST_FILES", "FASHION_MNIST_SYSTEM_DIR", "install_system_fashion_mnist"]

#: Where Debian's ``dataset-fashion-mnist`` package installs its files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

#: Uncompressed file name -> expected size in bytes (idx header + payload).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}


def _decompress(src: str, dest: str, expected_size: int) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as out, gzip.open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
        size = os.path.getsize(tmp)
        if size != expected_size:
            raise DatasetError(
                f"{src} decompresses to {size} bytes, expected {expected_size}; "
                f"reinstall the dataset-fashion-mnist package"
            )

    atomic_write(dest, write)


def install_system_fashion_mnist(raw_dir: str, system_dir: str = FASHION_MNIST_SYSTEM_DIR) -> bool:
    """Decompress the package's files into ``raw_dir``; True when all four files are there."""

    def ok(name: str) -> bool:
        path = os.path.join(raw_dir, name)
        return os.path.isfile(path) and os.path.getsize(path) == FASHION_MNIST_FILES[name]

    missing = [n for n in FASHION_MNIST_FILES if not ok(n)]
    if not missing:
        return True
    sources = {n: os.path.join(system_dir, n + ".gz") for n in missing}
    if not all(os.path.isfile(p) for p in sources.values()):
        return False
    try:
        os.makedirs(raw_dir, exist_ok=True)
        for name, src in sources.items():
            _decompress(src, os.path.join(raw_dir, name), FASHION_MNIST_FILES[name])
    except (OSError, EOFError) as exc:
        raise DatasetError(
            f"could not decompress Fashion-MNIST from {system_dir} into {raw_dir} ({one_line(exc)})"
        ) from None
    return all(ok(n) for n in FASHION_MNIST_FILES)
