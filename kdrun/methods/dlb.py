"""DLB — self-distillation from the last mini-batch (Shen et al., CVPR 2022; docs/methods.md).

Reference: Y. Shen, L. Xu, Y. Yang, Y. Li, Y. Guo, "Self-Distillation from the Last Mini-Batch for
Consistency Regularization", CVPR 2022 (arXiv 2203.16172).

Batches (:class:`OverlapBatchSampler`): with ``B = trainer.batch_size`` (global) and
``h = B // 2``, a seeded permutation of the training set (one per epoch, a pure function of
``(seed, epoch)``) is cut into chunks ``c_0, c_1, ..., c_{K-1}`` of ``h`` samples (the last may be
shorter; ``trainer.drop_last`` drops it). Step ``t`` trains on ``[c_t, c_{t+1}]``: its first half
repeats the second half of step ``t-1`` and its second half is new. An epoch therefore has
``K - 1`` steps (``K = ceil(N / h)``; one step if ``K == 1``), every sample is trained on at least
once, all but ``c_0`` and ``c_{K-1}`` twice, i.e. about ``2N`` images per epoch. kdrun's loaders
draw a sample's augmentation from ``(seed, epoch, index)``, so the repeated half is the same
augmented view as in the previous step — exactly like re-feeding the previous step's augmented
tensors; the regularised inconsistency is the one between consecutive parameter iterates. An odd
``B`` uses ``2 * (B // 2)`` images per step.

State (:class:`LogitCache`, a submodule: in ``state_dict`` and hence in checkpoints): the detached
fp32 logits of the previous step's second half, their dataset indices, a ``valid`` flag and the
epoch they were written in — fixed-shape buffers (``[h, C]``, ``[h]``, 0-d, 0-d).

Loss per step, ``z`` the logits of the whole batch, ``k`` the size of its first half::

    m_i  = valid & (cache.epoch == epoch) & (idx_i is in cache.index)      # i < k, on the device
    loss = CE(z, y) + alpha * sum_{i<k} m_i * KD_T(z_i, cache.logits[idx_i]) / k
    cache <- (idx[k:], sg[z[k:]])                                           # after the loss

i.e. CE over the full batch plus the batch-mean ``T^2 KL(softmax(z_prev/T) || softmax(z_i/T))``
over the repeated half. The index check replaces a positional comparison (indices are distinct
within an epoch, so "found in the cache" is "equal to the cached index"); it runs on the device
and is folded into the mask, so there is no host sync and no Python branch on tensor values.

Epoch boundaries: the first step of an epoch has no cached logits for its first half (``c_0`` of
a new permutation). The epoch tag in the cache makes ``m = 0`` there, so that step trains with CE
only (``train/kd`` counts it as 0; ``train/kd_active`` is the fraction of repeated-half samples
that got the KD term). A run resumed mid-epoch reloads the cache and the tag from the checkpoint
and continues exactly; one resumed at an epoch boundary sees a stale tag, as an uninterrupted run
would.

DDP: rank ``r`` of ``W`` gets ``[tensor_split(c_t, W)[r], tensor_split(c_{t+1}, W)[r]]``, so its
first half is exactly its own previous second half (the engine's default contiguous slice would
break the overlap). Each step all-gathers every rank's new half (padded to ``ceil(h / W)`` rows
with index -1) so all ranks hold the same global cache: DDP's buffer broadcast from rank 0 is then
harmless, and rank 0's checkpoint holds the whole state. Requires ``h >= W``.

Defaults: ``T = 3``, ``alpha = 1`` (the paper's). Reconstructions (not fixed by the paper): the KD
normalisation by the repeated-half size ``k``; CE averaged over the full batch; the KD term off on
the first step of each epoch rather than carrying the cache over an epoch boundary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdrun import distributed
from kdrun.methods.base import NON_NEGATIVE, POSITIVE, Batch, Method, StepOutput, kd_loss
from kdrun.methods.batching import HalvesBatchSampler


class OverlapBatchSampler(HalvesBatchSampler):
    """Global batches ``[c_t, c_{t+1}]`` over chunks of a per-epoch permutation."""

    method_name = "dlb"

    def global_batches(self) -> list[torch.Tensor]:
        c = self.chunks(self.epoch_order())
        if len(c) <= 1:
            return c  # N <= h: a single batch, nothing to overlap
        return [torch.cat([c[t], c[t + 1]]) for t in range(len(c) - 1)]

    def _parts(self, n: int) -> list[int]:
        first = min(self.half, n)  # the repeated chunk c_t, then c_{t+1}
        return [first, n - first]

    def __len__(self) -> int:
        k = self.num_samples // self.half if self.drop_last else -(-self.num_samples // self.half)
        return k - 1 if k >= 2 else k


class LogitCache(nn.Module):
    """The previous step's new-half logits (detached, fp32) and indices, equal on every rank.

    Buffers keep their identity when resized (``resize_``), so references held by DDP stay valid;
    loading a state dict adopts the stored shapes.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.register_buffer("index", torch.full((0,), -1, dtype=torch.int64))
        self.register_buffer("logits", torch.zeros(0, self.num_classes))
        self.register_buffer("valid", torch.zeros((), dtype=torch.bool))
        self.register_buffer("epoch", torch.full((), -1, dtype=torch.int64))

    @property
    def capacity(self) -> int:
        return self.index.shape[0]

    @torch.no_grad()
    def resize(self, rows: int) -> None:
        """Set the capacity (host-side shape check); clears the contents when it changes."""
        if rows == self.capacity:
            return
        self.index.resize_(rows).fill_(-1)
        self.logits.resize_(rows, self.num_classes).zero_()
        self.valid.fill_(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("index", "logits"):
            incoming = state_dict.get(prefix + name)
            own = getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != own.shape:
                with torch.no_grad():
                    own.resize_(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lookup(self, index: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(teacher_logits [k, C], found [k] bool)`` for ``index``; device-side, no sync."""
        k = index.shape[0]
        if self.capacity == 0:
            return (
                torch.zeros(k, self.num_classes, device=index.device),
                torch.zeros(k, dtype=torch.bool, device=index.device),
            )
        eq = index.to(self.index.device)[:, None] == self.index[None, :]  # [k, capacity]
        found = eq.any(dim=1) & self.valid & (self.epoch == epoch)
        pos = eq.to(torch.uint8).argmax(dim=1)
        return self.logits.index_select(0, pos), found

    @torch.no_grad()
    def store(self, index: torch.Tensor, logits: torch.Tensor, slot: int, epoch: int) -> None:
        """Replace the contents by this step's new half (all ranks', each padded to ``slot``)."""
        m = index.shape[0]
        slot = max(int(slot), m)
        device = self.logits.device
        idx = torch.full((slot,), -1, dtype=torch.int64, device=device)
        val = torch.zeros(slot, self.num_classes, device=device)
        idx[:m] = index.to(device)
        val[:m] = logits.detach().to(device, torch.float32)
        idx = distributed.all_gather_cat(idx)
        val = distributed.all_gather_cat(val)
        self.resize(idx.shape[0])
        self.index.copy_(idx)
        self.logits.copy_(val)
        self.valid.fill_(True)
        self.epoch.fill_(int(epoch))


def dlb_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    teacher: torch.Tensor,
    found: torch.Tensor,
    T: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kd)``: CE over the batch + ``alpha`` x masked KD over the first ``k`` rows."""
    ce = F.cross_entropy(logits.float(), targets)
    per_sample = kd_loss(logits[:k], teacher, T, reduction="none")
    kd = torch.where(found, per_sample, torch.zeros_like(per_sample)).sum() / max(k, 1)
    return ce + alpha * kd, ce, kd


class DLB(Method):
    """``dlb``: CE + ``alpha * KD_T`` of the repeated half toward its last-step logits."""

    name = "dlb"
    ranges = {"T": POSITIVE, "alpha": NON_NEGATIVE}

    def __init__(
        self, *, num_classes: int, num_samples: int, T: float = 3.0, alpha: float = 1.0
    ) -> None:
        super().__init__(num_classes=num_classes, num_samples=num_samples)
        self.T = float(T)
        self.alpha = float(alpha)
        self.cache = LogitCache(num_classes)
        self._first: int | None = None  # this rank's first-half size (from the sampler)
        self._slot: int = 0  # rows each rank contributes to the cache

    def train_batch_sampler(self, targets, batch_size, seed, rank, world_size, drop_last):
        n = int(targets.shape[0])
        sampler = OverlapBatchSampler(
            n, batch_size, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size
        )
        h = sampler.half
        self._first = h // world_size + (1 if rank < h % world_size else 0)
        self._slot = math.ceil(h / world_size)
        self.cache.resize(self._slot * world_size)  # fixed shape from the start
        return sampler

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        n = batch.x.shape[0]
        # first (repeated) half: its size is fixed by the sampler; without one, half the batch
        k = min(self._first if self._first is not None else n // 2, n)
        logits = model(batch.x)
        teacher, found = self.cache.lookup(batch.index[:k], self.epoch)
        loss, ce, kd = dlb_loss(logits, batch.y, k, teacher, found, self.T, self.alpha)
        self.cache.store(batch.index[k:], logits[k:], self._slot, self.epoch)
        active = found.float().mean() if k else torch.zeros((), device=logits.device)
        return StepOutput(
            loss=loss,
            logits=logits,
            logs={"ce": ce.detach(), "kd": kd.detach(), "kd_active": active.detach()},
        )

    def summary(self) -> dict[str, Any]:
        return {"dlb/T": self.T, "dlb/alpha": self.alpha}
