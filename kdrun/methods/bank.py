"""SampleBank: a per-sample tensor store indexed by the dataset index that travels with a batch.

``values`` has shape ``[N, *shape]`` and lives on the training device (or in pinned CPU memory
with ``device="cpu_pinned"`` for ImageNet-scale banks; such a bank reads and writes on the host,
so each access copies the batch's index and values between device and host in order, one
synchronisation each); ``written`` is a bool mask ``[N]``.
``read(index)`` and ``write(index, values)`` are single vectorised ``index_select`` / ``index_copy_``
calls: no Python loop over samples and no host synchronisation. ``read_or(index, default)`` returns
the stored value where written and ``default`` elsewhere (a ``torch.where``, still no sync).

Under DDP, ``write(..., sync=True)`` first all-gathers ``(index, values)`` from every rank (slices
of unequal length included, see :func:`kdrun.distributed.batch_layout`) and writes all of them, so every rank holds the same bank (the distributed sampler reshuffles each
epoch, so a rank's next visit to a sample may come from another rank's write).

``check_consistent(name)`` (called by the methods once per epoch, a no-op in one process) compares
a checksum of the bank across ranks and raises if any rank's copy differs — the guard against a
write that missed the all-gather.

Both tensors are registered buffers: the bank moves with ``.to(device)`` of its owner (unless
pinned on the CPU) and lands in the owner's ``state_dict()`` — checkpoints need nothing extra.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdrun import distributed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SampleBank(nn.Module):
    def __init__(
        self,
        num_samples: int,
        shape: Sequence[int] = (),
        dtype: str | torch.dtype = torch.float32,
        device: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(dtype, str):
            if dtype not in DTYPES and dtype not in ("int32", "int64"):
                raise ValueError(f"bank dtype {dtype!r} is not one of {sorted(DTYPES)}")
            dtype = DTYPES.get(dtype) or getattr(torch, dtype)
        self.pinned = device == "cpu_pinned"
        self.register_buffer("values", torch.zeros(num_samples, *shape, dtype=dtype))
        self.register_buffer("written", torch.zeros(num_samples, dtype=torch.bool))
        if self.pinned:
            self._pin()

    def _pin(self) -> None:
        if torch.cuda.is_available():
            self.values = self.values.pin_memory()
            self.written = self.written.pin_memory()

    def _apply(self, fn, recurse=True):
        # A pinned bank stays in host memory when its owner moves to the GPU.
        if self.pinned:
            return self
        return super()._apply(fn, recurse)

    @property
    def num_samples(self) -> int:
        return self.values.shape[0]

    def _index(self, index: torch.Tensor) -> torch.Tensor:
        if self.values.device != index.device and self.values.device.type == "cpu":
            # a pinned bank indexes on the host: the copy must finish before index_select
            # reads it, so it is an ordinary (blocking) device-to-host copy
            return index.to(self.values.device)
        return index.to(self.values.device, non_blocking=True)

    def read(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Stored values for ``index`` (``[B, *shape]``), on ``device`` (default: index's)."""
        out = self.values.index_select(0, self._index(index))
        return out.to(device or index.device, non_blocking=True)

    def read_or(self, index: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
        """Stored values where written, ``default`` elsewhere; result has ``default``'s dtype."""
        idx = self._index(index)
        stored = self.values.index_select(0, idx).to(default.device, default.dtype)
        mask = self.written.index_select(0, idx).to(default.device)
        mask = mask.view(-1, *([1] * (default.dim() - 1)))
        return torch.where(mask, stored, default)

    @torch.no_grad()
    def write(self, index: torch.Tensor, values: torch.Tensor, sync: bool = True) -> None:
        """Store ``values`` at ``index`` (all ranks' pairs when distributed and ``sync``)."""
        self._scatter(torch.Tensor.index_copy_, index, values.detach(), sync)

    @torch.no_grad()
    def add(self, index: torch.Tensor, values: torch.Tensor, sync: bool = True) -> None:
        """Accumulate ``values`` at ``index`` (counters); duplicates in ``index`` add up."""
        self._scatter(torch.Tensor.index_add_, index, values, sync)

    def _scatter(self, op, index: torch.Tensor, values: torch.Tensor, sync: bool) -> None:
        """``op(self.values, 0, index, values)`` (``index_copy_`` or ``index_add_``) over every
        rank's pairs when distributed and ``sync``; marks the rows written."""
        if sync and distributed.is_initialized():
            index = distributed.all_gather_cat(index)
            values = distributed.all_gather_cat(values)
        idx = self._index(index)
        op(self.values, 0, idx, values.to(self.values.device, self.values.dtype))
        self.written.index_fill_(0, idx, True)

    @torch.no_grad()
    def checksum(self) -> torch.Tensor:
        """``[sum of values, sum of squared values, written count]`` in float64 (one host-free
        reduction; equal banks give equal checksums)."""
        v = self.values.double()
        written = self.written.sum().double()
        return torch.stack([v.sum(), (v * v).sum(), written])

    def check_consistent(self, name: str) -> None:
        """Under DDP: raise ``RuntimeError`` if this bank differs between ranks (one all-gather
        of 3 numbers and one host sync); nothing in one process."""
        if not distributed.is_initialized():
            return
        sums = distributed.all_gather_cat(self.checksum()[None])
        if not bool((sums == sums[0]).all()):
            per_rank = ", ".join(f"rank {r}: {row.tolist()}" for r, row in enumerate(sums.cpu()))
            raise RuntimeError(
                f"per-sample state {name!r} differs across DDP ranks ({per_rank}); every write "
                "must go through SampleBank.write/add with sync=True"
            )

    def memory_bytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.written.numel()

    def extra_repr(self) -> str:
        shape = tuple(self.values.shape)
        return f"shape={shape}, dtype={self.values.dtype}, pinned={self.pinned}"
