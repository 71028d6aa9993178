"""Model selection and the final test evaluation, as a callback (:mod:`kdrun.callbacks`).

The evaluation protocol (keys carry the stage prefix, e.g. ``teacher/``):

* With a validation split: every scheduled evaluation runs on it and is logged ``val/*``;
  ``eval.monitor`` (``val/<metric>``, see :func:`kdrun.evaluation.monitor_metric`) selects a
  model, exported to ``checkpoints/best.ckpt`` with its epoch, the monitor and the monitored
  value; the running selection is logged ``val/<metric>_best`` / ``val/<metric>_best_epoch``
  (first epoch on ties). After the last epoch the test set is evaluated once for the last model
  (``test/*``) and once for the selected one, loaded from ``best.ckpt`` into a copy of the
  evaluated model (``test_at_best/*``). No ``test/*`` key is logged before the last epoch.
* Without one: every evaluation runs on the test set (``test/*``), nothing is selected and no
  ``best.ckpt`` is written; the highest test accuracy so far is ``test/acc1_max`` /
  ``test/acc1_max_epoch`` — a test-selected figure, never called "best" and never used.
* Either way ``checkpoints/final.ckpt`` holds the evaluated model after the last epoch.

The selection state (``best_value``, ``best_epoch``) travels in the trainer's checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from kdrun import checkpoint as ckpt
from kdrun import distributed
from kdrun.callbacks import Callback
from kdrun.evaluation import monitor_metric

log = logging.getLogger("kdrun")


class ModelSelection(Callback):
    def __init__(self, monitor: str) -> None:
        self.monitor_key = monitor
        self.monitor, self.higher_is_better = monitor_metric(monitor)
        self.best_value: float | None = None
        self.best_epoch = -1

    # ----- events -----------------------------------------------------------------------------
    def on_evaluate(
        self, trainer: Any, split: str, metrics: Mapping[str, float], figures: dict
    ) -> None:
        validation = split == "val"
        value = metrics[self.monitor] if validation else metrics["acc1"]
        if self._improves(value):
            self.best_value, self.best_epoch = value, trainer.epoch
            if validation:
                self._save_best(trainer, figures)
        p = trainer.prefix
        key = f"{p}val/{self.monitor}_best" if validation else f"{p}test/acc1_max"
        figures[key] = self.best_value if self.best_value is not None else math.nan
        figures[f"{key}_epoch"] = self.best_epoch
        if validation and trainer.epoch == trainer.settings.epochs:
            figures.update(self._final_test(trainer))

    def on_fit_end(self, trainer: Any) -> None:
        """``final.ckpt``: the evaluated model after the last epoch (what ``test/*`` measured
        with a validation split, and the model to take without one)."""
        export_model(trainer, "final.ckpt", metrics=trainer.last_eval)

    # ----- checkpointed state -------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.best_epoch = int(state.get("best_epoch", -1))
        best = state.get("best_value", state.get("best_acc1"))  # best_acc1: older checkpoints
        self.best_value = None if best is None or self.best_epoch < 0 else float(best)

    # ----- helpers ------------------------------------------------------------------------------
    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.higher_is_better else value < self.best_value

    def _save_best(self, trainer: Any, figures: Mapping[str, float]) -> None:
        export_model(
            trainer,
            "best.ckpt",
            monitor=self.monitor_key,
            value=self.best_value,
            metrics=dict(figures),
        )

    def _final_test(self, trainer: Any) -> dict[str, float]:
        """``test/*`` of the last model and ``test_at_best/*`` of the one in ``best.ckpt``."""
        p = trainer.prefix
        model = trainer.method.eval_model(trainer.model)
        out = {f"{p}test/{k}": v for k, v in trainer.evaluate_split(model, "test").items()}
        selected = self._selected_model(trainer, model)
        if selected is not None:
            metrics = trainer.evaluate_split(selected, "test", plot=False, label="test_at_best")
            out.update({f"{p}test_at_best/{k}": v for k, v in metrics.items()})
        return out

    def _selected_model(self, trainer: Any, model: nn.Module) -> nn.Module | None:
        """A copy of ``model`` holding the weights of ``best.ckpt`` (None without one)."""
        distributed.barrier()  # rank 0 writes best.ckpt; every rank reads it
        path = trainer.ckpt_dir / "best.ckpt"
        if self.best_epoch < 0 or not path.is_file():
            log.warning(
                "%sno model was selected on %s: no test_at_best/*", trainer.prefix, self.monitor
            )
            return None
        selected = copy.deepcopy(model)
        selected.load_state_dict(ckpt.load(path)["model"])
        return selected


def export_model(trainer: Any, name: str, **fields: Any) -> None:
    """``checkpoints/<name>``: the evaluated model's weights, the epoch and ``fields`` (rank 0)."""
    if trainer.dist.is_main:
        export = trainer.method.eval_model(trainer.model)
        state = {"model": export.state_dict(), "epoch": trainer.epoch, **fields}
        ckpt.atomic_save(state, trainer.ckpt_dir / name)
