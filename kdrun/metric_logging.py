"""Metric logging and evaluation plots, as callbacks (:mod:`kdrun.callbacks`).

* :class:`MetricLogger` sends every epoch's record to the run's logger at the run's step
  (``trainer.log_step``), and every ``trainer.log_every`` steps the running window of train
  figures (``train_step/*``, ``lr``; the window's one host read happens there).
* :class:`ReliabilityPlots` saves a reliability diagram (PNG + its data as JSON) for each
  evaluation the trainer plots, ``plots/reliability_[<stage>_]<split>``, and logs the image.
  A plot never stops training.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from kdrun.callbacks import Callback
from kdrun.meters import Meter

log = logging.getLogger("kdrun")


class MetricLogger(Callback):
    def __init__(self, log_every: int) -> None:
        self.log_every = int(log_every)
        self.window: Meter | None = None

    def on_epoch_start(self, trainer: Any) -> None:
        if self.window is None:
            self.window = Meter(trainer.device)
        self.window.reset()

    def on_step_end(self, trainer: Any, out: Any, targets: torch.Tensor) -> None:
        self.window.update(out, targets)
        if trainer.global_step % self.log_every == 0:
            self._log_window(trainer)

    def on_epoch_end(self, trainer: Any, record: Mapping[str, Any]) -> None:
        trainer.logger.log_metrics(record, step=trainer.log_step)

    def _log_window(self, trainer: Any) -> None:
        stats = self.window.read()
        self.window.reset()
        if stats.pop("nonfinite"):
            trainer.raise_nonfinite()
        stats.pop("steps")
        p = trainer.prefix
        record = {
            "epoch": trainer.epoch + trainer.step_in_epoch / trainer.steps_per_epoch,
            f"{p}lr": trainer.optimizer.param_groups[0]["lr"],
            **{f"{p}train_step/{k}": v for k, v in stats.items()},
        }
        trainer.logger.log_metrics(record, step=trainer.log_step)
        if not trainer.console.interactive and trainer.dist.is_main:
            log.info(
                "%sepoch %d step %d/%d loss %.4f acc %.4f",
                p,
                trainer.epoch + 1,
                trainer.step_in_epoch,
                trainer.steps_per_epoch,
                stats["loss"],
                stats["acc1"],
            )


class ReliabilityPlots(Callback):
    def __init__(self, n_bins: int) -> None:
        self.n_bins = int(n_bins)

    def on_predictions(
        self, trainer: Any, split: str, logits: torch.Tensor, labels: torch.Tensor
    ) -> None:
        if not trainer.dist.is_main:
            return
        from kdrun.plots import save_reliability_diagram

        p = trainer.prefix
        name = f"reliability_{p.strip('/') + '_' if p else ''}{split}"
        png = trainer.run_dir / "plots" / f"{name}.png"
        try:
            save_reliability_diagram(
                logits,
                labels,
                self.n_bins,
                png,
                png.with_suffix(".json"),
                title=f"{p}{split}, epoch {trainer.epoch}",
            )
            trainer.logger.log_image(f"{p}plots/reliability_{split}", png, step=trainer.log_step)
        except Exception as exc:  # a plot never kills training
            log.warning("reliability diagram failed: %s", exc)
