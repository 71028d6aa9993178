"""Run context and stage runner: how the CLI builds trainers, and how multi-stage methods
(teacher then student, born-again generations) run their earlier stages.

:class:`RunContext` holds what every stage of one run shares (config, data, device, settings,
logger, console, run dir) and builds models and :class:`~kdrun.engine.Trainer` objects.

:class:`StageRunner` is what a method's ``prepare(runner)`` receives (the protocol
:class:`kdrun.methods.base.StageRunner`). ``run_stage(name, method)`` trains a fresh model with
``method`` and returns a :class:`~kdrun.methods.base.StageResult`: the model, frozen in eval mode,
the stage method with its state, the stage's final metrics, its span on the run's step axis
(``first_step``, ``steps``), whether it came from the cache, and its files:

* the stage logs under the prefix ``<name>/`` (``teacher/test/acc1``) into the same
  ``metrics.jsonl`` and W&B run, with steps that continue into the next stage;
* the model returned is selected like any run's (:mod:`kdrun.engine`): with a validation split,
  the epoch chosen on ``eval.monitor`` (the stage's ``best.ckpt``; the stage method's state,
  e.g. per-sample counts, is the one after the last epoch); without one, the last epoch's model —
  a stage never hands on a model picked on the test set;
* it checkpoints into ``<run_dir>/<name>/checkpoints`` — a run killed during the stage resumes
  the stage; a run killed later finds the finished stage and does not retrain it;
* the stage's steps count in the run's step axis whether it was trained or taken from the cache,
  so a run restarted after its teacher was cached logs its next stage at the same steps as an
  uninterrupted run (W&B drops steps that go backwards); ``<name>/cached`` is false when this run
  trained the stage, in this launch or an earlier one (``<run_dir>/<name>/stage.json``);
* finished stages (the model and the stage method's state, e.g. per-sample counts) are cached
  under ``paths.teacher_cache`` by a hash of everything that determines them (dataset, model,
  optimizer, schedule, trainer recipe, seed, amp, the stage method's settings), so a sweep over
  student knobs trains each teacher once. While a stage trains, its cache entry is locked: a
  parallel job with the same teacher waits and reuses it.

A method writes files of the run through ``runner.output_path(relpath)`` (``None`` on ranks that
write nothing; the paths are listed in ``summary.json`` as ``files``) and logs the images among
them with ``runner.log_figure(key, png)`` at the step where the main training starts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun import checkpoint as ckpt
from kdrun import distributed
from kdrun.callbacks import standard_callbacks
from kdrun.console import Console
from kdrun.data.spec import Datasets
from kdrun.engine import Trainer
from kdrun.errors import CheckpointError
from kdrun.loggers.base import Logger
from kdrun.methods.base import Method, StageResult
from kdrun.settings import HardwareSettings, TrainerSettings

log = logging.getLogger("kdrun")

CACHE_VERSION = 1


@dataclass
class RunContext:
    cfg: DictConfig
    data: Datasets
    hardware: HardwareSettings
    settings: TrainerSettings
    logger: Logger
    console: Console
    run_dir: Path
    seed: int
    is_main: bool = True

    def new_model(self, model_cfg: DictConfig | None = None, seed_offset: int = 0) -> nn.Module:
        """A freshly initialised model; the init depends only on (seed, seed_offset)."""
        spec = self.data.spec
        torch.manual_seed(self.seed + seed_offset)
        return instantiate(
            model_cfg if model_cfg is not None else self.cfg.model,
            num_classes=spec.num_classes,
            in_channels=spec.in_channels,
            image_size=spec.image_size,
        )

    def make_trainer(
        self,
        model: nn.Module,
        method: Method,
        *,
        prefix: str = "",
        run_dir: Path | None = None,
        settings: TrainerSettings | None = None,
        step_offset: int = 0,
    ) -> Trainer:
        return Trainer(
            model=model,
            method=method,
            data=self.data,
            optimizer_factory=instantiate(self.cfg.optim),
            schedule=instantiate(self.cfg.schedule),
            settings=settings or self.settings,
            hardware=self.hardware,
            seed=self.seed,
            run_dir=run_dir or self.run_dir,
            logger=self.logger,
            console=self.console,
            prefix=prefix,
            step_offset=step_offset,
            callbacks=standard_callbacks(settings or self.settings),
        )

    def num_samples(self) -> int:
        return int(self.data.train_targets.shape[0])


def stage_key(
    ctx: RunContext,
    name: str,
    method_settings: dict[str, Any],
    model_cfg: DictConfig | None,
    epochs: int,
    seed_offset: int = 0,
) -> str:
    cfg = ctx.cfg
    parts = {
        "version": CACHE_VERSION,
        "stage": name,
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "model": OmegaConf.to_container(
            model_cfg if model_cfg is not None else cfg.model, resolve=True
        ),
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
        "epochs": epochs,
        "batch_size": ctx.settings.batch_size,
        "drop_last": ctx.settings.drop_last,
        "limit_train_batches": ctx.settings.limit_train_batches,
        "grad_clip": ctx.settings.grad_clip,
        "seed": ctx.seed,
        "seed_offset": seed_offset,
        "amp": ctx.hardware.amp,
        "method": method_settings,
    }
    parts["dataset"].pop("root", None)
    parts["dataset"].pop("loader", None)
    if parts["dataset"].get("val_split", "none") == "none":
        parts["dataset"].pop("val_split", None)  # entries written before the key existed
    if ctx.data.has_validation:  # the stage hands on the model selected on validation
        parts["select"] = ctx.settings.monitor
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageRunner:
    """Runs earlier training stages for a method's ``prepare``; see the module docstring.

    The CLI reads back :attr:`results` (one :class:`StageResult` per stage, in order),
    :attr:`step` (where the main training starts), :attr:`summary` (every stage's figures) and
    :attr:`files` (what methods wrote through :meth:`output_path`)."""

    def __init__(self, ctx: RunContext, cache_dir: Path | None, resume: bool = True) -> None:
        self.ctx = ctx
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.resume = resume
        self.results: list[StageResult] = []
        self.files: list[str] = []

    @property
    def step(self) -> int:
        return self.results[-1].next_step if self.results else 0

    @property
    def summary(self) -> dict[str, Any]:
        """Every stage's figures (``<name>/test/acc1``, ``<name>/cached``, ...) in stage order."""
        out: dict[str, Any] = {}
        for result in self.results:
            out.update(result.metrics)
            out[f"{result.name}/cached"] = result.cached
        return out

    @property
    def stages_run(self) -> list[str]:
        return [result.name for result in self.results]

    def output_path(self, relpath: str) -> Path | None:
        if not self.ctx.is_main:
            return None
        path = self.ctx.run_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if relpath not in self.files:
            self.files.append(relpath)
        return path

    def log_figure(self, key: str, png: Path) -> None:
        if self.ctx.is_main:
            self.ctx.logger.log_image(key, png, step=self.step)

    def run_stage(
        self,
        name: str,
        method: Method,
        *,
        method_settings: Mapping[str, Any] | None = None,
        model_cfg: DictConfig | None = None,
        epochs: int | None = None,
        seed_offset: int = 1000,
    ) -> StageResult:
        ctx = self.ctx
        epochs = int(epochs or ctx.settings.epochs)
        settings = replace(ctx.settings, epochs=epochs)
        key = stage_key(
            ctx,
            name,
            dict(method_settings or {"class": type(method).__name__}),
            model_cfg,
            epochs,
            seed_offset,
        )
        model = ctx.new_model(model_cfg, seed_offset=seed_offset)
        cache_file = self.cache_dir / f"{name}-{key}.pt" if self.cache_dir else None
        lock = _CacheLock(cache_file) if cache_file is not None and ctx.is_main else None
        if lock is not None:
            lock.acquire()  # waits while a parallel job trains the same stage
        try:
            use_cache = distributed.broadcast_object(self._cache_ok(cache_file))
            stage_dir = ctx.run_dir / name
            if use_cache:
                state = ckpt.load(cache_file)
                model.load_state_dict(state["model"])
                if "method" in state:  # the stage method's state (e.g. per-sample counts)
                    method.load_state_dict(state["method"], strict=False)
                log.info("%s: reusing the cached stage %s", name, cache_file)
                steps = state.get("steps")
                if steps is None:  # entries written before the step count was stored
                    steps = epochs * _steps_per_epoch(ctx.num_samples(), settings)
                metrics = dict(state.get("metrics", {}))
                # not cached when an earlier launch of this same run trained it
                cached = _read_stage_record(stage_dir).get("key") != key
            else:
                log.info(
                    "%s: training the stage (%d epochs)%s",
                    name,
                    epochs,
                    f", cache key {key}" if cache_file else "",
                )
                model, steps, metrics = self._train(name, model, method, settings, stage_dir)
                cached = False
                if ctx.is_main:
                    _write_stage_record(stage_dir, {"key": key, "steps": steps})
                if cache_file is not None and ctx.is_main:
                    ckpt.atomic_save(
                        {
                            "model": model.state_dict(),
                            "method": method.state_dict(),
                            "metrics": metrics,
                            "key": key,
                            "steps": steps,
                        },
                        cache_file,
                    )
        finally:
            if lock is not None:
                lock.release()
        artifacts = {"checkpoints": stage_dir / "checkpoints"}
        if (stage_dir / "checkpoints" / "best.ckpt").is_file():
            artifacts["best"] = stage_dir / "checkpoints" / "best.ckpt"
        result = StageResult(
            name=name,
            model=freeze(model.to(ctx.hardware.device)),
            method=method,
            metrics=metrics,
            first_step=self.step,
            steps=int(steps),
            cached=cached,
            artifacts=artifacts,
        )
        self.results.append(result)
        return result

    def _train(
        self,
        name: str,
        model: nn.Module,
        method: Method,
        settings: TrainerSettings,
        stage_dir: Path,
    ) -> tuple[nn.Module, int, dict[str, Any]]:
        """Fit (or resume) the stage; ``(selected model, steps, prefixed final metrics)``."""
        trainer = self.ctx.make_trainer(
            model,
            method,
            prefix=f"{name}/",
            run_dir=stage_dir,
            settings=settings,
            step_offset=self.step,
        )
        trainer.fit(ckpt.load_latest(stage_dir / "checkpoints") if self.resume else None)
        if self.ctx.data.has_validation:
            _load_selected(trainer, name)
        metrics = trainer.final_metrics()
        metrics[f"{name}/train_time_s"] = trainer.train_time_s
        metrics.update({f"{name}/{k}": v for k, v in method.summary().items()})
        return trainer.model, trainer.global_step, metrics

    def load_model(self, path: str | Path, model_cfg: DictConfig | None = None) -> nn.Module:
        """A frozen model from a checkpoint (``best.ckpt``, ``last.ckpt`` or a cache entry)."""
        model = self.ctx.new_model(model_cfg)
        if not Path(path).is_file():
            raise CheckpointError(
                f"teacher checkpoint {path} does not exist: check method.teacher_ckpt"
            )
        state = ckpt.load(path)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {path} does not fit the model ({str(exc).splitlines()[0][:120]}); "
                "pass the model it was trained with"
            ) from None
        return freeze(model.to(self.ctx.hardware.device))

    @staticmethod
    def _cache_ok(cache_file: Path | None) -> bool:
        if cache_file is None or not cache_file.exists():
            return False
        try:
            ckpt.load(cache_file)
            return True
        except CheckpointError as err:
            log.warning("ignoring a bad stage cache entry: %s", err)
            return False


def _load_selected(trainer: Trainer, name: str) -> None:
    """Put the stage's ``best.ckpt`` (selected on ``eval.monitor``) into its model."""
    distributed.barrier()  # rank 0 wrote it
    path = trainer.ckpt_dir / "best.ckpt"
    if not path.is_file():
        raise CheckpointError(
            f"{name}: no model was selected on {trainer.settings.monitor} ({path} is missing, "
            "every validation value was NaN/inf): lower optim.lr or set trainer.grad_clip"
        )
    best = ckpt.load(path, map_location=trainer.device)
    trainer.model.load_state_dict(best["model"])
    log.info(
        "%s: the model of epoch %d, selected on %s = %.4f",
        name,
        int(best["epoch"]),
        trainer.settings.monitor,
        float(best["value"]),
    )


def _steps_per_epoch(num_samples: int, settings: TrainerSettings) -> int:
    full, rest = divmod(num_samples, settings.batch_size)
    steps = full + (1 if rest and not settings.drop_last else 0)
    return min(steps, settings.limit_train_batches) if settings.limit_train_batches else steps


def _read_stage_record(stage_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((stage_dir / "stage.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_stage_record(stage_dir: Path, record: dict[str, Any]) -> None:
    from kdrun.atomic import atomic_write_json

    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage_dir / "stage.json", record)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class _CacheLock:
    def __init__(self, cache_file: Path) -> None:
        self.path = cache_file.with_suffix(".lock")
        self.fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")  # noqa: SIM115
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None
