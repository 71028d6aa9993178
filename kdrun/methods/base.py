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
* may run earlier stages (teacher training) in :meth:`prepare` through a :class:`StageRunner`,
  which returns each stage's :class:`StageResult` (model, method state, metrics, steps, files)
  and takes the files and figures a method writes (:meth:`StageRunner.output_path`,
  :meth:`StageRunner.log_figure`); :meth:`finish` receives the main training's result;
* says which module is evaluated and exported (:meth:`eval_model`: the bare backbone).

Knobs (the YAML's arguments) are declared, never checked by hand: ``kdrun.config.validate`` checks
every one before the run dir exists, from these declarations only:

* the type is the constructor annotation: ``int``, ``float`` (an integer is fine), ``bool``,
  ``str``, ``X | None`` (null allowed; so is a ``None`` default);
* choices are a ``Literal[...]`` annotation: ``loss: Literal["kd", "mse"] = "kd"``;
* numeric bounds are the class's ``ranges``: ``{"T": Range(0, None, low_open=True)}`` is
  ``T > 0``, ``Range(0, 1)`` is ``[0, 1]``, ``Range(0, 1, low_open=True, high_open=True)`` is
  ``(0, 1)``; ends are closed unless marked open, ``None`` leaves a side unbounded, and a plain
  ``(low, high)`` tuple is shorthand for ``Range(low, high)`` (both ends closed);
* a constraint that no single declaration can say (between knobs, or against a list known only
  when the run starts, such as the model options) goes in :meth:`Method.check_knobs`, which
  ``validate`` calls with every knob's value.

A constructor trusts its knobs and only checks the runtime facts (``num_classes``, the model).

Logged values in ``StepOutput.logs`` are detached 0-d tensors; the engine accumulates them on the
device and only synchronises at logging intervals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
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


#: the engine's contract for ``StepOutput.weight``: a step in which no sample took part on any
#: rank leaves parameters and optimizer state untouched (:func:`kdrun.optim_step.step_unless_empty`)
EMPTY_STEPS_SKIPPED = True


@dataclass
class StepOutput:
    loss: torch.Tensor  # 0-d, differentiable
    logits: torch.Tensor  # [B', C] main-head logits aligned with ``targets`` (train accuracy)
    targets: torch.Tensor | None = None  # [B'] labels for ``logits`` (default: batch.y)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # detached 0-d tensors
    #: 0-d count of samples that took part (default: B'); a step whose weight sums to 0 over
    #: the ranks performs no update (see :data:`EMPTY_STEPS_SKIPPED`)
    weight: torch.Tensor | None = None
    #: the loss is already normalised over the global batch (e.g. by a participant count summed
    #: over DDP ranks); otherwise it is a mean over this rank's slice and the engine weights it
    #: by the slice's share of the global batch
    loss_is_global: bool = False


@dataclass(frozen=True)
class StageResult:
    """What one training produced: an earlier stage (:meth:`StageRunner.run_stage`) or, passed to
    :meth:`Method.finish`, the run's main training.

    ``steps`` optimizer steps were logged at steps ``first_step .. first_step + steps - 1`` of the
    run's step axis (:attr:`next_step` is where the next training starts), also when a cached
    stage was not trained by this run."""

    name: str  #: the stage's name (``teacher``, ``gen0``); ``""`` for the main training
    #: the trained model; an earlier stage's is selected like a run's (the ``eval.monitor`` epoch
    #: with a validation split, else the last epoch) and frozen: eval mode, no gradients
    model: nn.Module
    method: Method  #: the method it trained with, holding its state after the last epoch
    #: final figures, keyed as logged: ``teacher/test/acc1`` (unprefixed for the main training)
    metrics: Mapping[str, Any]
    first_step: int
    steps: int
    cached: bool = False  #: taken from ``paths.teacher_cache``: trained by another run
    #: files it left: ``checkpoints`` (folder), ``best`` (``best.ckpt``, with a validation split)
    artifacts: Mapping[str, Path] = field(default_factory=dict)

    @property
    def next_step(self) -> int:
        return self.first_step + self.steps


class StageRunner(Protocol):
    """What a method's :meth:`Method.prepare` receives (:class:`kdrun.stages.StageRunner`)."""

    @property
    def step(self) -> int:
        """The run's step axis where the next training starts (after every stage so far)."""

    def run_stage(
        self,
        name: str,
        method: Method,
        *,
        method_settings: Mapping[str, Any] | None = None,
        model_cfg: Any = None,
        epochs: int | None = None,
        seed_offset: int = 1000,
    ) -> StageResult:
        """Train (or resume, or take from the cache) a fresh model with ``method``."""

    def load_model(self, path: str | Path, model_cfg: Any = None) -> nn.Module:
        """A frozen model from a checkpoint file."""

    def output_path(self, relpath: str) -> Path | None:
        """Where a method writes a file of the run (``<run dir>/<relpath>``, folder made; listed
        in ``summary.json``'s ``files``); ``None`` on the DDP ranks that write nothing."""

    def log_figure(self, key: str, png: Path) -> None:
        """Log an image the method wrote (under :meth:`output_path`) at :attr:`step`."""


@dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric knob: ``low <= x <= high`` with closed ends, ``<`` at an
    end marked open; ``None`` leaves that side unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def of(cls, spec: Range | tuple[float | None, float | None]) -> Range:
        """A ``Range`` as is; a ``(low, high)`` tuple as ``Range(low, high)`` (closed ends)."""
        return spec if isinstance(spec, Range) else cls(*spec)

    def __contains__(self, value: float) -> bool:
        if value != value:  # NaN is in no range
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """``"> 0"``, ``">= 1"``, ``"<= 1"``, ``"in [0, 1]"``, ``"in (0, 1)"`` (``""`` if open)."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low}, {self.high}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return ""


#: a temperature, a strictly positive number
POSITIVE = Range(0, None, low_open=True)
#: a weight or a probability
UNIT = Range(0, 1)
#: a non-negative weight
NON_NEGATIVE = Range(0, None)


class Method(nn.Module):
    """Base class. Subclasses set ``name`` and declare their knobs (see the module docstring)."""

    name: ClassVar[str] = "method"
    #: numeric bounds per constructor argument (a :class:`Range` or a closed ``(low, high)``)
    ranges: ClassVar[Mapping[str, Range | tuple[float | None, float | None]]] = {}

    @classmethod
    def check_knobs(cls, knobs: Mapping[str, Any]) -> None:
        """Constraints the declarations cannot say; ``knobs`` holds every constructor argument
        except ``num_classes``/``num_samples`` (the config's value or the default). Raise
        :class:`~kdrun.errors.ConfigError` with one line naming ``method.<key>`` and the fix."""

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

    def finish(self, result: StageResult) -> None:
        """Called once after the main training (every rank) with its result, before
        :meth:`summary`: a method that tabulates every stage keeps the last one's figures."""

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


def frozen_teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A frozen teacher's logits for ``x``: eval mode, ``no_grad``."""
    if teacher.training:
        teacher.eval()
    with torch.no_grad():
        return teacher(x)


def mse_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``sum_c (softmax(z_s)_c - softmax(z_t)_c)^2``, batch mean (fp32, teacher detached)."""
    p_s = F.softmax(student_logits.float(), dim=-1)
    p_t = F.softmax(teacher_logits.detach().float(), dim=-1)
    return (p_s - p_t).pow(2).sum(dim=-1).mean()


def distillation_step(
    model: nn.Module,
    teacher: nn.Module,
    batch: Batch,
    alpha: float,
    T: float,
    loss: str = "kd",
) -> StepOutput:
    """``(1 - alpha) CE(z_s, y) + alpha D(z_s, z_t)`` with the frozen ``teacher`` (eval mode,
    ``no_grad``, same batch); ``D`` is ``KD_T`` (``loss='kd'``) or :func:`mse_probs`."""
    logits = model(batch.x)
    teacher_logits = frozen_teacher_logits(teacher, batch.x)
    ce = F.cross_entropy(logits.float(), batch.y)
    if loss == "mse":
        term = mse_probs(logits, teacher_logits)
    else:
        term = kd_loss(logits, teacher_logits, T)
    total = (1.0 - alpha) * ce + alpha * term
    return StepOutput(loss=total, logits=logits, logs={"ce": ce.detach(), loss: term.detach()})
