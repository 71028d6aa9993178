"""The training loop: ``Trainer.fit`` -> ``train_one_epoch`` / ``evaluate``.

The loop owns what every method shares — autocast, backward, gradient clipping, the optimizer and
scheduler step, DDP wrapping, the epoch's running sums, evaluation — and asks the
:class:`~kdrun.methods.base.Method` only for its loss; it never branches on the method's name.
Everything else is a callback told of the loop's events (:mod:`kdrun.callbacks`): model selection
and the final test (:mod:`kdrun.selection`), logging and plots (:mod:`kdrun.metric_logging`),
checkpoints (:class:`kdrun.checkpoint.Checkpointer`), preemption (:mod:`kdrun.preemption`).

No host synchronisation in a step: running sums stay on the device (:class:`kdrun.meters.Meter`)
and are read at logging intervals and epoch ends, where a NaN/inf loss is found (the run then
stops without a checkpoint, so the last good one stays). Under DDP each rank trains its slice of
the global batch, weighted by the slice's share (:func:`kdrun.distributed.slice_weight`), so any
global batch gives the single-process step. Batch order and augmentation are pure functions of
``(seed, epoch, step)``: a run resumed from any checkpoint continues exactly like an
uninterrupted one (on CPU: bit for bit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdrun import checkpoint as ckpt
from kdrun import distributed
from kdrun.amp import autocast
from kdrun.callbacks import call as notify
from kdrun.callbacks import standard_callbacks
from kdrun.console import Console
from kdrun.data.loaders import build_train_loader, eval_batches
from kdrun.data.samplers import train_sampler
from kdrun.data.spec import Datasets
from kdrun.errors import NonFiniteLossError
from kdrun.evaluation import predict
from kdrun.loggers.base import Logger
from kdrun.meters import Meter
from kdrun.methods.base import Batch, Method, StepOutput
from kdrun.metrics import classification_metrics
from kdrun.optim_step import build_optimizer, step_unless_empty
from kdrun.schedules import Schedule
from kdrun.settings import HardwareSettings, TrainerSettings

log = logging.getLogger("kdrun")


class TrainModule(nn.Module):
    """Model + method as one module, so DDP synchronises the gradients of both (heads too)."""

    def __init__(self, model: nn.Module, method: Method) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> StepOutput:
        return self.method.training_step(self.model, Batch(x, y, index))


class Trainer:
    """Runs one training stage: a model, a method, data, an optimizer recipe."""

    def __init__(
        self,
        *,
        model: nn.Module,
        method: Method,
        data: Datasets,
        optimizer_factory: Callable[..., torch.optim.Optimizer],
        schedule: Schedule,
        settings: TrainerSettings,
        hardware: HardwareSettings,
        seed: int,
        run_dir: Path,
        logger: Logger,
        console: Console,
        prefix: str = "",
        step_offset: int = 0,
        callbacks: list[Any] | None = None,
    ) -> None:
        self.model, self.method, self.data = model, method, data
        self.settings, self.hw, self.seed = settings, hardware, int(seed)
        self.run_dir, self.logger, self.console = Path(run_dir), logger, console
        self.prefix = prefix  # e.g. "teacher/" for the stage of a two-stage method
        self.step_offset = int(step_offset)  # logged step = step_offset + global_step
        self.device = hardware.device
        self.dist = distributed.DistInfo(distributed.rank(), distributed.world_size())
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.callbacks = standard_callbacks(settings) if callbacks is None else list(callbacks)

        method.setup(model)
        model.to(self.device)
        method.to(self.device)
        if hardware.channels_last:
            model.to(memory_format=torch.channels_last)
        self.train_module: nn.Module = self._wrap(TrainModule(model, method))
        params = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
        self.optimizer = build_optimizer(optimizer_factory, params, hardware.amp)
        self.sampler = train_sampler(method, data.train_targets, settings, self.seed, self.dist)
        self.loader = build_train_loader(
            data,
            self.sampler,
            self.device,
            self.seed,
            hardware.loader,
            hardware.num_workers,
            hardware.channels_last,
            settings.limit_train_batches,
        )
        self.steps_per_epoch = max(len(self.loader), 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: schedule(step / self.steps_per_epoch, settings.epochs)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=hardware.amp == "fp16")
        self.meter = Meter(self.device)
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0  # batches done in the current epoch
        self.global_step = 0
        self.last_eval: dict[str, float] = {}  # the latest evaluation's logged figures
        self.history: list[dict[str, float]] = []
        self.train_time_s = 0.0  # accumulated over restarts

    def _wrap(self, module: nn.Module) -> nn.Module:
        """DDP (with synchronised BatchNorm when asked) and ``torch.compile`` as configured."""
        if self.dist.enabled:
            if self.hw.sync_bn:
                module = distributed.convert_sync_batchnorm(module, self.device.type)
                self.model, self.method = module.model, module.method
            module = nn.parallel.DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
                # banks are kept equal by their own gathers and BatchNorm statistics by
                # SyncBatchNorm or once per epoch (_sync_buffers): broadcasting every buffer
                # from rank 0 on each forward would move the whole bank every step
                broadcast_buffers=False,
            )
        return torch.compile(module) if self.hw.compile else module

    @property
    def log_step(self) -> int:
        """The step on the run's axis (stages before this one included)."""
        return self.step_offset + self.global_step

    # ----- checkpoints --------------------------------------------------------------------------
    def state_dict(self, meter_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "log_step": self.log_step,
            "last_eval": dict(self.last_eval),
            "meter": self.meter.state_dict() if meter_state is None else meter_state,
            "train_time_s": self.train_time_s,
            "rng": ckpt.rng_state(),
        }
        for cb in self.callbacks:
            if hasattr(cb, "checkpoint_state"):
                state.update(cb.checkpoint_state())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.last_eval = dict(state.get("last_eval", state.get("last_test", {})))
        self.meter.load_state_dict(state["meter"])
        self.train_time_s = float(state.get("train_time_s", 0.0))
        ckpt.set_rng_state(state["rng"])
        for cb in self.callbacks:
            if hasattr(cb, "restore_state"):
                cb.restore_state(state)

    def save_checkpoint(self) -> None:
        """``last.ckpt`` (every rank calls this: the meter's sums are reduced first)."""
        meter_state = self.meter.state_dict()
        if self.dist.is_main:
            ckpt.save_last(self.state_dict(meter_state), self.ckpt_dir)
        distributed.barrier()

    # ----- loops --------------------------------------------------------------------------------
    def fit(self, resume_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if resume_state is not None:
            self.load_state_dict(resume_state)
            log.info(
                "%sresumed at epoch %d step %d (global step %d)",
                self.prefix,
                self.epoch,
                self.step_in_epoch,
                self.global_step,
            )
        notify(self.callbacks, "on_fit_start", self)
        try:
            while self.epoch < self.settings.epochs:
                record = self.run_epoch()
                notify(self.callbacks, "on_epoch_end", self, record)
            notify(self.callbacks, "on_fit_end", self)
        finally:
            notify(self.callbacks, "on_fit_exit", self)
        return {"train_time_s": self.train_time_s}

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch, then evaluate when due; returns the epoch's record."""
        started = time.perf_counter()
        train_stats = self.train_one_epoch()
        self.train_time_s += time.perf_counter() - started
        self.epoch += 1
        self.step_in_epoch = 0
        p = self.prefix
        record = {"epoch": self.epoch, **{f"{p}train/{k}": v for k, v in train_stats.items()}}
        record.update({f"{p}{k}": v for k, v in self.method.on_epoch_end(self.epoch - 1).items()})
        if self.dist.enabled and not self.hw.sync_bn:  # rank 0's BatchNorm statistics count
            distributed.broadcast_buffers(self.model)
        if self.epoch % self.settings.eval_every == 0 or self.epoch == self.settings.epochs:
            record.update(self.evaluate())
        self.meter.reset()
        self.history.append(record)
        return record

    def train_one_epoch(self) -> dict[str, float]:
        self.loader.set_epoch(self.epoch)
        layouts = self.sampler.epoch_layout() if self.dist.enabled else None
        self.method.on_epoch_start(self.epoch, self.settings.epochs)
        self.train_module.train()
        notify(self.callbacks, "on_epoch_start", self)
        self.console.start_epoch(
            self.epoch, self.settings.epochs, len(self.loader), self.step_in_epoch
        )
        t0 = time.perf_counter()
        try:
            for x, y, index in self.loader.iter_from(self.step_in_epoch):
                out = self.training_step(
                    x, y, index, layouts[self.step_in_epoch] if layouts else None
                )
                targets = out.targets if out.targets is not None else y
                self.meter.update(out, targets)
                self.step_in_epoch += 1
                self.global_step += 1
                notify(self.callbacks, "on_step_end", self, out, targets)
                self.console.advance()
        finally:
            self.console.end_epoch()
        stats = self.meter.read()
        if stats.pop("nonfinite"):
            self.raise_nonfinite()
        stats.pop("steps")
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        stats["epoch_time_s"] = time.perf_counter() - t0
        return stats

    def training_step(self, x, y, index, layout: tuple[int, ...] | None) -> StepOutput:
        """Forward under autocast, backward, (clip), optimizer and scheduler step."""
        with autocast(self.device, self.hw.amp), distributed.batch_layout(layout):
            out: StepOutput = self.train_module(x, y, index)
        self.scaler.scale(self._rank_weighted(out, layout)).backward()
        if self.settings.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = self.optimizer.param_groups[0]["params"]
            nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        if out.weight is None:
            self.scaler.step(self.optimizer)
        else:
            step_unless_empty(self.optimizer, self.scaler, out.weight)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return out

    def _rank_weighted(self, out: StepOutput, layout: tuple[int, ...] | None) -> torch.Tensor:
        """The loss this rank back-propagates (:func:`kdrun.distributed.slice_weight`); a loss
        already normalised over the global batch (``loss_is_global``) is left as is."""
        weight = None if out.loss_is_global else distributed.slice_weight(layout)
        return out.loss if weight is None else out.loss * weight

    def check_finite(self) -> None:
        """Raise if any rank saw a non-finite loss this epoch (one host read)."""
        if bool(distributed.all_reduce_sum(self.meter.nonfinite.double()) > 0):
            self.raise_nonfinite()

    def raise_nonfinite(self) -> None:
        raise NonFiniteLossError(
            f"non-finite loss in epoch {self.epoch + 1} (before global step {self.global_step}); "
            "the last good checkpoint is kept — lower optim.lr or set trainer.grad_clip"
        )

    # ----- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """A scheduled evaluation of the evaluated model (``method.eval_model``) on the
        validation split when there is one, else the test set; callbacks may add figures
        (:mod:`kdrun.selection`: the selection, the final test)."""
        split = "val" if self.data.has_validation else "test"
        metrics = self.evaluate_split(self.method.eval_model(self.model), split)
        figures = {f"{self.prefix}{split}/{k}": v for k, v in metrics.items()}
        notify(self.callbacks, "on_evaluate", self, split, metrics, figures)
        self.last_eval = dict(figures)
        return figures

    def evaluate_split(
        self, model: nn.Module, split: str, plot: bool = True, label: str | None = None
    ) -> dict[str, float]:
        """The metrics of ``model`` on the evaluation split ``split`` (``val`` or ``test``)."""
        s, hw = self.settings, self.hw
        batches = eval_batches(
            self.data,
            split,
            self.device,
            s.eval_batch_size,
            hw.loader,
            hw.num_workers,
            hw.channels_last,
            s.limit_eval_batches,
        )
        logits, labels = predict(model, batches, self.device, hw.amp)
        metrics = classification_metrics(logits, labels, n_bins=s.n_bins)
        if plot:
            notify(self.callbacks, "on_predictions", self, split, logits, labels)
        if self.dist.is_main:
            m, where = metrics, f"{self.prefix}epoch {self.epoch} {label or split}"
            log.info("%s acc1 %.4f nll %.4f ece %.4f", where, m["acc1"], m["nll"], m["ece"])
        return metrics

    def final_metrics(self) -> dict[str, Any]:
        """The figures of the last evaluation, for summary.json (see :mod:`kdrun.selection`)."""
        return dict(self.last_eval)

    def find_callback(self, kind: type) -> Any:
        """The first callback of type ``kind`` (None if absent)."""
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)
