"""CS-KD — class-wise self-knowledge distillation (Yun et al., CVPR 2020; docs/methods.md).

Reference: S. Yun, J. Park, K. Lee, J. Shin, "Regularizing Class-wise Predictions via
Self-knowledge Distillation", CVPR 2020 (code: github.com/alinlab/cs-kd).

Batches (:class:`PairBatchSampler`): with ``B = trainer.batch_size`` (the global batch) and
``h = B // 2``, every global batch is ``[anchors..., partners...]`` — ``h`` anchors taken in order
from a seeded permutation of the training set (one permutation per epoch) and, at position
``j + h``, the partner of anchor ``j``: a sample drawn uniformly, seeded by ``(seed, epoch)``,
from the *other* training samples of the anchor's class. A class with a single sample pairs it
with itself; since kdrun's augmentation is a function of ``(seed, epoch, index)``, both copies are
the same image in the same forward pass, so that anchor's KD term is 0 (CE only). The draw is vectorised: the class-sorted index list, each sample's position ``p``
inside its class (of size ``n``) and a random offset ``r`` uniform in ``{1..n-1}`` give the
partner at position ``(p + r) mod n``.

Epoch length: the anchors cover the training set exactly once per epoch, so an epoch has
``ceil(N / h)`` steps (``floor`` with ``trainer.drop_last``) and processes ``2N`` images (every
step carries ``h`` anchors plus ``h`` partners): twice the images, and twice the steps, of a
``ce`` epoch with the same ``trainer.batch_size``. The reference code counts its ``batch_size``
in anchors (128 anchors + 128 partners per step); to match it, set ``trainer.batch_size`` to
twice the reference value. An odd ``B`` uses ``2 * (B // 2)`` images per step.

DDP: the pairing is per rank. Rank ``r`` of ``W`` receives
``[tensor_split(anchors, W)[r], tensor_split(partners, W)[r]]``, so each local batch holds whole
pairs in the same ``[anchors, partners]`` layout (the engine's default contiguous slice would
give rank 0 only anchors). Requires ``h >= W``.

Loss (one forward of the concatenated batch; ``z_a`` anchors' logits, ``z_p`` partners')::

    loss = CE(z_a, y_a) + lam * KD_T(z_a, sg[z_p])

with ``KD_T`` the batch-mean ``T^2 KL(softmax(z_p/T) || softmax(z_a/T))``. As in the reference,
only the anchors get the CE term and the gradient of the KD term; the partners serve only as
detached targets in this step (they are anchors at some other step of the epoch).
``StepOutput.logits/targets`` are the anchors' logits and labels (train accuracy over anchors);
``train/ce`` and ``train/kd`` are logged.

Defaults (the paper's CIFAR/ImageNet settings): ``T = 4``, ``lam = 1``.
Differences from the reference code, deliberate and documented:

* anchors and partners go through the model in one call, so BatchNorm's batch statistics are over
  all ``2h`` images (the reference runs the partners in a second, ``no_grad`` forward pass);
* the partner is never the anchor itself when its class has another sample (the reference's
  ``random.choice`` over the whole class picks the anchor itself with probability ``1/n``);
* ``B`` counts images, not anchors (see "Epoch length").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.data.samplers import epoch_generator
from kdrun.methods.base import NON_NEGATIVE, POSITIVE, Batch, Method, StepOutput, kd_loss
from kdrun.methods.batching import HalvesBatchSampler

_PARTNER_SALT = 1  # the partner draw uses its own (seed, epoch) stream, independent of the order


class PairBatchSampler(HalvesBatchSampler):
    """Global batches ``[anchors (h), partners (h)]``; each rank gets whole pairs."""

    method_name = "cs_kd"

    def __init__(self, targets: torch.Tensor, batch_size: int, **kwargs) -> None:
        targets = torch.as_tensor(targets).detach().to("cpu", torch.int64).reshape(-1)
        super().__init__(targets.shape[0], batch_size, **kwargs)
        self.targets = targets
        n = targets.shape[0]
        # class-sorted index list; each class occupies [start[c], start[c] + count[c])
        self._sorted = torch.argsort(targets, stable=True)
        self._count = torch.bincount(targets)
        self._start = torch.cumsum(self._count, 0) - self._count
        # position of every sample inside its class list
        self._pos = torch.empty(n, dtype=torch.int64)
        self._pos[self._sorted] = torch.arange(n) - self._start[targets[self._sorted]]

    def partners(self, anchors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One same-class partner per anchor, uniform over the class's other samples."""
        cls = self.targets[anchors]
        n = self._count[cls]
        raw = torch.randint(0, 2**62, anchors.shape, generator=generator, dtype=torch.int64)
        # offset uniform in {1..n-1} (modulo bias < 1e-12); n == 1 -> (p + 1) mod 1 = 0: itself
        offset = raw % (n - 1).clamp(min=1) + 1
        return self._sorted[self._start[cls] + (self._pos[anchors] + offset) % n]

    def global_batches(self) -> list[torch.Tensor]:
        order = self.epoch_order()
        partners = self.partners(order, epoch_generator(self.seed, self.epoch, _PARTNER_SALT))
        anchors, mates = self.chunks(order), self.chunks(partners)
        return [torch.cat([a, p]) for a, p in zip(anchors, mates)]

    def _parts(self, n: int) -> list[int]:
        return [n // 2, n - n // 2]  # anchors, partners: every rank gets whole pairs

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.half)
        return full + (1 if rest and not self.drop_last else 0)


def cskd_loss(
    anchor_logits: torch.Tensor,
    anchor_targets: torch.Tensor,
    partner_logits: torch.Tensor,
    T: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kd)`` with ``loss = CE(z_a, y_a) + lam * KD_T(z_a, sg[z_p])``."""
    ce = F.cross_entropy(anchor_logits.float(), anchor_targets)
    kd = kd_loss(anchor_logits, partner_logits.detach(), T)
    return ce + lam * kd, ce, kd


class CSKD(Method):
    """``cs_kd``: CE on anchors + ``lam * KD_T`` toward a same-class partner's prediction."""

    name = "cs_kd"
    ranges = {"T": POSITIVE, "lam": NON_NEGATIVE}

    def __init__(
        self, *, num_classes: int, num_samples: int, T: float = 4.0, lam: float = 1.0
    ) -> None:
        super().__init__(num_classes=num_classes, num_samples=num_samples)
        self.T = float(T)
        self.lam = float(lam)

    def train_batch_sampler(self, targets, batch_size, seed, rank, world_size, drop_last):
        return PairBatchSampler(
            targets, batch_size, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size
        )

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        n = batch.x.shape[0]
        if n % 2:
            raise ValueError(f"cs_kd expects [anchors, partners] batches of even size, got {n}")
        h = n // 2
        logits = model(batch.x)  # one forward over anchors and partners together
        anchors, partners = logits[:h], logits[h:]
        y = batch.y[:h]
        loss, ce, kd = cskd_loss(anchors, y, partners, self.T, self.lam)
        return StepOutput(
            loss=loss,
            logits=anchors,
            targets=y,
            logs={"ce": ce.detach(), "kd": kd.detach()},
        )

    def summary(self) -> dict[str, float]:
        return {"cskd/T": self.T, "cskd/lam": self.lam}
