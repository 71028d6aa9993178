"""Seeds that are pure functions of integer keys.

``item_seed(*keys)`` mixes any number of integers (splitmix64) into a non-negative 63-bit seed. It
is used as ``item_seed(seed, epoch, index)`` for per-sample augmentation, ``(seed, epoch)`` for the
device loader's per-epoch tables, and ``(data_seed, stream)`` for synthetic data, so every random
draw can be reproduced from the keys alone (independent of workers, access order or resuming).
"""

from __future__ import annotations

__all__ = ["item_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_seed(*keys: int) -> int:
    """A well-mixed non-negative 63-bit seed that is a pure function of the integer ``keys``."""
    h = 0x243F6A8885A308D3
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1
