"""LSSKD — layered self-supervised self-distillation (Dahri et al., arXiv 2506.07055, 2025;
docs/methods.md). Teacher-free; auxiliary heads are training-only.

The paper body could not be read: the combination below is **[reconstructed]** from its three
known parts (HSAKD's self-supervised-augmented auxiliary heads, PS-KD's progressive soft targets on
every head, BYOT-style deep-to-shallow distillation and feature alignment). Every term has a
switch for ablations.

Self-supervised augmented batch
-------------------------------
Inside :meth:`LSSKD.training_step` the batch of ``B`` images becomes ``4B`` by rotating every image
by 0, 90, 180 and 270 degrees with ``torch.rot90(x, j, dims=(2, 3))`` — **counter-clockwise** as
the image is displayed (row 0 at the top): the rotation goes from the height axis towards the
width axis, so the top-right pixel moves to the top-left. The copies are interleaved per sample:
rows ``4i .. 4i+3`` are sample ``i`` rotated by ``j = 0..3`` quarter turns, with the joint label
``4 y_i + j`` over ``4C`` classes (:func:`rotate_batch`). Rotations need square inputs
(a ``ValueError`` otherwise). All ``4B`` images go through the backbone in ONE pass
(``model.forward_stages``), so BatchNorm sees every rotation; the main classifier's loss uses only
the 0-degree rows ``0, 4, 8, ...``.

Auxiliary heads (built in :meth:`LSSKD.setup` from the stage API, any ``StagedModel``)
-------------------------------------------------------------------------------------
One head per backbone stage ``l = 1..L`` (3 for CIFAR ResNet-20/56/110, WRN and ``small_cnn``; 4
for ResNet-18/34/50, PreAct ResNet-18 and the torchvision ResNets), fed with that stage's output:

* ``head: copy`` (default, HSAKD's layout): a fresh, non-shared copy of the backbone's remaining
  stages ``l+1 .. L`` (``model.make_stage_like(k)``: same block type, depth, widths, strides); the
  head on the last stage gets instead one extra stage of the final width with stride 1
  (``model.make_stage(D, D, 1)``, as many blocks as the backbone's last stage). Then
  ``model.make_pool(D)`` (global average pool, preceded by a fresh final BN+ReLU on
  pre-activation nets, exactly as the backbone ends) and ``Linear(D, 4C)``.
* ``head: bottleneck`` (documented deviation for small compute): ``[BN-ReLU on pre-activation
  nets] conv1x1(c_l -> D/4) BN ReLU -> one conv3x3 (D/4 -> D/4) BN ReLU per downsampling stage the
  head skips (stride = that stage's stride; a single stride-1 conv3x3 when none, i.e. on the last
  head) -> conv1x1(D/4 -> D) BN ReLU -> global average pool -> Linear(D, 4C)``.

So every head ends with the final stage's width ``D`` and the head's pooled feature ``h_l`` is
comparable with the backbone's pooled feature. Convolutions are Kaiming-initialised like the
backbone (``make_stage``/``init_module``), linears keep PyTorch's default. The heads live on this
method module: they are trained (the engine optimises model + method parameters), DDP-synchronised
through the engine's ``TrainModule`` and checkpointed, but dropped at inference —
:meth:`LSSKD.eval_model` returns the bare backbone (evaluated, exported, counted in ``params``).

State
-----
``bank`` = ``P`` ``[N, C]`` (softmax of the main classifier on the 0-degree view, as PS-KD) and,
with ``soften_aux``, ``aux_banks[l-1]`` = ``Q_l`` ``[N, 4, 4C]`` (softmax of head ``l`` on each
rotation). :class:`~kdrun.methods.bank.SampleBank` with ``bank_dtype`` (default ``float16``) on
``bank_device`` (``auto`` | ``cpu_pinned``). Never-written entries read as the one-hot targets
(``read_or``), which is PS-KD's "epoch 0 uses the labels". ``alpha_e = alpha_T (e+1) / E``
(:func:`kdrun.methods.pskd.pskd_alpha`).

Loss (per step)::

    T_final   = (1-alpha_e) onehot(y, C)     + alpha_e * P[idx]
    T_aux_l_j = (1-alpha_e) onehot(4y+j, 4C) + alpha_e * Q_l[idx, j]   # soften_aux=false: onehot
    L_soft = SCE(z_final[0-degree], T_final) + sum_l mean_j SCE(q_l[j], T_aux_l_j)
    L_kl   = sum_{l<L} mean_j KD_tau(q_l[j], sg[q_L[j]])     # deepest head teaches shallower ones
    L_feat = sum_l MSE(h_l, sg[h_final])
    loss   = L_soft + beta * L_kl + gamma * L_feat          # use_kl / use_feat switch the terms
    P[idx] <- softmax(z_final[0-degree]);  Q_l[idx, j] <- softmax(q_l[j])   # after the loss

``SCE`` and ``KD_tau`` are batch means (``mean_j`` of batch means over ``B`` = one mean over the
``4B`` rows). ``h_final`` is the backbone's pooled final feature of **all 4B rows** (the rotated
copies too), compared row by row with head ``l``'s pooled feature ``h_l`` of the same rows (the
heads see all 4B rows anyway, and the backbone's feature of a rotated image is the natural target
for the head's feature of the same image); ``MSE`` is PyTorch's mean over rows *and* feature dims
(unlike BYOT's sum over dims). Banks are written with fp32 softmaxes of the same forward pass.

Knobs (defaults): ``alpha_T`` 0.8, ``tau`` 3, ``beta`` 1, ``gamma`` 0.1, ``soften_aux`` true
(false: hard joint labels on the heads, HSAKD-style, and no ``Q`` banks), ``use_kl`` true,
``use_feat`` true, ``head`` copy, ``bank_dtype`` float16, ``bank_device`` auto.

Logs (detached 0-d tensors, the engine adds ``train/``): ``soft_final``, ``soft_aux`` (sum over
heads), ``kl`` (sum, before ``beta``), ``feat`` (sum, before ``gamma``) — ``kl`` and ``feat`` are
logged as diagnostics even when switched off — and ``head{l}_acc`` (joint 4C-way training accuracy
of head ``l = 1..L`` over the 4B rows). ``StepOutput.logits`` / ``targets`` are the main
classifier's logits on the 0-degree copies / ``y``. No host synchronisation in the step.
Summary: ``lsskd/heads``, ``lsskd/head_params``, ``lsskd/bank_mb`` (MiB, as PS-KD's).

Memory: :func:`lsskd_memory` computes bank and head sizes without training. The ``Q`` banks
dominate: CIFAR-100 is 50k x 4 x 400 x 2 bytes = 160 MB per head; ImageNet would be 41 GB per
head, so use ``soften_aux=false`` there (or ``bank_device=cpu_pinned`` with a very large host).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.methods.bank import DTYPES, SampleBank
from kdrun.methods.base import (
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Batch,
    Method,
    StepOutput,
    kd_loss,
    soft_cross_entropy,
)
from kdrun.methods.heads import AuxiliaryHead, forward_heads, head_accuracies
from kdrun.methods.pskd import pskd_alpha
from kdrun.models.base import conv1x1, conv3x3, init_module

ROTATIONS = 4


# ----------------------------------------------------------------------------- rotations
def rotate_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, H, W]``, ``[B]`` -> ``[4B, C, H, W]``, ``[4B]``: row ``4i + j`` is sample ``i``
    rotated counter-clockwise by ``j`` quarter turns (``torch.rot90(x, j, dims=(2, 3))``) with the
    joint label ``4 y_i + j``."""
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"lsskd rotates images by 90 degrees and needs square [B, C, H, H] inputs, got "
            f"{tuple(x.shape)}"
        )
    b = x.shape[0]
    x4 = torch.stack([torch.rot90(x, j, dims=(2, 3)) for j in range(ROTATIONS)], dim=1)
    x4 = x4.reshape(b * ROTATIONS, *x.shape[1:])
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x4 = x4.contiguous(memory_format=torch.channels_last)  # keep hardware.channels_last
    j = torch.arange(ROTATIONS, device=y.device, dtype=y.dtype)
    y4 = (ROTATIONS * y.unsqueeze(1) + j).reshape(-1)
    return x4, y4


# ----------------------------------------------------------------------------- heads
def _copy_body(model: nn.Module, stage: int) -> nn.Sequential:
    """Fresh copies of ``model.stages[stage+1:]``; after the last stage one extra stride-1 stage
    of the final width (block count from ``make_stage``'s default: the last stage's)."""
    num_stages = len(model.stages)
    if stage < num_stages - 1:
        return nn.Sequential(*(model.make_stage_like(k) for k in range(stage + 1, num_stages)))
    width = int(model.stage_channels[-1])
    return nn.Sequential(model.make_stage(width, width, 1))


def _bottleneck_body(model: nn.Module, stage: int) -> nn.Sequential:
    """1x1 reduce -> one conv3x3 per skipped downsampling stage (stride-1 conv3x3 if none) ->
    1x1 expand, BN+ReLU after each (with a leading BN+ReLU on pre-activation nets)."""
    c_in = int(model.stage_channels[stage])
    dim = int(model.stage_channels[-1])
    mid = max(dim // 4, 1)
    strides = [int(s) for s in model.stage_strides[stage + 1 :] if int(s) > 1] or [1]
    layers: list[nn.Module] = []
    if getattr(model, "preact", False):
        layers += [nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
    layers += [conv1x1(c_in, mid), nn.BatchNorm2d(mid), nn.ReLU(inplace=True)]
    for s in strides:
        layers += [conv3x3(mid, mid, s), nn.BatchNorm2d(mid), nn.ReLU(inplace=True)]
    layers += [conv1x1(mid, dim), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)]
    return init_module(nn.Sequential(*layers))


def build_heads(model: nn.Module, num_classes: int, head: str = "copy") -> nn.ModuleList:
    """One head per stage of ``model`` (see the module docstring), each ending in ``4C`` logits."""
    if head not in ("copy", "bottleneck"):
        raise ValueError(f"lsskd: head must be 'copy' or 'bottleneck', got {head!r}")
    stages = getattr(model, "stages", None)
    if not stages:
        raise ValueError("lsskd needs a backbone with the stage API (model.stages)")
    dim = int(model.stage_channels[-1])
    heads = []
    for stage in range(len(stages)):
        if head == "copy":
            body, pool = _copy_body(model, stage), model.make_pool(dim)
        else:
            body, pool = (
                _bottleneck_body(model, stage),
                nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
            )
        heads.append(AuxiliaryHead(body, pool, dim, ROTATIONS * num_classes))
    return nn.ModuleList(heads)


# ----------------------------------------------------------------------------- loss
def lsskd_loss(
    z_final: torch.Tensor,
    h_final: torch.Tensor,
    head_logits: list[torch.Tensor],
    head_feats: list[torch.Tensor],
    t_final: torch.Tensor,
    t_aux: list[torch.Tensor],
    *,
    tau: float,
    beta: float,
    gamma: float,
    use_kl: bool = True,
    use_feat: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LSSKD loss and its (undetached) parts ``soft_final``, ``soft_aux``, ``kl``, ``feat``.

    ``z_final`` ``[B, C]`` (0-degree rows), ``h_final`` ``[4B, D]``, ``head_logits[l]`` ``[4B, 4C]``,
    ``head_feats[l]`` ``[4B, D]``, ``t_final`` ``[B, C]``, ``t_aux[l]`` ``[4B, 4C]`` (row ``4i+j``).
    A term switched off is computed without gradient (a logged diagnostic) and left out."""
    soft_final = soft_cross_entropy(z_final, t_final)
    zero = soft_final.new_zeros(())
    soft_aux = zero
    for q, t in zip(head_logits, t_aux):
        soft_aux = soft_aux + soft_cross_entropy(q, t)
    with torch.set_grad_enabled(use_kl and torch.is_grad_enabled()):
        kl = zero
        for q in head_logits[:-1]:
            kl = kl + kd_loss(q, head_logits[-1], tau)  # kd_loss detaches the teacher
    with torch.set_grad_enabled(use_feat and torch.is_grad_enabled()):
        target = h_final.detach().float()
        feat = zero
        for h in head_feats:
            feat = feat + F.mse_loss(h.float(), target)
    loss = soft_final + soft_aux
    if use_kl:
        loss = loss + beta * kl
    if use_feat:
        loss = loss + gamma * feat
    return loss, {"soft_final": soft_final, "soft_aux": soft_aux, "kl": kl, "feat": feat}


# ----------------------------------------------------------------------------- method
class LSSKD(Method):
    """``lsskd``: rotation-augmented auxiliary heads with progressive soft targets (§4)."""

    name = "lsskd"
    ranges = {"alpha_T": UNIT, "tau": POSITIVE, "beta": NON_NEGATIVE, "gamma": NON_NEGATIVE}

    def __init__(
        self,
        *,
        num_classes: int,
        num_samples: int,
        alpha_T: float = 0.8,
        tau: float = 3.0,
        beta: float = 1.0,
        gamma: float = 0.1,
        soften_aux: bool = True,
        use_kl: bool = True,
        use_feat: bool = True,
        head: Literal["copy", "bottleneck"] = "copy",
        bank_dtype: Literal["float32", "bfloat16", "float16"] = "float16",
        bank_device: Literal["auto", "cpu_pinned"] = "auto",
    ) -> None:
        super().__init__(num_classes=num_classes, num_samples=num_samples)
        self.alpha_T, self.tau = float(alpha_T), float(tau)
        self.beta, self.gamma = float(beta), float(gamma)
        self.soften_aux, self.use_kl, self.use_feat = bool(soften_aux), bool(use_kl), bool(use_feat)
        self.head = head
        self.bank_dtype, self.bank_device = bank_dtype, bank_device
        self.bank = SampleBank(num_samples, (num_classes,), dtype=bank_dtype, device=bank_device)
        self.heads = nn.ModuleList()
        self.aux_banks = nn.ModuleList()
        self.alpha = 0.0

    # ----- construction ---------------------------------------------------------------------
    def setup(self, model: nn.Module) -> None:
        """Build one head per stage and (with ``soften_aux``) one ``[N, 4, 4C]`` bank per head."""
        param = next(model.parameters())
        self.heads = build_heads(model, self.num_classes, self.head).to(param.device)
        if self.soften_aux:
            shape = (ROTATIONS, ROTATIONS * self.num_classes)
            self.aux_banks = nn.ModuleList(
                SampleBank(self.num_samples, shape, self.bank_dtype, self.bank_device)
                for _ in self.heads
            )

    # ----- training -------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        self.alpha = pskd_alpha(self.alpha_T, epoch, epochs)

    def final_targets(self, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``T_final`` ``[B, C]``."""
        onehot = F.one_hot(y, self.num_classes).float()
        return (1.0 - self.alpha) * onehot + self.alpha * self.bank.read_or(index, onehot)

    def aux_targets(self, y: torch.Tensor, index: torch.Tensor) -> list[torch.Tensor]:
        """``T_aux_l`` ``[4B, 4C]`` per head (row ``4i + j``: sample ``i``, rotation ``j``)."""
        b = y.shape[0]
        j = torch.arange(ROTATIONS, device=y.device, dtype=y.dtype)
        joint = (ROTATIONS * y.unsqueeze(1) + j).reshape(-1)
        onehot = F.one_hot(joint, ROTATIONS * self.num_classes).float()
        if not self.soften_aux:
            return [onehot for _ in self.heads]
        onehot3 = onehot.view(b, ROTATIONS, -1)
        return [
            ((1.0 - self.alpha) * onehot3 + self.alpha * bank.read_or(index, onehot3)).view(
                b * ROTATIONS, -1
            )
            for bank in self.aux_banks
        ]

    def forward_heads(
        self, stage_outputs: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(head features ``[4B, D]``, head logits ``[4B, 4C]``), one per stage output."""
        return forward_heads(self.heads, stage_outputs)

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        if len(self.heads) == 0:
            raise RuntimeError("lsskd: setup(model) was not called (no auxiliary heads)")
        x4, y4 = rotate_batch(batch.x, batch.y)
        stage_outputs, h_final, logits4 = model.forward_stages(x4)
        z_final = logits4[::ROTATIONS]  # the 0-degree copies, [B, C]
        head_feats, head_logits = self.forward_heads(stage_outputs)
        t_final = self.final_targets(batch.y, batch.index)
        t_aux = self.aux_targets(batch.y, batch.index)
        loss, parts = lsskd_loss(
            z_final,
            h_final,
            head_logits,
            head_feats,
            t_final,
            t_aux,
            tau=self.tau,
            beta=self.beta,
            gamma=self.gamma,
            use_kl=self.use_kl,
            use_feat=self.use_feat,
        )
        # bank writes after the loss (the targets above were read before)
        b = batch.y.shape[0]
        self.bank.write(batch.index, F.softmax(z_final.detach().float(), dim=-1))
        for bank, q in zip(self.aux_banks, head_logits):
            probs = F.softmax(q.detach().float(), dim=-1)
            bank.write(batch.index, probs.view(b, ROTATIONS, -1))
        logs = {k: v.detach() for k, v in parts.items()}
        logs.update(head_accuracies(head_logits, y4, "head"))
        return StepOutput(loss=loss, logits=z_final, targets=batch.y, logs=logs)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        self.bank.check_consistent("lsskd bank P")
        for i, bank in enumerate(self.aux_banks):
            bank.check_consistent(f"lsskd head {i} bank")
        return {"train/alpha": self.alpha}

    # ----- inference / reporting ------------------------------------------------------------
    def eval_model(self, model: nn.Module) -> nn.Module:
        """The bare backbone: the auxiliary heads are training-only."""
        return model

    def bank_bytes(self) -> int:
        return self.bank.memory_bytes() + sum(b.memory_bytes() for b in self.aux_banks)

    def summary(self) -> dict[str, Any]:
        return {
            "lsskd/heads": len(self.heads),
            "lsskd/head_params": sum(p.numel() for p in self.heads.parameters()),
            "lsskd/bank_mb": self.bank_bytes() / 2**20,
            "lsskd/alpha_T": self.alpha_T,
        }

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "alpha": self.alpha}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.alpha = float(state.get("alpha", 0.0))


# ----------------------------------------------------------------------------- memory
def lsskd_memory(
    num_samples: int,
    num_classes: int,
    model: nn.Module | str,
    bank_dtype: str = "float16",
    *,
    head: str = "copy",
    soften_aux: bool = True,
    image_size: int = 32,
) -> dict[str, float]:
    """Bank and head sizes of an LSSKD run, computed without allocating anything.

    ``model`` is a ``StagedModel`` or a model config name (built on the ``meta`` device with
    ``num_classes`` and ``image_size``). Returns the number of heads, head parameters (and their
    fp32 size), the ``P`` bank and all ``Q`` banks in bytes (values plus the 1-byte ``written``
    mask per sample), and the totals in MB (10^6 bytes)."""
    with torch.device("meta"):
        if isinstance(model, str):
            from kdrun.models import create_model

            model = create_model(model, num_classes=num_classes, image_size=image_size)
        heads = build_heads(model, num_classes, head)
    if bank_dtype not in DTYPES:
        raise ValueError(f"bank_dtype must be one of {sorted(DTYPES)}, got {bank_dtype!r}")
    item = DTYPES[bank_dtype].itemsize
    p_bank = num_samples * num_classes * item + num_samples
    q_bank = num_samples * ROTATIONS * ROTATIONS * num_classes * item + num_samples
    n_heads = len(heads)
    q_total = n_heads * q_bank if soften_aux else 0
    head_params = sum(p.numel() for p in heads.parameters())
    backbone_params = sum(p.numel() for p in model.parameters())
    return {
        "heads": n_heads,
        "backbone_params": backbone_params,
        "head_params": head_params,
        "head_mb_fp32": head_params * 4 / 1e6,
        "p_bank_mb": p_bank / 1e6,
        "q_bank_mb_per_head": q_bank / 1e6 if soften_aux else 0.0,
        "bank_mb": (p_bank + q_total) / 1e6,
        "total_mb": (p_bank + q_total + head_params * 4) / 1e6,
    }


__all__ = ["LSSKD", "build_heads", "lsskd_loss", "lsskd_memory", "rotate_batch"]
