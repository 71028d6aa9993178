"""Self-regulated distillation family (Mishra & Sundaram, "Knowledge distillation via
self-regulation", arXiv 2102.07125; METHODS.md §3 and §6): ``method=kd``, ``significance``,
``regulated``, ``hybrid``.

The paper states the rules but not its thresholds, weight normalisation or tables; every default
marked **[reconstructed]** below is METHODS.md's reconstruction and is a knob.

Participation rule (self-regulation)
====================================
A sample takes part in the update only if the model misclassifies it or is not confident enough::

    m_i = 1  if  argmax_c p_i[c] != y_i  or  p_i[y_i] < beta      else 0       (p = softmax(z))

computed from the same forward pass as the loss (detached, fp32 math). With ``beta >= 0.5`` it
reduces to ``p_i[y_i] < beta`` (a correct argmax with ``p[y] < 0.5`` is already below ``beta``;
``p[y] >= 0.5`` forces a correct argmax). Default ``beta = 0.9`` **[reconstructed]**.
:func:`participation_mask` is the rule.

Loss reduction (:func:`masked_reduce`), ``reduction`` knob:

* ``batch`` (default **[reconstructed]**): ``sum_i m_i l_i / B`` (``B`` the local batch);
* ``participants``: ``sum_i m_i l_i / sum_i m_i`` — the *global* number of participants under DDP
  (one scalar all-reduce; the local sum is scaled by the world size so DDP's gradient average
  gives the exact global mean); 0 when no sample takes part.

The mask is applied with ``torch.where`` (not a product), so an infinite per-sample loss of a
non-participant cannot turn the sum into NaN.

A step with no participant: the loss is exactly 0 and every gradient exactly 0 (no host sync is
needed for that). The step reports ``StepOutput.weight = number of local participants``; an engine
that honours it (``Trainer.skips_empty_steps``: the global weight is 0 -> parameters and optimizer
state are restored, no sync) performs no update at all. An engine that does not would still let
SGD momentum and weight decay move the weights on such a step. Which of the two was in force is
part of the teacher's cache key (``empty_steps`` in its ``method_settings``) and of the summary
(``self_regulated/empty_steps_skipped``). BatchNorm running statistics always see the batch (the
mask is known only after the forward pass). Empty steps are counted (``data/empty_steps``).

Stage 1 — the self-regulated teacher (:class:`SelfRegulatedTeacher`)
====================================================================
Trained with CE under the participation rule (knobs ``teacher_beta`` = 0.9, ``teacher_reduction``
= ``batch`` on the students). It counts per sample how often it took part — the *significance*
``s_i`` in ``{0..E_T}`` — in an int32 :class:`~kdrun.methods.bank.SampleBank` (``add`` with the
mask; under DDP ``add`` all-gathers so every rank holds every count). Architecture: the student's
(``teacher_model: null``) or a named ``conf/model`` option (``teacher_model: resnet18``; METHODS.md
spells it ``method.teacher.model``); epochs ``E_T``: the student's (``teacher_epochs: null``) or
``teacher_epochs``; init seed offset 1000; the rest of the recipe (optimizer, schedule, batch
size, data order, seed) is the student's.

The stage runs through ``runner.run_stage("teacher", SelfRegulatedTeacher(...),
method_settings={"stage": "self_regulated", "beta", "reduction", "seed_offset", "empty_steps"},
model_cfg=..., epochs=...)``. No student knob (``alpha``, ``T``, ``normalize``, the student's
``beta``/``reduction``) is in the key, and the key does not name the student class: the four
methods share one teacher per (recipe, seed, teacher knobs), and a sweep over student knobs trains
it once. The counts reach the student through the stage method object: the runner trains it (the
bank is filled), resumes it from the stage checkpoint (the bank is in the checkpoint), or loads it
from the cache entry (``StageRunner`` stores ``method.state_dict()`` in the entry and loads it on a
hit). A cache entry without method state (written by an older kdrun) is an error naming the file.

``method.teacher_ckpt=PATH`` skips the stage (``runner.load_model(PATH, teacher_model cfg)``). The
counts then come from ``method.significance_file=FILE`` if given — a ``significance.pt`` written
by any run of this family (see below) — else from ``PATH`` itself when it holds the stage method's
state: the stage's ``<run>/teacher/checkpoints/last.ckpt`` or a cache entry
``<paths.teacher_cache>/teacher-<key>.pt``. ``significance``/``hybrid`` fail with a clear error
when neither has them; ``kd``/``regulated`` train without (no teacher accounting then).

Students (stage 2; the engine's main training)
==============================================
Per-sample loss with the frozen teacher (eval mode, ``no_grad``, same augmented batch)::

    L_i = alpha * KD_T(z_s, z_t)_i + (1 - alpha) * CE(z_s, y)_i
    KD_T = T^2 * KL(softmax(z_t/T) || softmax(z_s/T))  (sum over classes, per sample)

defaults ``alpha = 0.9``, ``T = 4`` **[reconstructed]**.

* ``kd`` (:class:`KDStudent`) — control: ``loss = mean_i L_i``.
* ``significance`` (:class:`SignificanceStudent`) — ``loss = mean_i w_i L_i`` with ``w_i = s_i /
  D``; ``normalize`` (**[reconstructed]** default ``mean_nonzero``): ``mean_nonzero`` ``D =
  mean_{j: s_j > 0} s_j`` (mean weight 1 over the kept samples), ``epochs`` ``D = E_T``, ``max``
  ``D = max_j s_j``. Samples with ``s_i = 0`` are removed from the training set: the batch sampler
  (:class:`SubsetBatchSampler`) draws the global batches from the kept indices only (a permutation
  of the kept set per epoch, deterministic in ``(seed, epoch)``, sliced per rank like the default
  sampler), so an epoch has ``ceil(K / B)`` steps for ``K`` kept samples.
* ``regulated`` (:class:`RegulatedStudent`) — the student applies the participation rule to its
  own prediction (true label; knobs ``beta`` = 0.9, ``reduction`` = ``batch``); no significance.
* ``hybrid`` (:class:`HybridStudent`) — both: ``w_i`` and the ``s_i = 0`` filter, then the rule:
  ``loss = reduce(m_i * w_i * L_i)`` (``participants`` divides by the number of participants).

Data-efficiency accounting (METHODS.md §3)
==========================================
Every stage counts per-sample participations in an int32 bank (teacher: ``s``; student: its own
``m``; ``kd``/``significance`` students: every sample they train on). Per epoch (``on_epoch_end``,
one host read; ``teacher/``-prefixed for the stage): ``data/participations`` (this epoch),
``data/participation`` (this epoch / N), ``data/distinct_samples`` (ever taken part, cumulative),
``data/empty_steps`` (cumulative; methods with the rule). Summary: ``data/participations``
(total), ``data/participation`` (total / (N * E)), ``data/distinct_samples``,
``data/participation_hist`` (number of samples per count 0..E), ``data/empty_steps`` (rule
methods), for the significance students ``data/kept_samples`` and ``data/kept_fraction``; and the
teacher's ``teacher/data/participations``,
``teacher/data/participation`` (/ (N * E_T)), ``teacher/data/distinct_samples``,
``teacher/data/significance_hist`` (samples per ``s`` = 0..E_T), ``teacher/data/epochs``.
``N`` is the whole training set, so the students' figures measure data use against it.

Files written by :meth:`prepare` into the run dir (main rank): ``plots/significance_hist.png``
and ``.json`` (the teacher's significance histogram) and ``significance.pt`` (``{"significance":
int32 [N], "epochs": E_T, "num_samples": N, "beta", "reduction"}``; reusable as
``method.significance_file``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun import distributed
from kdrun.data.samplers import BatchSampler
from kdrun.errors import CheckpointError, ConfigError
from kdrun.methods.bank import SampleBank
from kdrun.methods.base import POSITIVE, UNIT, Batch, Method, Range, StepOutput, kd_loss

log = logging.getLogger("kdrun")

#: the teacher's initialisation uses seed + TEACHER_SEED_OFFSET (the student: seed + 0)
TEACHER_SEED_OFFSET = 1000
NORMALIZATIONS = ("mean_nonzero", "epochs", "max")
MODEL_CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


# ----- the rule and the reduction -------------------------------------------------------------
def participation_mask(logits: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """``m_i = argmax p_i != y_i or p_i[y_i] < beta`` (bool ``[B]``; detached, fp32 softmax)."""
    z = logits.detach().float()
    p_true = z.softmax(dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return (z.argmax(dim=-1) != targets) | (p_true < beta)


def masked_reduce(
    per_sample: torch.Tensor, mask: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, participants)``: the masked sum over the batch size (``batch``) or over the number
    of participants (``participants``, 0 when none); ``participants`` is the global count (0-d
    float, summed over DDP ranks). No host sync."""
    masked = torch.where(mask, per_sample, torch.zeros_like(per_sample))
    participants = distributed.all_reduce_sum(mask.sum().to(torch.float32))
    if reduction == "batch":
        loss = masked.sum() / max(per_sample.shape[0], 1)
    else:
        loss = masked.sum() * float(distributed.world_size()) / participants.clamp(min=1.0)
    return loss, participants


def significance_weights(
    counts: torch.Tensor, normalize: str, teacher_epochs: int
) -> tuple[torch.Tensor, float]:
    """``(w, D)`` with ``w = s / D`` (fp32 ``[N]``) for ``normalize`` (see the module docstring)."""
    s = counts.to(torch.float64)
    if normalize == "mean_nonzero":
        nonzero = s[s > 0]
        denom = float(nonzero.mean()) if nonzero.numel() else 1.0
    elif normalize == "epochs":
        denom = float(max(int(teacher_epochs), 1))
    elif normalize == "max":
        denom = float(s.max()) if s.numel() and float(s.max()) > 0 else 1.0
    else:
        raise ConfigError(f"method.normalize={normalize!r} must be one of {NORMALIZATIONS}")
    return (s / denom).to(torch.float32), denom


def count_stats(counts: torch.Tensor, epochs: int) -> dict[str, Any]:
    """Accounting figures of per-sample participation ``counts`` over ``epochs`` epochs."""
    counts = counts.detach().to("cpu", torch.int64)
    n, epochs = counts.numel(), max(int(epochs), 1)
    total = int(counts.sum())
    top = max(epochs, int(counts.max()) if n else 0)
    return {
        "participations": total,
        "participation": total / max(n * epochs, 1),
        "distinct_samples": int((counts > 0).sum()),
        "hist": torch.bincount(counts.clamp(min=0), minlength=top + 1).tolist(),
    }


# ----- batches over the kept samples ----------------------------------------------------------
class SubsetBatchSampler(BatchSampler):
    """Shuffled global batches over ``indices`` only (a permutation of the subset per epoch,
    deterministic in ``(seed, epoch)``), sliced per rank like :class:`BatchSampler`."""

    def __init__(
        self,
        indices: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(
            int(indices.numel()),
            batch_size,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )
        self.indices = indices.detach().to("cpu", torch.int64).flatten()

    def global_batches(self) -> list[torch.Tensor]:
        return [self.indices[b] for b in super().global_batches()]


# ----- shared accounting ----------------------------------------------------------------------
class _Accounting(Method):
    """Per-sample participation counts (``self.counts``), per-epoch figures, empty steps."""

    #: the participation rule is applied (so steps can be empty)
    uses_rule: ClassVar[bool] = True

    def __init__(self, *, num_classes: int, num_samples: int) -> None:
        super().__init__(num_classes=num_classes, num_samples=num_samples)
        self.register_buffer("empty_steps", torch.zeros((), dtype=torch.int64))
        self.completed_epochs = 0
        self._counted = 0  # participations at the end of the last finished epoch

    counts: SampleBank  # set by the subclass
    counts_name: ClassVar[str] = "participation"

    @torch.no_grad()
    def _record(self, index: torch.Tensor, mask: torch.Tensor, participants: torch.Tensor | None):
        self.counts.add(index, mask.to(torch.int32))
        if participants is not None:
            self.empty_steps += (participants == 0).to(torch.int64)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        self.completed_epochs = int(epoch) + 1
        self.counts.check_consistent(self.counts_name)
        total = int(self.counts.values.sum())
        this_epoch, self._counted = total - self._counted, total
        out = {
            "data/participations": float(this_epoch),
            "data/participation": this_epoch / max(self.num_samples, 1),
            "data/distinct_samples": float(int((self.counts.values > 0).sum())),
        }
        if self.uses_rule:
            out["data/empty_steps"] = float(int(self.empty_steps))
        return out

    def _accounting_summary(self) -> tuple[dict[str, Any], list[int]]:
        stats = count_stats(self.counts.values, self.completed_epochs or self.epochs)
        out = {
            "data/participations": stats["participations"],
            "data/participation": stats["participation"],
            "data/distinct_samples": stats["distinct_samples"],
        }
        if self.uses_rule:
            out["data/empty_steps"] = int(self.empty_steps)
        return out, stats["hist"]

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "completed_epochs": self.completed_epochs,
            "counted": self._counted,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.completed_epochs = int(state.get("completed_epochs", 0))
        self._counted = int(state.get("counted", 0))


def _engine_skips_empty_steps() -> bool:
    from kdrun.engine import Trainer

    return bool(getattr(Trainer, "skips_empty_steps", False))


# ----- stage 1 --------------------------------------------------------------------------------
class SelfRegulatedTeacher(_Accounting):
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
        mask = participation_mask(logits, batch.y, self.beta)
        ce = F.cross_entropy(logits.float(), batch.y, reduction="none")
        loss, participants = masked_reduce(ce, mask, self.reduction)
        self._record(batch.index, mask, participants)
        logs = {"ce": ce.mean().detach(), "participation": mask.float().mean()}
        return StepOutput(
            loss=loss,
            logits=logits,
            logs=logs,
            weight=mask.sum(),
            loss_is_global=self.reduction == "participants",
        )

    def summary(self) -> dict[str, Any]:
        out, hist = self._accounting_summary()
        out["data/significance_hist"] = hist
        out["data/epochs"] = self.completed_epochs
        out["self_regulated/beta"] = self.beta
        out["self_regulated/reduction"] = self.reduction
        out["self_regulated/empty_steps_skipped"] = _engine_skips_empty_steps()
        return out


def _teacher_model_path(name: str) -> Path:
    """``conf/model/<name>.yaml``; a :class:`ConfigError` naming the options if there is none."""
    path = MODEL_CONF / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in MODEL_CONF.glob("*.yaml")))
        raise ConfigError(f"method.teacher_model={name!r} is not a model option; one of {options}")
    return path


def _model_cfg(name: str | None) -> DictConfig | None:
    if not name:
        return None
    cfg = OmegaConf.load(_teacher_model_path(name))
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


# ----- stage 2 --------------------------------------------------------------------------------
class _Student(_Accounting):
    """Shared by the four students: the teacher stage, the per-sample KD loss, accounting."""

    uses_significance: ClassVar[bool] = False
    uses_rule: ClassVar[bool] = False
    ranges = {"alpha": UNIT, "T": POSITIVE, "teacher_beta": UNIT, "teacher_epochs": Range(1, None)}

    def __init__(
        self,
        *,
        num_classes: int,
        num_samples: int,
        alpha: float,
        T: float,
        teacher_beta: float,
        teacher_reduction: str,
        teacher_epochs: int | None,
        teacher_model: str | None,
        teacher_ckpt: str | None,
        significance_file: str | None,
        beta: float = 0.9,
        reduction: str = "batch",
        normalize: str = "mean_nonzero",
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
            _teacher_model_path(str(knobs["teacher_model"]))

    @property
    def counts(self) -> SampleBank:  # type: ignore[override]
        return self.participation

    # ----- stage 1 ------------------------------------------------------------------------------
    def teacher_settings(self) -> dict[str, Any]:
        """The method part of the teacher's cache key: teacher knobs only."""
        return {
            "stage": "self_regulated",
            "beta": self.teacher_beta,
            "reduction": self.teacher_reduction,
            "seed_offset": TEACHER_SEED_OFFSET,
            "empty_steps": "skipped" if _engine_skips_empty_steps() else "zero_gradient",
        }

    def prepare(self, runner) -> None:
        """Train/reuse the self-regulated teacher stage (or load ``teacher_ckpt``), take its
        significance counts, write the histogram plot and ``significance.pt``."""
        model_cfg = _model_cfg(self.teacher_model)
        counts: torch.Tensor | None = None
        epochs: int | None = None
        source = ""
        if self.teacher_ckpt:
            teacher = runner.load_model(self.teacher_ckpt, model_cfg)
            for path in filter(None, (self.significance_file, self.teacher_ckpt)):
                counts, epochs = load_significance(path)
                if counts is not None:
                    source = str(path)
                    break
                if path == self.significance_file:
                    raise ConfigError(
                        f"method.significance_file={path} holds no significance counts "
                        "(expected a significance.pt or a teacher-stage checkpoint)"
                    )
        else:
            if self.significance_file:
                log.warning("method.significance_file is used only with teacher_ckpt: ignored")
            stage = SelfRegulatedTeacher(
                num_classes=self.num_classes,
                num_samples=self.num_samples,
                beta=self.teacher_beta,
                reduction=self.teacher_reduction,
            )
            teacher = runner.run_stage(
                "teacher",
                stage,
                method_settings=self.teacher_settings(),
                model_cfg=model_cfg,
                epochs=self.teacher_epochs,
                seed_offset=TEACHER_SEED_OFFSET,
            )
            if stage.completed_epochs == 0:
                raise CheckpointError(
                    "the cached self-regulated teacher stage has no significance counts (an entry "
                    f"written before the cache stored method state): delete teacher-*.pt under "
                    f"{runner.cache_dir} or pass method.teacher_ckpt with method.significance_file"
                )
            counts, epochs, source = stage.significance.values, stage.completed_epochs, "stage"
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
        ctx = getattr(runner, "ctx", None)
        if ctx is not None and ctx.is_main:
            self._write_files(Path(ctx.run_dir), counts, ctx.logger, runner.step_offset, source)

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

    def _write_files(self, run_dir: Path, counts: torch.Tensor, logger, step: int, source: str):
        stats = self.teacher_stats or {}
        data = {
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
        try:
            from kdrun import checkpoint as ckpt

            ckpt.atomic_save(
                {
                    "significance": counts.to(torch.int32),
                    "epochs": self.teacher_trained_epochs,
                    "num_samples": self.num_samples,
                    "beta": self.teacher_beta,
                    "reduction": self.teacher_reduction,
                },
                run_dir / "significance.pt",
            )
            png = run_dir / "plots" / "significance_hist.png"
            save_significance_hist(data, png, png.with_suffix(".json"))
            logger.log_image("plots/significance_hist", png, step=step)
        except Exception as exc:  # an output file never kills training
            log.warning("significance files failed: %s", exc)

    # ----- stage 2 ------------------------------------------------------------------------------
    def train_batch_sampler(
        self,
        targets: torch.Tensor,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        drop_last: bool,
    ) -> BatchSampler | None:
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
        if self.teacher.training:
            self.teacher.eval()
        with torch.no_grad():
            teacher_logits = self.teacher(batch.x)
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
            mask = participation_mask(logits, batch.y, self.beta)
            loss, participants = masked_reduce(per_sample, mask, self.reduction)
            self._record(batch.index, mask, participants)
            logs["participation"] = mask.float().mean()
            return StepOutput(
                loss=loss,
                logits=logits,
                logs=logs,
                weight=mask.sum(),
                loss_is_global=self.reduction == "participants",
            )
        self._record(batch.index, torch.ones_like(batch.y, dtype=torch.bool), None)
        return StepOutput(loss=per_sample.mean(), logits=logits, logs=logs)

    def summary(self) -> dict[str, Any]:
        out, hist = self._accounting_summary()
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
            out["self_regulated/empty_steps_skipped"] = _engine_skips_empty_steps()
        out[prefix + "teacher_ckpt"] = self.teacher_ckpt
        return out

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "teacher_epochs": self.teacher_trained_epochs}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.teacher_trained_epochs = int(state.get("teacher_epochs", 0))


class KDStudent(_Student):
    """``kd``: plain distillation from the self-regulated teacher (the control)."""

    name = "kd"

    def __init__(
        self,
        *,
        num_classes: int,
        num_samples: int,
        alpha: float = 0.9,
        T: float = 4.0,
        teacher_beta: float = 0.9,
        teacher_reduction: Literal["batch", "participants"] = "batch",
        teacher_epochs: int | None = None,
        teacher_model: str | None = None,
        teacher_ckpt: str | None = None,
        significance_file: str | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            num_samples=num_samples,
            alpha=alpha,
            T=T,
            teacher_beta=teacher_beta,
            teacher_reduction=teacher_reduction,
            teacher_epochs=teacher_epochs,
            teacher_model=teacher_model,
            teacher_ckpt=teacher_ckpt,
            significance_file=significance_file,
        )


class SignificanceStudent(_Student):
    """``significance``: ``w_i``-weighted KD on the samples with ``s_i > 0`` only."""

    name = "significance"
    uses_significance = True

    def __init__(
        self,
        *,
        num_classes: int,
        num_samples: int,
        alpha: float = 0.9,
        T: float = 4.0,
        normalize: Literal["mean_nonzero", "epochs", "max"] = "mean_nonzero",
        teacher_beta: float = 0.9,
        teacher_reduction: Literal["batch", "participants"] = "batch",
        teacher_epochs: int | None = None,
        teacher_model: str | None = None,
        teacher_ckpt: str | None = None,
        significance_file: str | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            num_samples=num_samples,
            alpha=alpha,
            T=T,
            normalize=normalize,
            teacher_beta=teacher_beta,
            teacher_reduction=teacher_reduction,
            teacher_epochs=teacher_epochs,
            teacher_model=teacher_model,
            teacher_ckpt=teacher_ckpt,
            significance_file=significance_file,
        )


class RegulatedStudent(_Student):
    """``regulated``: KD under the student's own participation rule (no significance)."""

    name = "regulated"
    uses_rule = True
    ranges = {**_Student.ranges, "beta": UNIT}

    def __init__(
        self,
        *,
        num_classes: int,
        num_samples: int,
        alpha: float = 0.9,
        T: float = 4.0,
        beta: float = 0.9,
        reduction: Literal["batch", "participants"] = "batch",
        teacher_beta: float = 0.9,
        teacher_reduction: Literal["batch", "participants"] = "batch",
        teacher_epochs: int | None = None,
        teacher_model: str | None = None,
        teacher_ckpt: str | None = None,
        significance_file: str | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            num_samples=num_samples,
            alpha=alpha,
            T=T,
            beta=beta,
            reduction=reduction,
            teacher_beta=teacher_beta,
            teacher_reduction=teacher_reduction,
            teacher_epochs=teacher_epochs,
            teacher_model=teacher_model,
            teacher_ckpt=teacher_ckpt,
            significance_file=significance_file,
        )


class HybridStudent(_Student):
    """``hybrid``: significance weights and filter, then the student's participation rule."""

    name = "hybrid"
    uses_significance = True
    uses_rule = True
    ranges = {**_Student.ranges, "beta": UNIT}

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
        super().__init__(
            num_classes=num_classes,
            num_samples=num_samples,
            alpha=alpha,
            T=T,
            normalize=normalize,
            beta=beta,
            reduction=reduction,
            teacher_beta=teacher_beta,
            teacher_reduction=teacher_reduction,
            teacher_epochs=teacher_epochs,
            teacher_model=teacher_model,
            teacher_ckpt=teacher_ckpt,
            significance_file=significance_file,
        )


# ----- plot -----------------------------------------------------------------------------------
def save_significance_hist(data: dict[str, Any], png_path: Path, json_path: Path) -> None:
    """Bar chart of the number of training samples per significance value ``s = 0..E_T`` (PNG)
    and its data (JSON), each written to a temporary name and renamed into place."""
    from kdrun.atomic import atomic_write, atomic_write_json

    atomic_write_json(json_path, data, indent=1)

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values, counts = data["values"], data["counts"]
    fig = Figure(figsize=(6, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = ["#C44E52" if v == 0 else "#4C72B0" for v in values]
    ax.bar(values, counts, width=0.8, color=colors, edgecolor="#1f3b63", lw=0.6)
    ax.set_xlabel(f"significance s (participations in {data['epochs']} teacher epochs)")
    ax.set_ylabel("training samples")
    n = max(int(data["num_samples"]), 1)
    ax.set_title(
        f"teacher significance (beta={data['beta']:g}, {data['reduction']}): "
        f"{data['distinct_samples']}/{n} samples used, "
        f"{100 * data['participation']:.1f}% of N*E"
    )
    ax.title.set_fontsize(9)
    if len(values) <= 30:
        ax.set_xticks(values)
    atomic_write(png_path, lambda p: fig.savefig(p, format="png"))
