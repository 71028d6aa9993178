"""Augmentation for kdrun: batched on-device ops and the equivalent per-sample pipelines.

Contract
--------
* ``normalize_batch(images_uint8 [B, C, H, W], spec) -> float32`` — ``x / 255``, then
  ``(x - mean) / std`` per channel, on ``images.device`` (same arithmetic as torchvision's
  ``ToDtype(float32, scale=True)`` + ``Normalize``).
* ``augment_batch(images_uint8, spec, generator) -> float32`` — the training augmentation of
  ``spec.augment`` for in-memory datasets, fully vectorised (no per-sample Python loop, no host
  synchronisation): ``'crop'`` = random ``H x W`` crop of the image zero-padded by
  ``spec.crop_padding`` (offsets uniform in ``[0, 2 * padding]``), ``'crop_flip'`` = the same plus
  horizontal flip with probability 1/2, ``'none'`` = normalisation only. ``'imagenet'`` (random
  resized crop of variable-size images) is per-sample only (``dataset.loader=workers``) and raises
  ``ValueError`` here. All randomness comes from ``generator``: pass a generator on
  ``images.device`` (recommended; no transfers); a CPU generator with CUDA images also works (the
  ``3 * B`` random numbers are drawn on the CPU and copied). Streams of CPU and CUDA generators
  differ, so the same seed gives different (equally valid) crops on CPU and GPU.
* ``per_sample_transform(spec, train)`` — the torchvision ``transforms.v2`` pipeline used by
  :class:`kdrun.data.views.IndexedDataset` / ``EvalDataset``; takes a PIL image or a uint8
  ``[C, H, W]`` tensor and returns a float32 normalised plain tensor. For ``'crop'`` /
  ``'crop_flip'`` its set of possible outputs equals that of :func:`augment_batch`
  (``RandomCrop(size, padding)`` pads with zeros, then ``RandomHorizontalFlip``).
* ``seeded_generator(device, *keys)`` — a ``torch.Generator`` on ``device`` seeded with
  ``item_seed(*keys)`` (e.g. ``(seed, epoch, batch)`` for resumable device-side augmentation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kdrun.data.seeding import item_seed
from kdrun.data.spec import DataSpec

__all__ = [
    "augment_batch",
    "crop_flip",
    "draw_crop_flip",
    "normalize_batch",
    "per_sample_transform",
    "seeded_generator",
]


def seeded_generator(device: torch.device | str, *keys: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``item_seed(*keys)``."""
    return torch.Generator(device=device).manual_seed(item_seed(*keys))


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError("images must be a uint8 tensor [B, C, H, W]")


def normalize_batch(images: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 normalised with ``spec.mean`` / ``spec.std``."""
    _check_images(images)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    x = images.to(torch.float32).mul_(1.0 / 255)
    return x.sub_(mean).div_(std)


def augment_batch(images: torch.Tensor, spec: DataSpec, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and optional horizontal flip of a uint8 batch, then normalise.

    One gather does crop and flip: the batch is padded once, and output pixel ``(i, j)`` of sample
    ``b`` reads padded pixel ``(oy[b] + i, ox[b] + j)``, or ``(oy[b] + i, ox[b] + W - 1 - j)`` when
    sample ``b`` is flipped (column index chosen with ``torch.where``); the flat indices go to a
    single ``index_select`` (about 2 ms for a 128x3x32x32 batch on one CPU thread).
    """
    _check_images(images)
    mode = spec.augment
    if mode == "none":
        return normalize_batch(images, spec)
    if mode not in ("crop", "crop_flip"):
        raise ValueError(
            f"augment={mode!r} has no batched on-device version; use dataset.loader=workers"
        )
    offsets, flip = draw_crop_flip(images.shape[0], spec, generator)
    return crop_flip(images, spec, offsets.to(images.device), flip.to(images.device))


def draw_crop_flip(
    n: int, spec: DataSpec, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop offsets ``[2, n]`` (int64, in ``[0, 2 * padding]``) and flips ``[n]`` (bool)
    for ``n`` samples, drawn on the generator's device."""
    p = int(spec.crop_padding)
    gdev = generator.device
    offsets = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=gdev)
    if spec.augment == "crop_flip":
        flip = torch.rand(n, generator=generator, device=gdev) < 0.5
    else:
        flip = torch.zeros(n, dtype=torch.bool, device=gdev)
    return offsets, flip


def crop_flip(
    images: torch.Tensor, spec: DataSpec, offsets: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Crop every image of a uint8 batch at the given offsets (``[2, B]``, into the zero-padded
    image) and mirror where ``flip`` (``[B]``) is set, then normalise. Deterministic: the
    randomness is in the arguments (see :func:`draw_crop_flip`)."""
    _check_images(images)
    if spec.augment == "none":
        return normalize_batch(images, spec)
    b, c, h, w = images.shape
    p = int(spec.crop_padding)
    device = images.device
    padded = F.pad(images, (p, p, p, p)) if p > 0 else images
    hp, wp = h + 2 * p, w + 2 * p
    # int32 flat indices are ~2x faster to build and gather on CPU; int64 only when needed
    itype = torch.int32 if padded.numel() < 2**31 else torch.int64
    offsets = offsets.to(itype)
    rows = offsets[0].unsqueeze(1) + torch.arange(h, device=device, dtype=itype)  # [B, H]
    cols = torch.arange(w, device=device, dtype=itype).expand(b, w)
    cols = offsets[1].unsqueeze(1) + torch.where(flip.unsqueeze(1), w - 1 - cols, cols)  # [B, W]
    plane = torch.arange(b * c, device=device, dtype=itype).view(b, c, 1, 1) * (hp * wp)
    flat = plane + (rows * wp).view(b, 1, h, 1) + cols.view(b, 1, 1, w)  # [B, C, H, W]
    out = padded.reshape(-1).index_select(0, flat.reshape(-1)).view(b, c, h, w)
    return normalize_batch(out, spec)


def per_sample_transform(spec: DataSpec, train: bool) -> Callable[[Any], torch.Tensor]:
    """torchvision v2 pipeline for one image (PIL or uint8 ``[C, H, W]`` tensor).

    train: ``'crop'`` -> RandomCrop(size, padding); ``'crop_flip'`` -> + RandomHorizontalFlip;
    ``'imagenet'`` -> RandomResizedCrop(size) + RandomHorizontalFlip; ``'none'`` -> nothing.
    eval: ``'imagenet'`` -> Resize(size * 256 / 224) + CenterCrop(size); otherwise nothing.
    Always followed by ToDtype(float32, scale=True) and Normalize(spec.mean, spec.std).
    Randomness uses the torch global RNG (IndexedDataset seeds it per item).
    """
    from torchvision.transforms import v2

    ops: list[Any] = [v2.ToImage()]
    size = spec.image_size
    if train:
        if spec.augment in ("crop", "crop_flip"):
            ops.append(v2.RandomCrop(size, padding=spec.crop_padding, fill=0))
        if spec.augment == "crop_flip":
            ops.append(v2.RandomHorizontalFlip())
        if spec.augment == "imagenet":
            ops += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    elif spec.augment == "imagenet":
        ops += [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    ops += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(spec.mean), list(spec.std)),
        v2.ToPureTensor(),
    ]
    return v2.Compose(ops)
