"""The training engine: ``fit`` -> ``train_one_epoch`` / ``evaluate``.

The engine owns what every method shares — autocast, ``backward``, gradient clipping, the
optimizer and scheduler step, DDP wrapping, metric accumulation, evaluation, logging and
checkpoints — and asks the :class:`~kdrun.methods.base.Method` only for its loss. It never
branches on the method's name.

Host synchronisation: the training step keeps running sums on the device (loss, correct
predictions, sample counts, method logs, a non-finite-loss flag) and reads them only every
``trainer.log_every`` steps and at the end of an epoch. A NaN/inf loss is therefore detected at
the next logging point; the run then stops without writing a checkpoint, so the last good one
stays.

Resumability: a checkpoint records the completed epochs and the batches done in the current
epoch. Batch order and augmentation are pure functions of ``(seed, epoch, step)``, so a run
resumed from any checkpoint continues exactly like an uninterrupted one (on CPU: bit for bit).

Evaluation protocol (``eval_every`` epochs and always after the last one; keys carry the stage
prefix, e.g. ``teacher/``):

* With a validation split (``Datasets.has_validation``): every evaluation runs on it and is
  logged ``val/*``; ``eval.monitor`` (``val/<metric>``; accuracies and AUROC higher-better,
  every other metric lower-better, :func:`monitor_metric`) selects a model, exported to
  ``checkpoints/best.ckpt`` with its epoch, the monitor and the monitored value; the running
  selection is logged ``val/<metric>_best`` / ``val/<metric>_best_epoch`` (first epoch on ties).
  After the last epoch the test set is evaluated once for the last model (``test/*``) and once
  for the selected one, loaded from ``best.ckpt`` into a copy of the evaluated model
  (``test_at_best/*``). No ``test/*`` key is logged before the last epoch.
* Without one: every evaluation runs on the test set (``test/*``), nothing is selected and no
  ``best.ckpt`` is written; the highest test accuracy so far is ``test/acc1_max`` /
  ``test/acc1_max_epoch`` — a test-selected figure, never called "best" and never used.
* Either way ``checkpoints/final.ckpt`` holds the evaluated model after the last epoch, and a
  reliability diagram is saved for every evaluation of the split evaluated per epoch
  (``plots/reliability_val``) and for the test set (``plots/reliability_test``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdrun import checkpoint as ckpt
from kdrun import distributed
from kdrun.callbacks import call as notify
from kdrun.console import Console
from kdrun.data.loaders import build_train_loader, eval_batches
from kdrun.data.samplers import BatchSampler
from kdrun.data.spec import Datasets
from kdrun.errors import ConfigError, NonFiniteLossError
from kdrun.loggers.base import Logger
from kdrun.methods.base import Batch, Method, StepOutput
from kdrun.metrics import METRIC_KEYS, classification_metrics
from kdrun.schedules import Schedule

log = logging.getLogger("kdrun")

#: metrics for which a larger value is better (every other metric: smaller is better)
HIGHER_IS_BETTER = frozenset({"acc1", "acc5", "auroc"})


def monitor_metric(monitor: str) -> tuple[str, bool]:
    """``(metric, higher_is_better)`` of an ``eval.monitor`` value ``val/<metric>``."""
    split, _, metric = str(monitor).partition("/")
    if split != "val" or metric not in METRIC_KEYS:
        raise ConfigError(
            f"eval.monitor={monitor!r} must be val/<metric> with a metric of "
            f"{', '.join(METRIC_KEYS)} (a model is selected on the validation split only)"
        )
    return metric, metric in HIGHER_IS_BETTER


@dataclass
class TrainerSettings:
    epochs: int = 15
    batch_size: int = 64
    eval_every: int = 1
    log_every: int = 50
    limit_train_batches: int | None = None
    limit_eval_batches: int | None = None
    grad_clip: float | None = None
    drop_last: bool = False
    checkpoint_every_steps: int | None = None
    eval_batch_size: int = 512
    n_bins: int = 15
    monitor: str = "val/acc1"  # eval.monitor: selects best.ckpt when a validation split exists


@dataclass
class HardwareSettings:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: str = "off"  # resolved: off | bf16 | fp16
    compile: bool = False
    channels_last: bool = False
    num_workers: int = 2
    loader: str = "device"
    sync_bn: bool = False


class Preempted(Exception):
    """Raised after the checkpoint was written because SIGTERM/SIGUSR1 arrived."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


class _SignalFlag:
    """Records SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)


class TrainModule(nn.Module):
    """Model + method as one module, so DDP synchronises the gradients of both (heads too)."""

    def __init__(self, model: nn.Module, method: Method) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> StepOutput:
        return self.method.training_step(self.model, Batch(x, y, index))


class Meter:
    """Device-side running sums; ``read()`` is the only host sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        z = torch.zeros((), device=self.device, dtype=torch.float64)
        self.loss_sum, self.correct, self.count, self.steps = (
            z.clone(),
            z.clone(),
            z.clone(),
            z.clone(),
        )
        self.nonfinite = torch.zeros((), device=self.device, dtype=torch.bool)
        self.logs: dict[str, torch.Tensor] = {}

    def update(self, out: StepOutput, targets: torch.Tensor) -> None:
        loss = out.loss.detach()
        self.nonfinite |= ~torch.isfinite(loss)
        self.loss_sum += loss.double()
        self.steps += 1
        self.correct += (out.logits.detach().argmax(dim=-1) == targets).sum().double()
        self.count += targets.shape[0]  # a Python scalar: no host-to-device copy
        for key, value in out.logs.items():
            acc = self.logs.get(key)
            v = value.detach().double()
            self.logs[key] = v if acc is None else acc + v

    def read(self, reduce: bool = True) -> dict[str, float]:
        keys = sorted(self.logs)
        stacked = torch.stack(
            [
                self.loss_sum,
                self.correct,
                self.count,
                self.steps,
                self.nonfinite.double(),
                *[self.logs[k] for k in keys],
            ]
        )
        if reduce:
            stacked = distributed.all_reduce_sum(stacked)
        values = stacked.tolist()
        loss_sum, correct, count, steps, nonfinite = values[:5]
        steps = max(steps, 1.0)
        out = {
            "loss": loss_sum / steps,
            "acc1": correct / max(count, 1.0),
            "nonfinite": nonfinite > 0,
            "steps": steps,
        }
        out.update({k: v / steps for k, v in zip(keys, values[5:])})
        return out

    def state_dict(self) -> dict[str, Any]:
        """The running sums of all ranks (summed: called on every rank, one all-reduce), so a
        mid-epoch checkpoint resumes on any number of ranks."""
        keys = sorted(self.logs)
        sums = torch.stack(
            [self.loss_sum, self.correct, self.count, self.steps, *[self.logs[k] for k in keys]]
        )
        sums = distributed.all_reduce_sum(sums)
        return {
            "loss_sum": sums[0],
            "correct": sums[1],
            "count": sums[2],
            "steps": sums[3],
            "logs": dict(zip(keys, sums[4:])),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Rank 0 takes the saved (global) sums, the other ranks start from zero."""
        self.reset()
        if distributed.rank() != 0:
            return
        for key in ("loss_sum", "correct", "count", "steps"):
            setattr(self, key, state[key].to(self.device))
        self.logs = {k: v.to(self.device) for k, v in state["logs"].items()}


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> bf16 on GPUs (and CPUs) with fast bf16, fp16 on other GPUs, else off."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        # native bf16 only (Ampere and newer): emulated bf16 is slower than fp16 + GradScaler
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    try:
        fast_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        fast_bf16 = False
    return "bf16" if fast_bf16 else "off"


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated fp32 logits and labels over ``batches`` (stays on the device)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for x, y in batches:
            with autocast(device, amp):
                z = model(x)
            logits.append(z.float())
            labels.append(y)
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


class Trainer:
    """Runs one training stage: a model, a method, data, an optimizer recipe."""

    #: a step whose ``StepOutput.weight`` sums to 0 over the ranks performs no update
    #: (:meth:`_step_unless_empty`); methods read this to document what happened
    skips_empty_steps = True

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
        plots: bool = True,
        step_offset: int = 0,
    ) -> None:
        self.model, self.method, self.data = model, method, data
        self.settings, self.hw, self.seed = settings, hardware, int(seed)
        self.run_dir, self.logger, self.console = Path(run_dir), logger, console
        self.prefix = prefix  # e.g. "teacher/" for the stage of a two-stage method
        self.step_offset = int(step_offset)  # logged step = step_offset + global_step
        self.plots = plots
        self.device = hardware.device
        self.dist = distributed.DistInfo(distributed.rank(), distributed.world_size())
        self.ckpt_dir = self.run_dir / "checkpoints"

        method.setup(model)
        model.to(self.device)
        method.to(self.device)
        if hardware.channels_last:
            model.to(memory_format=torch.channels_last)
        self.train_module: nn.Module = TrainModule(model, method)
        if self.dist.enabled:
            if hardware.sync_bn:
                self.train_module = distributed.convert_sync_batchnorm(
                    self.train_module, self.device.type
                )
                self.model, self.method = self.train_module.model, self.train_module.method
            self.train_module = nn.parallel.DistributedDataParallel(
                self.train_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
                # banks and other buffers are kept equal by their own gathers (and BatchNorm
                # statistics by SyncBatchNorm or once per epoch, _sync_buffers): broadcasting
                # every buffer from rank 0 on each forward would move the whole bank per step
                broadcast_buffers=False,
            )
        if hardware.compile:
            self.train_module = torch.compile(self.train_module)

        params = [
            p
            for p in list(self.model.parameters()) + list(self.method.parameters())
            if p.requires_grad
        ]
        self.optimizer = self._build_optimizer(optimizer_factory, params)
        sampler = method.train_batch_sampler(
            data.train_targets,
            settings.batch_size,
            self.seed,
            self.dist.rank,
            self.dist.world_size,
            settings.drop_last,
        ) or BatchSampler(
            data.train_targets.shape[0],
            settings.batch_size,
            seed=self.seed,
            drop_last=settings.drop_last,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.sampler = sampler
        self.loader = build_train_loader(
            data,
            sampler,
            self.device,
            self.seed,
            hardware.loader,
            hardware.num_workers,
            hardware.channels_last,
            settings.limit_train_batches,
        )
        self.steps_per_epoch = max(len(self.loader), 1)
        epochs = settings.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: schedule(step / self.steps_per_epoch, epochs)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=hardware.amp == "fp16")
        self.meter = Meter(self.device)
        self.window = Meter(self.device)
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0  # batches done in the current epoch
        self.global_step = 0
        self.has_validation = data.has_validation
        self.monitor, self.higher_is_better = monitor_metric(settings.monitor)
        # the selected epoch (validation) or the epoch of the highest test acc1 (no validation)
        self.best_value: float | None = None
        self.best_epoch = -1
        self.last_eval: dict[str, float] = {}  # the latest evaluation's logged figures
        self.history: list[dict[str, float]] = []
        self.train_time_s = 0.0  # accumulated over restarts
        self.signals = _SignalFlag()
        self.stopper = distributed.StopAgreement()
        #: :mod:`kdrun.callbacks` objects told of the fit's events (chosen by the caller)
        self.callbacks: list[Any] = []

    def _build_optimizer(self, factory: Callable[..., torch.optim.Optimizer], params: list):
        """The optimizer; fused under fp16, where ``GradScaler`` hands a fused optimizer the
        inf/NaN flag on the device (an unfused step reads it on the host every step)."""
        if self.hw.amp == "fp16":
            try:
                return factory(params, fused=True)
            except (TypeError, RuntimeError) as exc:  # an optimizer without a fused variant
                log.warning("fp16: no fused optimizer (%s); each step reads the inf flag", exc)
        return factory(params)

    # ----- checkpoints --------------------------------------------------------------------------
    def state_dict(self, meter_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if meter_state is None:
            meter_state = self.meter.state_dict()
        return {
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "log_step": self.step_offset + self.global_step,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "last_eval": dict(self.last_eval),
            "meter": meter_state,
            "train_time_s": self.train_time_s,
            "rng": ckpt.rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best_epoch = int(state["best_epoch"])
        best = state.get("best_value", state.get("best_acc1"))  # best_acc1: older checkpoints
        self.best_value = None if best is None or self.best_epoch < 0 else float(best)
        self.last_eval = dict(state.get("last_eval", state.get("last_test", {})))
        self.meter.load_state_dict(state["meter"])
        self.train_time_s = float(state.get("train_time_s", 0.0))
        ckpt.set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        meter_state = self.meter.state_dict()  # every rank takes part in its all-reduce
        if self.dist.is_main:
            ckpt.save_last(self.state_dict(meter_state), self.ckpt_dir)
        distributed.barrier()

    def save_best(self, metrics: Mapping[str, float]) -> None:
        """``best.ckpt``: the evaluated model selected on ``eval.monitor`` (validation only)."""
        if self.dist.is_main:
            export = self.method.eval_model(self.model)
            ckpt.atomic_save(
                {
                    "model": export.state_dict(),
                    "epoch": self.epoch,
                    "monitor": self.settings.monitor,
                    "value": self.best_value,
                    "metrics": dict(metrics),
                },
                self.ckpt_dir / "best.ckpt",
            )

    def save_final(self) -> None:
        """``final.ckpt``: the evaluated model after the last epoch (what ``test/*`` measured
        with a validation split, and the model to take without one)."""
        if self.dist.is_main:
            export = self.method.eval_model(self.model)
            ckpt.atomic_save(
                {"model": export.state_dict(), "epoch": self.epoch, "metrics": self.last_eval},
                self.ckpt_dir / "final.ckpt",
            )

    # ----- loops --------------------------------------------------------------------------------
    def fit(self, resume_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
        s = self.settings
        if resume_state is not None:
            self.load_state_dict(resume_state)
            log.info(
                "%sresumed at epoch %d step %d (global step %d)",
                self.prefix,
                self.epoch,
                self.step_in_epoch,
                self.global_step,
            )
        self.signals.install()
        notify(self.callbacks, "on_fit_start", self)
        try:
            while self.epoch < s.epochs:
                started = time.perf_counter()
                train_stats = self.train_one_epoch()
                self.train_time_s += time.perf_counter() - started
                self.epoch += 1
                self.step_in_epoch = 0
                record = {
                    "epoch": self.epoch,
                    **{f"{self.prefix}train/{k}": v for k, v in train_stats.items()},
                }
                record.update(
                    {
                        f"{self.prefix}{k}": v
                        for k, v in self.method.on_epoch_end(self.epoch - 1).items()
                    }
                )
                self._sync_buffers()
                if self.epoch % s.eval_every == 0 or self.epoch == s.epochs:
                    record.update(self.evaluate())
                self.meter.reset()
                self.logger.log_metrics(record, step=self.step_offset + self.global_step)
                self.history.append(record)
                self.save_checkpoint()
                notify(self.callbacks, "on_epoch_end", self, record)
            self.save_final()
            self.stopper.close()
            notify(self.callbacks, "on_fit_end", self)
        finally:
            self.signals.restore()
        return {"train_time_s": self.train_time_s}

    def train_one_epoch(self) -> dict[str, float]:
        s, hw = self.settings, self.hw
        self.loader.set_epoch(self.epoch)
        layouts = self._epoch_layouts()
        self.method.on_epoch_start(self.epoch, s.epochs)
        self.train_module.train()
        total = len(self.loader)
        self.console.start_epoch(self.epoch, s.epochs, total, self.step_in_epoch)
        self.window.reset()
        t0 = time.perf_counter()
        try:
            for x, y, index in self.loader.iter_from(self.step_in_epoch):
                layout = layouts[self.step_in_epoch] if layouts else None
                with autocast(self.device, hw.amp), distributed.batch_layout(layout):
                    out: StepOutput = self.train_module(x, y, index)
                self.scaler.scale(self._rank_weighted(out, layout)).backward()
                if s.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], s.grad_clip)
                if out.weight is None:
                    self.scaler.step(self.optimizer)
                else:
                    self._step_unless_empty(out.weight)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                targets = out.targets if out.targets is not None else y
                self.meter.update(out, targets)
                self.window.update(out, targets)
                self.step_in_epoch += 1
                self.global_step += 1
                if self.global_step % s.log_every == 0:
                    self._log_window()
                self.console.advance()
                signum = self.stopper.poll(self.signals.signum)
                if signum is not None:
                    self._check_finite()
                    self.save_checkpoint()
                    who = f"rank {self.dist.rank}: " if self.dist.enabled else ""
                    raise Preempted(
                        f"{who}signal {signum}: checkpoint written at epoch {self.epoch} step "
                        f"{self.step_in_epoch} (global step {self.global_step})",
                        signum=signum,
                    )
                if s.checkpoint_every_steps and self.global_step % s.checkpoint_every_steps == 0:
                    self._check_finite()
                    self.save_checkpoint()
        finally:
            self.console.end_epoch()
        stats = self.meter.read()
        if stats.pop("nonfinite"):
            self._raise_nonfinite()
        stats.pop("steps")
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        stats["epoch_time_s"] = time.perf_counter() - t0
        return stats

    def _epoch_layouts(self) -> list[tuple[int, ...]] | None:
        """Every step's per-rank batch sizes this epoch (None in one process)."""
        if not self.dist.enabled:
            return None
        layouts = self.sampler.epoch_layout()
        for step, sizes in enumerate(layouts):
            if min(sizes) == 0:
                raise ConfigError(
                    f"step {step} of epoch {self.epoch + 1} has {sum(sizes)} samples for "
                    f"{len(sizes)} ranks, so a rank would train on none: set "
                    "trainer.drop_last=true or a trainer.batch_size whose last batch has at "
                    "least one sample per rank"
                )
        return layouts

    def _rank_weighted(self, out: StepOutput, layout: tuple[int, ...] | None) -> torch.Tensor:
        """The loss this rank back-propagates. DDP averages gradients over ranks; a rank whose
        loss is a mean over its own slice is weighted by ``W * n_rank / n_global`` (a host
        float), so any global batch — divisible or not — gives the single-process gradient.
        A loss already normalised over the global batch (``out.loss_is_global``) is left as is."""
        if layout is None or out.loss_is_global or len(set(layout)) == 1:
            return out.loss
        return out.loss * (len(layout) * layout[self.dist.rank] / sum(layout))

    def _sync_buffers(self) -> None:
        """Without SyncBatchNorm each rank's BatchNorm statistics drift apart; rank 0's are
        the ones evaluated and saved, so every rank takes them once per epoch."""
        if self.dist.enabled and not self.hw.sync_bn:
            distributed.broadcast_buffers(self.model)

    @torch.no_grad()
    def _step_unless_empty(self, weight: torch.Tensor) -> None:
        """The optimizer step, undone when no sample took part on any rank (``weight``, the
        step's participant count, sums to 0) -- without a host sync. The parameters and the
        floating optimizer state on the parameters' device are snapshotted, stepped, and blended
        back with ``lerp(new, old, 1 - keep)``, ``keep`` in {0, 1} (exact for finite values);
        state the step created is multiplied by ``keep`` (zeros = fresh SGD momentum / Adam
        moments). Not restored: host-side scalars (Adam's ``step`` count unless
        ``capturable``), BatchNorm running statistics (updated by the forward pass). The learning
        rate schedule advances as on any step. Cost: one fused copy of the parameters and
        optimizer state per step, only for methods that report ``weight``."""
        total = distributed.all_reduce_sum(weight.detach().float().reshape(()))
        keep = (total > 0).to(torch.float32)
        device = keep.device
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.device == device]

        def state_tensors() -> dict[tuple[int, str], torch.Tensor]:
            return {
                (i, k): v
                for i, p in enumerate(params)
                for k, v in self.optimizer.state.get(p, {}).items()
                if torch.is_tensor(v) and v.is_floating_point() and v.device == device
            }

        before = state_tensors()
        saved = torch._foreach_mul([*params, *before.values()], 1.0)  # fused copy
        self.scaler.step(self.optimizer)
        after = state_tensors()
        current = [*params, *(after[k] for k in before)]
        created = [v for k, v in after.items() if k not in before]
        # one pass: lerp with weight 0 returns the start and with weight 1 the end, exactly; the
        # weight stays a tensor (a 0-d tensor taken as a Scalar would be read on the host)
        torch._foreach_lerp_(current, saved, [1.0 - keep] * len(current))
        if created:
            torch._foreach_mul_(created, keep)

    def _check_finite(self) -> None:
        if bool(distributed.all_reduce_sum(self.meter.nonfinite.double()) > 0):
            self._raise_nonfinite()

    def _raise_nonfinite(self) -> None:
        raise NonFiniteLossError(
            f"non-finite loss in epoch {self.epoch + 1} (before global step {self.global_step}); "
            "the last good checkpoint is kept — lower optim.lr or set trainer.grad_clip"
        )

    def _log_window(self) -> None:
        stats = self.window.read()
        self.window.reset()
        if stats.pop("nonfinite"):
            self._raise_nonfinite()
        stats.pop("steps")
        record = {
            "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
            f"{self.prefix}lr": self.optimizer.param_groups[0]["lr"],
            **{f"{self.prefix}train_step/{k}": v for k, v in stats.items()},
        }
        self.logger.log_metrics(record, step=self.step_offset + self.global_step)
        if not self.console.interactive and self.dist.is_main:
            log.info(
                "%sepoch %d step %d/%d loss %.4f acc %.4f",
                self.prefix,
                self.epoch + 1,
                self.step_in_epoch,
                self.steps_per_epoch,
                stats["loss"],
                stats["acc1"],
            )

    def evaluate(self) -> dict[str, float]:
        """One scheduled evaluation (see the module docstring): the validation split when there
        is one — plus, after the last epoch, the test set for the last and the selected model —
        else the test set."""
        p = self.prefix
        split = "val" if self.has_validation else "test"
        model = self.method.eval_model(self.model)
        metrics = self._evaluate_split(model, split, plot=True)
        out = {f"{p}{split}/{k}": v for k, v in metrics.items()}
        if self._improves(metrics[self.monitor] if self.has_validation else metrics["acc1"]):
            self.best_value = metrics[self.monitor] if self.has_validation else metrics["acc1"]
            self.best_epoch = self.epoch
            if self.has_validation:
                self.save_best(out)
        out.update(self._selection_keys())
        if self.has_validation and self.epoch == self.settings.epochs:
            out.update(self._final_test(model))
        self.last_eval = dict(out)
        return out

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.higher_is_better else value < self.best_value

    def _selection_keys(self) -> dict[str, float]:
        p = self.prefix
        if self.has_validation:
            key = f"{p}val/{self.monitor}_best"
        else:  # the test set's own maximum: test-selected, reported as such
            key = f"{p}test/acc1_max"
        value = self.best_value if self.best_value is not None else math.nan
        return {key: value, f"{key}_epoch": self.best_epoch}

    def _final_test(self, model: nn.Module) -> dict[str, float]:
        """``test/*`` of the last model and ``test_at_best/*`` of the one in ``best.ckpt``."""
        p = self.prefix
        out = {f"{p}test/{k}": v for k, v in self._evaluate_split(model, "test", plot=True).items()}
        selected = self._selected_model(model)
        if selected is not None:
            metrics = self._evaluate_split(selected, "test", label="test_at_best")
            out.update({f"{p}test_at_best/{k}": v for k, v in metrics.items()})
        return out

    def _selected_model(self, model: nn.Module) -> nn.Module | None:
        """A copy of ``model`` holding the weights of ``best.ckpt`` (None without one)."""
        distributed.barrier()  # rank 0 writes best.ckpt; every rank reads it
        path = self.ckpt_dir / "best.ckpt"
        if self.best_epoch < 0 or not path.is_file():
            log.warning(
                "%sno model was selected on %s: no test_at_best/*", self.prefix, self.monitor
            )
            return None
        selected = copy.deepcopy(model)
        selected.load_state_dict(ckpt.load(path, map_location=self.device)["model"])
        return selected

    def _evaluate_split(
        self, model: nn.Module, split: str, plot: bool = False, label: str | None = None
    ) -> dict[str, float]:
        """The metrics of ``model`` on evaluation split ``split`` (logged to the console; with
        ``plot``, a reliability diagram ``plots/reliability_[<prefix>_]<split>``)."""
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
        if plot and self.plots and self.dist.is_main:
            self._reliability_plot(logits, labels, split)
        if self.dist.is_main:
            log.info(
                "%sepoch %d %s acc1 %.4f nll %.4f ece %.4f",
                self.prefix,
                self.epoch,
                label or split,
                metrics["acc1"],
                metrics["nll"],
                metrics["ece"],
            )
        return metrics

    def _reliability_plot(self, logits: torch.Tensor, labels: torch.Tensor, split: str) -> None:
        from kdrun.plots import save_reliability_diagram

        name = f"reliability_{self.prefix.strip('/') + '_' if self.prefix else ''}{split}"
        png = self.run_dir / "plots" / f"{name}.png"
        try:
            save_reliability_diagram(
                logits,
                labels,
                self.settings.n_bins,
                png,
                png.with_suffix(".json"),
                title=f"{self.prefix}{split}, epoch {self.epoch}",
            )
            self.logger.log_image(
                f"{self.prefix}plots/reliability_{split}",
                png,
                step=self.step_offset + self.global_step,
            )
        except Exception as exc:  # a plot never kills training
            log.warning("reliability diagram failed: %s", exc)

    def final_metrics(self) -> dict[str, Any]:
        """The figures of the last evaluation, for summary.json: ``val/*``, the selection on
        ``eval.monitor``, ``test/*`` and ``test_at_best/*`` with a validation split; ``test/*``
        and the test-selected ``test/acc1_max`` without one."""
        return dict(self.last_eval)
