"""The Method plug-in interface: a training method is an ``nn.Module`` that owns its state.

The engine orchestrates (AMP, backward, optimizer, scheduler, logging, checkpoints) and never
asks which method it runs. A method:

* is built from its YAML (``conf/method/<name>.yaml``) with plain arguments, plus the runtime
  facts ``num_classes`` and ``num_samples`` passed by the engine;
* may build extra modules (auxiliary heads) in :meth:`setup` from the model's stage API, and
  per-sample state as :class:`~kdrun.methods.bank.SampleBank` buffers; because the method is a
  module, all of it moves to the device and lands in ``state_dict()`` (hence in checkpoints) by
  itself. Plain Python values that must survive a resume go through ``get_extra_state``;
* computes the loss in :meth:`training_step` (called under autocast) and returns a
  :class:`StepOutput`; it never calls ``backward()`` or steps the optimizer;
* may ask for special batches (:meth:`train_batch_sampler`: CS-KD pairs, DLB overlap);
* may run earlier stages (teacher training) in :meth:`prepare` through the engine's
  :class:`StageRunner`;
* says which module is evaluated and exported (:meth:`eval_model`: the bare backbone).

Logged values in ``StepOutput.logs`` are detached 0-d tensors; the engine accumulates them on the
device and only synchronises at logging intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from kdrun.data.samplers import BatchSampler


@dataclass
class Batch:
    x: torch.Tensor  # [B, C, H, W] float, on the training device
    y: torch.Tensor  # [B] int64 labels
    index: torch.Tensor  # [B] int64 positions in the training set


@dataclass
class StepOutput:
    loss: torch.Tensor  # 0-d, differentiable
    logits: torch.Tensor  # [B', C] main-head logits aligned with ``targets`` (train accuracy)
    targets: torch.Tensor | None = None  # [B'] labels for ``logits`` (default: batch.y)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # detached 0-d tensors
    weight: torch.Tensor | None = None  # 0-d count of samples that took part (default: B')
    #: the loss is already normalised over the global batch (e.g. by a participant count summed
    #: over DDP ranks); otherwise it is a mean over this rank's slice and the engine weights it
    #: by the slice's share of the global batch
    loss_is_global: bool = False


class StageRunner(Protocol):
    """What the engine offers a multi-stage method in :meth:`Method.prepare`."""

    def run_stage(self, name: str, method: Method, **overrides: Any) -> nn.Module: ...


class Method(nn.Module):
    """Base class. Subclasses set ``name`` and may set ``ranges`` for config validation."""

    name: ClassVar[str] = "method"
    #: inclusive (low, high) bounds per constructor argument, checked before any work starts;
    #: ``None`` leaves a side open.
    ranges: ClassVar[dict[str, tuple[float | None, float | None]]] = {}

    def __init__(self, *, num_classes: int, num_samples: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.num_samples = int(num_samples)
        self.epoch = 0
        self.epochs = 1

    # ----- hooks (all optional) -------------------------------------------------------------
    def setup(self, model: nn.Module) -> None:
        """Build modules that depend on the model (auxiliary heads). Called once, before the
        optimizer is built, so parameters created here are trained."""

    def prepare(self, runner: StageRunner) -> None:
        """Run earlier stages (e.g. train a teacher) before the main training starts."""

    def train_batch_sampler(
        self,
        targets: torch.Tensor,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        drop_last: bool,
    ) -> BatchSampler | None:
        """A custom batch sampler, or None for the engine's shuffled batches."""
        return None

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.epoch, self.epochs = int(epoch), int(epochs)

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Extra per-epoch figures to log (host values are fine here: once per epoch)."""
        return {}

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The module that is evaluated, exported to best.ckpt and counted in ``params``."""
        return model

    def summary(self) -> dict[str, Any]:
        """Method-specific figures for summary.json (e.g. ``data/participation``)."""
        return {}

    # ----- state ------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "epochs": self.epochs}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.epochs = int(state.get("epochs", 1))


# ----- loss helpers shared by methods ---------------------------------------------------------
def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``SCE(z, t) = -sum_c t_c log softmax(z)_c``, averaged over the batch (fp32 math)."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, reduction: str = "mean"
) -> torch.Tensor:
    """``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``: sum over classes, batch mean (or per
    sample with ``reduction='none'``). The teacher side is detached."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / T, dim=-1)
    per_sample = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * (T * T)
    return per_sample.mean() if reduction == "mean" else per_sample
