"""The ``kdrun`` Hydra app — the only module that sees the whole config tree.

Flow of one run (:func:`train`): validate the config (before Hydra makes the run dir, and again
here) -> :class:`kdrun.lifecycle.RunLifecycle` (device, process group, run dir, lock, run.json,
logger) -> build data and method (:mod:`kdrun.build`) -> the method's earlier stages
(:class:`kdrun.stages.StageRunner`) -> :class:`kdrun.engine.Trainer` -> ``summary.json``.

Errors the user can fix (:class:`kdrun.errors.KdrunError`) are printed as one line
``kdrun: error: ...`` and exit with status 2 (in a multirun the job is marked failed and the sweep
goes on). A preempted run exits with ``128 + signum`` after its checkpoint (SIGUSR1: requeued).
The W&B run is always finished, also on failure.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from kdrun import hpo
from kdrun.amp import resolve_amp
from kdrun.build import (
    build_data,
    final_table_title,
    hardware_settings,
    run_summary,
    trainer_settings,
)
from kdrun.config import validate
from kdrun.console import Console, SilentConsole
from kdrun.errors import DatasetError, KdrunError
from kdrun.evaluation import count_params
from kdrun.lifecycle import RunLifecycle, load_resume_state, set_determinism
from kdrun.methods.base import StageResult
from kdrun.preemption import Preempted, request_requeue
from kdrun.stages import RunContext, StageRunner

log = logging.getLogger("kdrun")


def train(cfg: DictConfig) -> dict[str, Any]:
    """One complete run; returns the summary dict."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    group = Path(hc.sweep.dir).name if multirun else hc.runtime.choices.get("experiment")
    with RunLifecycle(cfg, Path(hc.runtime.output_dir), multirun, group) as run:
        set_determinism(int(cfg.seed), bool(cfg.hardware.deterministic))
        data = build_data(cfg)
        method = instantiate(
            cfg.method, num_classes=data.spec.num_classes, num_samples=data.num_train
        )
        amp = resolve_amp(cfg.hardware.amp, run.device)
        log.info(
            "device %s, amp %s, world size %d, %d training samples, %d classes",
            run.device,
            amp,
            run.info.world_size,
            data.num_train,
            data.spec.num_classes,
        )
        ctx = RunContext(
            cfg=cfg,
            data=data,
            hardware=hardware_settings(cfg, run.device, amp),
            settings=trainer_settings(cfg),
            logger=run.logger,
            console=Console() if run.info.is_main else SilentConsole(),
            run_dir=run.run_dir,
            seed=int(cfg.seed),
            is_main=run.info.is_main,
        )
        runner = StageRunner(
            ctx, cache_dir=Path(cfg.paths.teacher_cache), resume=cfg.resume != "never"
        )
        method.prepare(runner)
        trainer = ctx.make_trainer(ctx.new_model(), method, step_offset=runner.step)
        trainer.callbacks.extend(hpo.trial_callbacks(cfg, run.run_dir))  # report/prune a trial
        pruned: hpo.TrialPruned | None = None
        try:
            trainer.fit(load_resume_state(cfg, run.run_dir))
        except hpo.TrialPruned as exc:  # the search stopped this trial; its checkpoint is written
            log.info("%s", exc)
            pruned, run.status = exc, "pruned"
        final = trainer.final_metrics()
        method.finish(
            StageResult(
                name="",
                model=trainer.model,
                method=method,
                metrics=final,
                first_step=runner.step,
                steps=trainer.global_step,
                artifacts={"checkpoints": trainer.ckpt_dir},
            )
        )
        summary = run_summary(
            cfg,
            data,
            count_params(method.eval_model(trainer.model)),
            run.info.world_size,
            amp,
            timing={"train_time_s": trainer.train_time_s},
            stages=runner.summary,
            final=final,
            method=method.summary(),
            pruned={"pruned": True, "pruned_epoch": pruned.epoch} if pruned else {},
            files={"files": runner.files} if runner.files else {},
        )
        if run.info.is_main:
            run.logger.log_summary(summary)
            ctx.console.metrics_table(final_table_title(summary), summary)
        return summary


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        validate(cfg)
        summary = train(cfg)
    except Preempted as exc:
        # The checkpoint is written; end the process (and a local sweep) like the signal would.
        logging.getLogger("kdrun").warning("stopping: %s", exc)
        request_requeue(exc.signum)
        sys.exit(128 + (exc.signum or 15))
    except (KdrunError, DatasetError) as err:
        logging.getLogger("kdrun").error("%s", err)
        if multirun:
            raise
        print(f"kdrun: error: {err}", file=sys.stderr)
        sys.exit(2)
    return hpo.objective(cfg, summary)  # None for a pruned trial


def main() -> None:
    """Console-script entry point."""
    # submitit's preemption/time-limit signal (sbatch --signal, and its handler in the job) is
    # SIGUSR2 unless this says otherwise; kdrun checkpoints on SIGUSR1/SIGTERM.
    os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    _app()
