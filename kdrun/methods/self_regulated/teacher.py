"""Stage 1: the self-regulated teacher, its cache key, and where a student's counts come from.

:class:`SelfRegulatedTeacher` trains with CE under the participation rule and counts per sample
how often it took part — the *significance* ``s_i`` in ``{0..E_T}`` (bank ``significance``).
:func:`teacher_settings` is the method part of the stage's cache key: teacher knobs only, so the
four students share one teacher per (recipe, seed, teacher knobs). :func:`obtain_teacher` trains
or reuses that stage, or loads ``method.teacher_ckpt`` and reads the counts from
``method.significance_file`` or from the checkpoint itself (:func:`load_significance`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun.errors import CheckpointError, ConfigError
from kdrun.methods.bank import SampleBank
from kdrun.methods.base import EMPTY_STEPS_SKIPPED, UNIT, Batch, StepOutput
from kdrun.methods.self_regulated.accounting import Accounting
from kdrun.methods.self_regulated.rule import masked_reduce, participation_mask

log = logging.getLogger("kdrun")

#: the teacher's initialisation uses seed + TEACHER_SEED_OFFSET (the student: seed + 0)
TEACHER_SEED_OFFSET = 1000
MODEL_CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


class SelfRegulatedTeacher(Accounting):
    """The ``self_regulated`` teacher stage: CE under the participation rule, counting each
    sample's participations (significance ``s``, bank ``significance``)."""

    name = "self_regulated"
    ranges = {"beta": UNIT}
    counts_name: ClassVar[str] = "significance"

    def __init__(
        self,
        *,
        num_classes: int,
        num_samples: int,
        beta: float = 0.9,
        reduction: Literal["batch", "participants"] = "batch",
    ) -> None:
        super().__init__(num_classes=num_classes, num_samples=num_samples)
        self.beta, self.reduction = float(beta), reduction
        self.significance = SampleBank(num_samples, dtype="int32")

    @property
    def counts(self) -> SampleBank:  # type: ignore[override]
        return self.significance

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.x)
        ce = F.cross_entropy(logits.float(), batch.y, reduction="none")
        return rule_step(self, logits, batch, ce, {"ce": ce.mean().detach()})

    def summary(self) -> dict[str, Any]:
        out, hist = self.accounting_summary()
        out["data/significance_hist"] = hist
        out["data/epochs"] = self.completed_epochs
        out["self_regulated/beta"] = self.beta
        out["self_regulated/reduction"] = self.reduction
        out["self_regulated/empty_steps_skipped"] = EMPTY_STEPS_SKIPPED
        return out


def rule_step(
    method: Accounting,
    logits: torch.Tensor,
    batch: Batch,
    per_sample: torch.Tensor,
    logs: dict[str, torch.Tensor],
) -> StepOutput:
    """The step of a method under the participation rule (``method.beta``,
    ``method.reduction``): mask, masked reduction, accounting, ``weight`` = participants."""
    mask = participation_mask(logits, batch.y, method.beta)
    loss, participants = masked_reduce(per_sample, mask, method.reduction)
    method.record(batch.index, mask, participants)
    logs["participation"] = mask.float().mean()
    return StepOutput(
        loss=loss,
        logits=logits,
        logs=logs,
        weight=mask.sum(),
        loss_is_global=method.reduction == "participants",
    )


def teacher_settings(beta: float, reduction: str) -> dict[str, Any]:
    """The method part of the teacher stage's cache key: teacher knobs only."""
    return {
        "stage": "self_regulated",
        "beta": beta,
        "reduction": reduction,
        "seed_offset": TEACHER_SEED_OFFSET,
        "empty_steps": "skipped" if EMPTY_STEPS_SKIPPED else "zero_gradient",
    }


def teacher_model_path(name: str) -> Path:
    """``conf/model/<name>.yaml``; a :class:`ConfigError` naming the options if there is none."""
    path = MODEL_CONF / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in MODEL_CONF.glob("*.yaml")))
        raise ConfigError(f"method.teacher_model={name!r} is not a model option; one of {options}")
    return path


def teacher_model_cfg(name: str | None) -> DictConfig | None:
    """The model config of ``method.teacher_model`` (None: the student's architecture)."""
    if not name:
        return None
    cfg = OmegaConf.load(teacher_model_path(name))
    assert isinstance(cfg, DictConfig)
    return cfg


def load_significance(path: str | Path) -> tuple[torch.Tensor | None, int | None]:
    """``(counts [N] int64, E_T)`` from a ``significance.pt`` or from a checkpoint that holds the
    teacher stage's method state (stage ``last.ckpt``, cache entry); ``(None, None)`` if the file
    has no counts."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"significance source {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read significance counts from {path} ({reason})") from None
    if not isinstance(state, dict):
        return None, None
    if "significance" in state and torch.is_tensor(state["significance"]):
        epochs = state.get("epochs")
        return state["significance"].to(torch.int64), int(epochs) if epochs else None
    method_state = state.get("method")
    if isinstance(method_state, dict) and "significance.values" in method_state:
        extra = method_state.get("_extra_state") or {}
        epochs = extra.get("teacher_epochs") or extra.get("completed_epochs") or extra.get("epochs")
        return method_state["significance.values"].to(torch.int64), int(epochs) if epochs else None
    return None, None


def obtain_teacher(student, runner) -> tuple[nn.Module, torch.Tensor | None, int | None, str]:
    """``(teacher, counts, E_T, source)`` for ``student``: its ``teacher_ckpt`` (counts from
    ``significance_file`` or the checkpoint, ``None`` when neither has them) or the trained,
    resumed or cached teacher stage (counts from the stage's method state)."""
    model_cfg = teacher_model_cfg(student.teacher_model)
    if student.teacher_ckpt:
        teacher = runner.load_model(student.teacher_ckpt, model_cfg)
        for path in filter(None, (student.significance_file, student.teacher_ckpt)):
            counts, epochs = load_significance(path)
            if counts is not None:
                return teacher, counts, epochs, str(path)
            if path == student.significance_file:
                raise ConfigError(
                    f"method.significance_file={path} holds no significance counts "
                    "(expected a significance.pt or a teacher-stage checkpoint)"
                )
        return teacher, None, None, ""
    if student.significance_file:
        log.warning("method.significance_file is used only with teacher_ckpt: ignored")
    stage = SelfRegulatedTeacher(
        num_classes=student.num_classes,
        num_samples=student.num_samples,
        beta=student.teacher_beta,
        reduction=student.teacher_reduction,
    )
    result = runner.run_stage(
        "teacher",
        stage,
        method_settings=teacher_settings(student.teacher_beta, student.teacher_reduction),
        model_cfg=model_cfg,
        epochs=student.teacher_epochs,
        seed_offset=TEACHER_SEED_OFFSET,
    )
    if stage.completed_epochs == 0:
        raise CheckpointError(
            "the cached self-regulated teacher stage has no significance counts (an entry "
            "written before the cache stored method state): delete teacher-*.pt under "
            "paths.teacher_cache or pass method.teacher_ckpt with method.significance_file"
        )
    return result.model, stage.significance.values, stage.completed_epochs, "stage"
