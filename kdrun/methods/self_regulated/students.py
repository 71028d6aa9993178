"""Stage 2: the four students, one implementation (:class:`SelfRegulatedStudent`).

Per-sample loss with the frozen teacher (eval mode, ``no_grad``, same augmented batch)::

    L_i = alpha * KD_T(z_s, z_t)_i + (1 - alpha) * CE(z_s, y)_i

Two switches make the four methods: ``uses_significance`` (weights ``w_i = s_i / D`` and only the
samples with ``s_i > 0`` in the batches, :class:`~kdrun.methods.batching.SubsetBatchSampler`)
and ``uses_rule`` (the student's own participation rule, knobs ``beta`` and ``reduction``).
Each method is a subclass that sets them and lists its ``knobs``: its constructor signature is
the shared one cut down to those knobs, so validation sees exactly its own.
"""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.methods.bank import SampleBank
from kdrun.methods.base import (
    EMPTY_STEPS_SKIPPED,
    POSITIVE,
    UNIT,
    Batch,
    Range,
    StepOutput,
    frozen_teacher_logits,
    kd_loss,
)
from kdrun.methods.batching import SubsetBatchSampler
from kdrun.methods.self_regulated.accounting import (
    Accounting,
    count_stats,
)
from kdrun.methods.self_regulated.plots import write_significance_files
from kdrun.methods.self_regulated.rule import significance_weights
from kdrun.methods.self_regulated.teacher import obtain_teacher, rule_step, teacher_model_path

log = logging.getLogger("kdrun")

#: the knobs of every student (with the teacher's); ``beta``/``reduction``/``normalize`` only
#: where the student's switches use them
TEACHER_KNOBS = (
    "teacher_beta",
    "teacher_reduction",
    "teacher_epochs",
    "teacher_model",
    "teacher_ckpt",
    "significance_file",
)
RANGES = {
    "alpha": UNIT,
    "T": POSITIVE,
    "beta": UNIT,
    "teacher_beta": UNIT,
    "teacher_epochs": Range(1, None),
}


class SelfRegulatedStudent(Accounting):
    """KD from the self-regulated teacher, with significance weights/filter and the
    participation rule as the subclass switches them on."""

    uses_significance: ClassVar[bool] = False
    uses_rule: ClassVar[bool] = False
    #: this method's constructor arguments besides ``num_classes``/``num_samples``
    knobs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give a student with ``knobs`` the shared constructor cut down to them (signature,
        annotations, ``ranges``): an unknown knob is a ``TypeError`` as with any constructor."""
        super().__init_subclass__(**kwargs)
        if "knobs" not in cls.__dict__:
            return
        shared = SelfRegulatedStudent.__init__
        signature = inspect.signature(shared)
        hints = typing.get_type_hints(shared)
        keep = ("self", "num_classes", "num_samples", *cls.knobs)
        own = signature.replace(
            parameters=[p for n, p in signature.parameters.items() if n in keep]
        )

        def __init__(self, **knobs: Any) -> None:
            own.bind(self, **knobs)
            shared(self, **knobs)

        __init__.__signature__ = own  # type: ignore[attr-defined]
        __init__.__annotations__ = {n: hints[n] for n in keep if n in hints}
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        __init__.__doc__ = cls.__doc__
        cls.__init__ = __init__  # type: ignore[method-assign]
        cls.ranges = {k: v for k, v in RANGES.items() if k in cls.knobs}

    def __init__(
        self,
        *,
        num_classes: int,
        num_samples: int,
        alpha: float = 0.9,
        T: float = 4.0,
        normalize: Literal["mean_nonzero", "epochs", "max"] = "mean_nonzero",
        beta: float = 0.9,
        reduction: Literal["batch", "participants"] = "batch",
        teacher_beta: float = 0.9,
        teacher_reduction: Literal["batch", "participants"] = "batch",
        teacher_epochs: int | None = None,
        teacher_model: str | None = None,
        teacher_ckpt: str | None = None,
        significance_file: str | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, num_samples=num_samples)
        self.alpha, self.T = float(alpha), float(T)
        self.teacher_beta, self.teacher_reduction = float(teacher_beta), teacher_reduction
        self.teacher_epochs = int(teacher_epochs) if teacher_epochs is not None else None
        self.teacher_model = teacher_model or None
        self.teacher_ckpt = str(teacher_ckpt) if teacher_ckpt else None
        self.significance_file = str(significance_file) if significance_file else None
        self.beta, self.reduction, self.normalize = float(beta), reduction, normalize
        self.participation = SampleBank(num_samples, dtype="int32")
        if self.uses_significance:
            self.significance = SampleBank(num_samples, dtype="int32")
        self.weight_denominator = 1.0
        self.teacher_stats: dict[str, Any] | None = None  # from prepare()
        self.teacher_trained_epochs = 0  # E_T of the counts in use
        object.__setattr__(self, "teacher", None)  # set by prepare(), never a submodule

    @classmethod
    def check_knobs(cls, knobs: Mapping[str, Any]) -> None:
        """``teacher_model`` names a model option (the files in ``conf/model``)."""
        if knobs.get("teacher_model"):
            teacher_model_path(str(knobs["teacher_model"]))

    @property
    def counts(self) -> SampleBank:  # type: ignore[override]
        return self.participation

    # ----- stage 1 ------------------------------------------------------------------------------
    def prepare(self, runner) -> None:
        """Train/reuse the self-regulated teacher stage (or load ``teacher_ckpt``), take its
        significance counts, write the histogram plot and ``significance.pt``."""
        teacher, counts, epochs, source = obtain_teacher(self, runner)
        object.__setattr__(self, "teacher", teacher)
        if counts is None:
            if self.uses_significance:
                raise ConfigError(
                    f"method.teacher_ckpt={self.teacher_ckpt} has no significance counts: pass "
                    "method.significance_file=<run>/significance.pt, or a teacher-stage "
                    "last.ckpt / cache entry as teacher_ckpt"
                )
            log.warning("teacher_ckpt without significance counts: no teacher accounting")
            return
        counts = counts.detach().to("cpu", torch.int64).flatten()
        if counts.numel() != self.num_samples:
            raise ConfigError(
                f"significance counts from {source} cover {counts.numel()} samples, the training "
                f"set has {self.num_samples}: they belong to another dataset or fraction"
            )
        if epochs is None:
            epochs = int(counts.max()) if counts.numel() else 1
            log.warning("significance source %s does not say E_T; using max s = %d", source, epochs)
        self.set_significance(counts, int(epochs))
        counts_file = runner.output_path("significance.pt")
        png = runner.output_path("plots/significance_hist.png")
        runner.output_path("plots/significance_hist.json")  # the plot's data, beside it
        if counts_file is not None and png is not None:  # the main rank
            if write_significance_files(counts_file, png, counts, self.histogram_data(source)):
                runner.log_figure("plots/significance_hist", png)

    def set_significance(self, counts: torch.Tensor, teacher_epochs: int) -> None:
        """Install the teacher's counts (int ``[N]``) and derive weights, kept set, stats."""
        counts = counts.detach().to("cpu", torch.int64).flatten()
        self.teacher_trained_epochs = int(teacher_epochs)
        stats = count_stats(counts, teacher_epochs)
        self.teacher_stats = stats
        if self.uses_significance:
            if stats["distinct_samples"] == 0:
                raise ConfigError(
                    "every teacher significance is 0 (no sample ever took part): the student's "
                    "training set would be empty; raise method.teacher_beta"
                )
            _, self.weight_denominator = significance_weights(
                counts, self.normalize, teacher_epochs
            )
            index = torch.arange(self.num_samples)
            dev = self.significance.values.device
            self.significance.write(index.to(dev), counts.to(dev), sync=False)

    def histogram_data(self, source: str) -> dict[str, Any]:
        """The teacher's significance histogram and figures (the plot's JSON)."""
        stats = self.teacher_stats or {}
        return {
            "epochs": self.teacher_trained_epochs,
            "num_samples": self.num_samples,
            "values": list(range(len(stats["hist"]))),
            "counts": stats["hist"],
            "participations": stats["participations"],
            "participation": stats["participation"],
            "distinct_samples": stats["distinct_samples"],
            "beta": self.teacher_beta,
            "reduction": self.teacher_reduction,
            "source": source,
        }

    # ----- stage 2 ------------------------------------------------------------------------------
    def train_batch_sampler(self, targets, batch_size, seed, rank, world_size, drop_last):
        if not self.uses_significance:
            return None
        if self.teacher_stats is None:
            raise RuntimeError(f"{self.name}: prepare(runner) must run before the sampler")
        kept = torch.nonzero(self.significance.values.cpu() > 0).flatten()
        return SubsetBatchSampler(
            kept, batch_size, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size
        )

    def sample_weights(self, index: torch.Tensor) -> torch.Tensor | None:
        """``w_i = s_i / D`` for the batch (None without significance)."""
        if not self.uses_significance:
            return None
        return self.significance.read(index).to(torch.float32) / self.weight_denominator

    def per_sample_terms(
        self, model: nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, L, ce, kd)``: student logits and per-sample ``L_i``, ``CE_i``, ``KD_T,i``."""
        if self.teacher is None:
            raise RuntimeError(f"{self.name}: prepare(runner) must run before training")
        logits = model(batch.x)
        teacher_logits = frozen_teacher_logits(self.teacher, batch.x)
        ce = F.cross_entropy(logits.float(), batch.y, reduction="none")
        kd = kd_loss(logits, teacher_logits, self.T, reduction="none")
        return logits, self.alpha * kd + (1.0 - self.alpha) * ce, ce, kd

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits, per_sample, ce, kd = self.per_sample_terms(model, batch)
        w = self.sample_weights(batch.index)
        if w is not None:
            per_sample = w * per_sample
        logs = {"ce": ce.mean().detach(), "kd": kd.mean().detach()}
        if self.uses_rule:
            return rule_step(self, logits, batch, per_sample, logs)
        self.record(batch.index, torch.ones_like(batch.y, dtype=torch.bool), None)
        return StepOutput(loss=per_sample.mean(), logits=logits, logs=logs)

    def summary(self) -> dict[str, Any]:
        out, hist = self.accounting_summary()
        out["data/participation_hist"] = hist
        stats = self.teacher_stats
        if self.uses_significance and stats is not None:
            kept = stats["distinct_samples"]
            out["data/kept_samples"] = kept
            out["data/kept_fraction"] = kept / max(self.num_samples, 1)
        if stats is not None:
            out["teacher/data/participations"] = stats["participations"]
            out["teacher/data/participation"] = stats["participation"]
            out["teacher/data/distinct_samples"] = stats["distinct_samples"]
            out["teacher/data/significance_hist"] = stats["hist"]
            out["teacher/data/epochs"] = self.teacher_trained_epochs
        prefix = f"{self.name}/"
        out[prefix + "alpha"] = self.alpha
        out[prefix + "T"] = self.T
        if self.uses_significance:
            out[prefix + "normalize"] = self.normalize
            out[prefix + "weight_denominator"] = self.weight_denominator
        if self.uses_rule:
            out[prefix + "beta"] = self.beta
            out[prefix + "reduction"] = self.reduction
            out["self_regulated/empty_steps_skipped"] = EMPTY_STEPS_SKIPPED
        out[prefix + "teacher_ckpt"] = self.teacher_ckpt
        return out

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "teacher_epochs": self.teacher_trained_epochs}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.teacher_trained_epochs = int(state.get("teacher_epochs", 0))


class KDStudent(SelfRegulatedStudent):
    """``kd``: plain distillation from the self-regulated teacher (the control)."""

    name = "kd"
    knobs = ("alpha", "T", *TEACHER_KNOBS)


class SignificanceStudent(SelfRegulatedStudent):
    """``significance``: ``w_i``-weighted KD on the samples with ``s_i > 0`` only."""

    name = "significance"
    uses_significance = True
    knobs = ("alpha", "T", "normalize", *TEACHER_KNOBS)


class RegulatedStudent(SelfRegulatedStudent):
    """``regulated``: KD under the student's own participation rule (no significance)."""

    name = "regulated"
    uses_rule = True
    knobs = ("alpha", "T", "beta", "reduction", *TEACHER_KNOBS)


class HybridStudent(SelfRegulatedStudent):
    """``hybrid``: significance weights and filter, then the student's participation rule."""

    name = "hybrid"
    uses_significance = True
    uses_rule = True
    knobs = ("alpha", "T", "normalize", "beta", "reduction", *TEACHER_KNOBS)
