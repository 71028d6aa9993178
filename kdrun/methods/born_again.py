"""Born-again networks — sequential self-distillation generations (Furlanello et al., "Born
Again Neural Networks", ICML 2018; docs/methods.md).

Algorithm (``method=born_again``, ``G = generations``)::

    gen 0          : fresh model, trained with CE                              (seed offset 1000)
    gen k (0<k<G)  : fresh model of the same architecture, trained on the frozen gen k-1:
                     loss = (1 - alpha) * CE(z_s, y) + alpha * D(z_s, z_t)     (seed offset 1000+k)

with ``D = KD_T(z_s, z_t) = T^2 KL(softmax(z_t/T) || softmax(z_s/T))`` (``loss: kd``, batch mean,
:func:`~kdrun.methods.base.kd_loss`) or ``D = MSE(p_s, p_t) = sum_c (softmax(z_s)_c -
softmax(z_t)_c)^2`` averaged over the batch (``loss: mse``: squared error between the student's and
the teacher's *probabilities* at temperature 1 — the "fit the previous round's predictions with a
squared loss" setting analysed by Mobahi, Farajtabar & Bartlett, NeurIPS 2020, §6; ``T`` is not
used by ``mse``). The teacher forward runs under ``no_grad`` in eval mode on the same augmented
batch as the student.

The last generation ``G-1`` is the run's main training (done by the engine after
:meth:`BornAgain.prepare`), distilled from generation ``G-2``; with ``generations: 1`` it is plain
CE. Generations ``0..G-2`` are stages ``gen0``, ``gen1``, ... of the
:class:`~kdrun.stages.StageRunner`, so their metrics are logged with the generation index:
``gen0/test/acc1``, ``gen1/test/acc1``, ...; the last generation is the unprefixed ``test/*``. The
summary adds ``born_again/acc1_by_generation`` and ``born_again/ece_by_generation`` (lists in
generation order: the stages' results from ``prepare``, then the main training's, which
:meth:`BornAgain.finish` receives).

Defaults: ``generations = 3``, ``alpha = 1`` (no ground truth for generations > 0, as in the
paper's BAN), ``T = 1``, ``loss = kd``. ``alpha = 1``/``T = 1`` follow the paper (plain KL to the
previous generation's softmax); ``generations = 3`` is **[reconstructed]** (the paper trains
longer sequences; three generations are enough to see the "improves, then degrades" curve). Every
generation uses the same recipe (optimizer, schedule, epochs, batch order: the data order depends
only on the run seed); only the initialisation differs (seed offset ``1000 + k``; the main run's
model uses offset 0).

Cache: every stage's ``method_settings`` contain everything that determines it — generation index,
loss, ``alpha``, ``T`` (for ``kd``), its seed offset, and (nested under ``previous``) the full
settings of the generation it was distilled from — so the cache key chains: ``gen0`` is shared by
every born-again run with the same recipe and seed whatever its ``alpha``/``T``/``loss``, ``gen1``
by runs with the same loss settings, and ``generations: 4`` reuses ``gen0``/``gen1`` of a
``generations: 3`` run. ``generations`` itself is not part of any stage's key. The previous
generation is kept out of the module tree (not checkpointed, not optimised, not DDP-wrapped); on
resume :meth:`prepare` runs again and the runner finds the finished stages in the run dir or the
cache.

Logs: ``train/ce`` and ``train/kd`` (or ``train/mse``): the bare terms before ``alpha``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch.nn.functional as F
from torch import nn

from kdrun.methods.base import (
    POSITIVE,
    UNIT,
    Batch,
    Method,
    Range,
    StageResult,
    StepOutput,
    distillation_step,
)
from kdrun.methods.basic import CrossEntropy

#: seed offset of generation k's initialisation is GEN_SEED_OFFSET + k (main run: 0)
GEN_SEED_OFFSET = 1000


class BornAgainGeneration(Method):
    """One distilled generation (a stage of :class:`BornAgain`): learns from ``teacher``, the
    frozen previous generation, kept out of the module tree."""

    name = "born_again_generation"

    def __init__(
        self,
        *,
        num_classes: int,
        num_samples: int,
        teacher: nn.Module,
        alpha: float,
        T: float,
        loss: str,
    ) -> None:
        super().__init__(num_classes=num_classes, num_samples=num_samples)
        object.__setattr__(self, "teacher", teacher)
        self.alpha, self.T, self.loss = float(alpha), float(T), loss

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        return distillation_step(model, self.teacher, batch, self.alpha, self.T, self.loss)


class BornAgain(Method):
    """``born_again``: ``generations`` sequential self-distillation generations; the engine
    trains the last one. See the module docstring."""

    name = "born_again"
    ranges = {"generations": Range(1, None), "alpha": UNIT, "T": POSITIVE}

    def __init__(
        self,
        *,
        num_classes: int,
        num_samples: int,
        generations: int = 3,
        alpha: float = 1.0,
        T: float = 1.0,
        loss: Literal["kd", "mse"] = "kd",
    ) -> None:
        super().__init__(num_classes=num_classes, num_samples=num_samples)
        self.generations = int(generations)
        self.alpha, self.T, self.loss = float(alpha), float(T), loss
        object.__setattr__(self, "teacher", None)  # generation G-2, set by prepare()
        self.stage_settings: list[dict[str, Any]] = []
        #: final metrics per generation, stages then the main training (unprefixed keys)
        self.generation_metrics: list[Mapping[str, Any]] = []

    # ----- stages ---------------------------------------------------------------------------------
    def generation_settings(self, k: int, previous: dict[str, Any] | None) -> dict[str, Any]:
        """Everything that determines generation ``k`` (the cache key's method part)."""
        settings: dict[str, Any] = {
            "method": "born_again",
            "generation": k,
            "seed_offset": GEN_SEED_OFFSET + k,
        }
        if k == 0:
            settings["loss"] = "ce"
            return settings
        settings.update(loss=self.loss, alpha=self.alpha, previous=previous)
        if self.loss == "kd":
            settings["T"] = self.T
        return settings

    def prepare(self, runner) -> None:
        """Train (or reuse) generations ``0..G-2``; keep ``G-2`` as the frozen teacher."""
        self.stage_settings, self.generation_metrics = [], []
        previous_model: nn.Module | None = None
        previous: dict[str, Any] | None = None
        for k in range(self.generations - 1):
            settings = self.generation_settings(k, previous)
            if k == 0:
                method: Method = CrossEntropy(
                    num_classes=self.num_classes, num_samples=self.num_samples
                )
            else:
                method = BornAgainGeneration(
                    num_classes=self.num_classes,
                    num_samples=self.num_samples,
                    teacher=previous_model,
                    alpha=self.alpha,
                    T=self.T,
                    loss=self.loss,
                )
            stage = runner.run_stage(
                f"gen{k}",
                method,
                method_settings=settings,
                seed_offset=GEN_SEED_OFFSET + k,
            )
            previous_model, previous = stage.model, settings
            self.generation_metrics.append(unprefixed(stage.metrics, f"gen{k}/"))
            self.stage_settings.append(settings)
        object.__setattr__(self, "teacher", previous_model)

    # ----- training -------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        if self.generations == 1:
            logits = model(batch.x)
            loss = F.cross_entropy(logits.float(), batch.y)
            return StepOutput(loss=loss, logits=logits, logs={"ce": loss.detach()})
        if self.teacher is None:
            raise RuntimeError("born_again: prepare(runner) must run before training")
        return distillation_step(model, self.teacher, batch, self.alpha, self.T, self.loss)

    def finish(self, result: StageResult) -> None:
        """The last generation (the main training): its metrics close the per-generation lists."""
        self.generation_metrics.append(dict(result.metrics))

    def summary(self) -> dict[str, Any]:
        acc1 = [metrics.get("test/acc1") for metrics in self.generation_metrics]
        ece = [metrics.get("test/ece") for metrics in self.generation_metrics]
        return {
            "born_again/generations": self.generations,
            "born_again/loss": self.loss,
            "born_again/alpha": self.alpha,
            "born_again/T": self.T,
            "born_again/acc1_by_generation": acc1,
            "born_again/ece_by_generation": ece,
        }


def unprefixed(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``metrics`` keys that start with ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
