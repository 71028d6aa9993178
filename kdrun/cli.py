"""The ``kdrun`` Hydra app — the only module that sees the whole config tree.

Flow of one run: validate the config -> pick the run dir (``resume=auto`` may continue an
interrupted run, see :mod:`kdrun.rundir`) -> build data, model, method, optimizer, schedule,
loggers from their config nodes -> :class:`kdrun.engine.Trainer` -> ``summary.json``.

Errors the user can fix (:class:`kdrun.errors.KdrunError`) are printed as one line
``kdrun: error: ...`` and exit with status 2 (in a multirun the job is marked failed and the sweep
goes on). The W&B run is always finished, also on failure.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdrun import checkpoint as ckpt
from kdrun import distributed, hpo, rundir
from kdrun.config import validate
from kdrun.console import Console, SilentConsole
from kdrun.data.datasets import build_datasets
from kdrun.data.spec import Datasets
from kdrun.engine import (
    HardwareSettings,
    Preempted,
    TrainerSettings,
    count_params,
    resolve_amp,
)
from kdrun.errors import DatasetError, KdrunError
from kdrun.stages import RunContext, StageRunner

log = logging.getLogger("kdrun")

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"


def setup_console_logging(rank: int) -> None:
    """kdrun's messages go to stdout (and kdrun.log) through the ``kdrun`` logger only, so they
    are not doubled by the handlers Hydra installs on the root logger."""
    if not any(getattr(h, "_kdrun", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._kdrun = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def add_file_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "kdrun.log", mode="a")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log.addHandler(handler)
    return handler


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise KdrunError("hardware=gpu needs a CUDA GPU and none is visible: use hardware=cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise KdrunError(f"hardware.device={name!r} must be auto, cpu or cuda")


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def choose_run_dir(cfg: DictConfig, fresh_dir: Path, multirun: bool, fp: str) -> Path:
    """Rank 0 decides: the fresh Hydra dir, or an interrupted run to continue (resume=auto)."""
    if cfg.resume != "auto" or rundir.has_checkpoint(fresh_dir):
        return fresh_dir
    previous = rundir.find_resumable(fresh_dir, fp, multirun)
    if previous is None:
        return fresh_dir
    rundir.discard_fresh_dir(fresh_dir)
    return previous


def load_resume_state(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The checkpoint to resume from, in host memory (the trainer copies it to its device)."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return ckpt.load_latest(run_dir / "checkpoints")
    return ckpt.load(cfg.resume)


def build_logger(
    cfg: DictConfig, run_dir: Path, is_main: bool, group: str | None, resumed_step: int | None
):
    from kdrun.loggers.base import MultiLogger
    from kdrun.loggers.jsonl import JsonlLogger
    from kdrun.loggers.wandb import WandbLogger

    if not is_main:
        return MultiLogger([])
    # A resumed run drops the events the interrupted process logged after its checkpoint from
    # metrics.jsonl and logs them again; W&B keeps its rows and gets only the steps it lacks.
    logged_before = rundir.last_jsonl_step(run_dir) if resumed_step is not None else None
    loggers: list[Any] = [JsonlLogger(run_dir, drop_after_step=resumed_step)]
    if cfg.logger.backend == "wandb":
        choices = HydraConfig.get().runtime.choices
        tags = [str(cfg.dataset.name), choices.get("model"), choices.get("method")]
        tags += [str(t) for t in cfg.tags]
        loggers.append(
            WandbLogger(
                run_dir=run_dir,
                project=cfg.logger.project,
                entity=cfg.logger.get("entity"),
                group=cfg.logger.get("group") or group,
                job_type=choices.get("method"),
                tags=tags,
                name=cfg.get("name") or run_dir.name,
                mode=cfg.logger.mode,
                config=OmegaConf.to_container(cfg, resolve=True),
                min_step=logged_before or 0,
            )
        )
    return MultiLogger(loggers)


def dataset_options(cfg: DictConfig) -> dict[str, Any]:
    options = cfg.dataset.get("options")
    return dict(OmegaConf.to_container(options, resolve=True)) if options else {}


def trainer_settings(cfg: DictConfig) -> TrainerSettings:
    t = cfg.trainer
    return TrainerSettings(
        epochs=t.epochs,
        batch_size=t.batch_size,
        eval_every=t.eval_every,
        log_every=t.log_every,
        limit_train_batches=t.limit_train_batches,
        limit_eval_batches=t.limit_eval_batches,
        grad_clip=t.grad_clip,
        drop_last=t.drop_last,
        checkpoint_every_steps=t.checkpoint_every_steps,
        eval_batch_size=cfg.eval.batch_size,
        n_bins=cfg.eval.n_bins,
        monitor=str(cfg.eval.get("monitor", "val/acc1")),
    )


def hardware_settings(cfg: DictConfig, device: torch.device, amp: str) -> HardwareSettings:
    hw = cfg.hardware
    return HardwareSettings(
        device=device,
        amp=amp,
        compile=hw.compile,
        channels_last=hw.channels_last,
        num_workers=hw.num_workers,
        loader=cfg.dataset.loader,
        sync_bn=hw.sync_bn,
    )


def protocol_fields(cfg: DictConfig, data: Datasets) -> dict[str, Any]:
    """The summary's evaluation-protocol fields: ``eval_split`` (the split evaluated after every
    epoch: ``"validation"`` or ``"test"``), ``val_samples``, and with a validation split
    ``eval_monitor`` (the ``eval.monitor`` that selected ``best.ckpt``)."""
    if not data.has_validation:
        return {"eval_split": "test", "val_samples": 0}
    return {
        "eval_split": "validation",
        "val_samples": data.num_val,
        "eval_monitor": str(cfg.eval.get("monitor", "val/acc1")),
    }


def final_table_title(summary: dict[str, Any]) -> str:
    if summary["eval_split"] != "validation":
        return "final test metrics (last epoch; no validation split, nothing selected)"
    monitor = summary["eval_monitor"]
    epoch = summary.get(f"{monitor}_best_epoch")
    return (
        "final metrics: val/* last epoch, test/* last model, "
        f"test_at_best/* model selected on {monitor} (epoch {epoch})"
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """One complete run; returns the summary dict."""

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    fresh_dir = Path(hc.runtime.output_dir)
    hw_cfg = cfg.hardware
    env_dist = distributed.env_dist_info()
    if hw_cfg.distributed and env_dist is None:
        raise KdrunError(
            "hardware=ddp needs a distributed launch: use torchrun "
            "--nproc_per_node=K -m kdrun hardware=ddp ... or SLURM tasks"
        )
    info = distributed.DistInfo()
    device = resolve_device(hw_cfg.device, env_dist.local_rank if env_dist else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this rank's GPU for NCCL, object broadcasts, pinning
    if env_dist is not None and env_dist.world_size > 1:
        info = distributed.init_distributed(device.type)
    setup_console_logging(info.rank)

    fp = rundir.fingerprint(cfg)
    run_dir = choose_run_dir(cfg, fresh_dir, multirun, fp) if info.is_main else None
    run_dir = Path(distributed.broadcast_object(str(run_dir)))
    if not info.is_main and run_dir != fresh_dir:
        rundir.discard_fresh_dir(fresh_dir)

    lock = rundir.RunLock(run_dir)
    file_handler = None
    logger = None
    status = "failed"
    exit_code = 1
    try:
        if info.is_main:
            if not lock.acquire():
                raise KdrunError(f"run dir {run_dir} is in use by another kdrun process")
            file_handler = add_file_logging(run_dir)
            existing = rundir.read_run_info(run_dir)
            run_info = existing or rundir.new_run_info(fp)
            resumed_before = bool(existing)
            run_info.update(
                status="running",
                pid=os.getpid(),
                restarts=run_info.get("restarts", 0) + int(resumed_before),
            )
            rundir.write_run_info(run_dir, run_info)
            log.info("run dir: %s%s", run_dir, " (resumed)" if resumed_before else "")
            log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))

        set_determinism(int(cfg.seed), bool(hw_cfg.deterministic))
        data = build_datasets(
            cfg.dataset.name,
            root=cfg.dataset.root,
            fraction=float(cfg.dataset.fraction),
            seed=int(cfg.seed),
            download=bool(cfg.dataset.download),
            augment=str(cfg.dataset.get("augment", "default")),
            subset_seed=cfg.dataset.get("subset_seed"),
            val_fraction=float(cfg.dataset.get("val_fraction", 0.0)),
            val_split=str(cfg.dataset.get("val_split", "none")),
            **dataset_options(cfg),
        )
        spec = data.spec
        num_samples = int(data.train_targets.shape[0])
        method = instantiate(cfg.method, num_classes=spec.num_classes, num_samples=num_samples)
        group = None
        if multirun:
            group = Path(hc.sweep.dir).name
        elif hc.runtime.choices.get("experiment"):
            group = hc.runtime.choices.get("experiment")
        resumed_step = rundir.last_logged_step(run_dir) if cfg.resume != "never" else None
        logger = build_logger(cfg, run_dir, info.is_main, group, resumed_step)
        console = Console() if info.is_main else SilentConsole()
        amp = resolve_amp(hw_cfg.amp, device)
        log.info(
            "device %s, amp %s, world size %d, %d training samples, %d classes",
            device,
            amp,
            info.world_size,
            num_samples,
            spec.num_classes,
        )
        ctx = RunContext(
            cfg=cfg,
            data=data,
            hardware=hardware_settings(cfg, device, amp),
            settings=trainer_settings(cfg),
            logger=logger,
            console=console,
            run_dir=run_dir,
            seed=int(cfg.seed),
            is_main=info.is_main,
        )
        runner = StageRunner(
            ctx, cache_dir=Path(cfg.paths.teacher_cache), resume=cfg.resume != "never"
        )
        method.prepare(runner)
        model = ctx.new_model()
        trainer = ctx.make_trainer(model, method, step_offset=runner.step_offset)
        trainer.callbacks.extend(hpo.trial_callbacks(cfg, run_dir))  # report/prune in a search
        state = load_resume_state(cfg, run_dir)
        pruned: hpo.TrialPruned | None = None
        try:
            timing = trainer.fit(state)
        except hpo.TrialPruned as exc:  # the search stopped this trial; its checkpoint is written
            log.info("%s", exc)
            timing, pruned = {"train_time_s": trainer.train_time_s}, exc
        runner.final_metrics = trainer.final_metrics()
        choices = hc.runtime.choices
        summary: dict[str, Any] = {
            "method": choices.get("method"),
            "dataset": str(cfg.dataset.name),
            "model": choices.get("model"),
            "seed": int(cfg.seed),
            "epochs": int(cfg.trainer.epochs),
            "params": count_params(method.eval_model(trainer.model)),
            "train_time_s": timing["train_time_s"],
            "world_size": info.world_size,
            "amp": amp,
            **protocol_fields(cfg, data),
            **runner.summary,
            **trainer.final_metrics(),
            **method.summary(),
            **({"pruned": True, "pruned_epoch": pruned.epoch} if pruned else {}),
        }
        if info.is_main:
            logger.log_summary(summary)
            console.metrics_table(final_table_title(summary), summary)
        status, exit_code = ("pruned" if pruned else "finished"), 0
        return summary
    except BaseException as exc:
        from kdrun.engine import Preempted

        if isinstance(exc, Preempted):
            status = "preempted"
            log.warning("%s", exc)
        raise
    finally:
        if logger is not None:
            logger.finish(exit_code)
        if info.is_main and lock.fh is not None:
            run_info = rundir.read_run_info(run_dir)
            run_info.update(status=status, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            rundir.write_run_info(run_dir, run_info)
            lock.release()
        if file_handler is not None:
            log.removeHandler(file_handler)
            file_handler.close()
        distributed.cleanup()


def request_requeue(signum: int | None) -> None:
    """Ask SLURM to run this job again after a SIGUSR1 checkpoint (the checkpoint is written).

    SIGUSR1 is SLURM's warning before the time limit (``sbatch --signal=USR1@T``; the SLURM
    launcher asks for it) or a manual ``scancel --signal=USR1``. In a hydra-submitit job,
    submitit's own handler (restored by ``Trainer.fit``) resubmits the same job — same job number,
    same run dir — with ``scontrol requeue`` and exits; in a plain ``sbatch`` job kdrun requeues
    it itself and ``resume=auto`` finds the run again. SIGTERM needs nothing: SLURM sends it when
    it preempts or requeues the job itself (and on ``scancel``, which must not requeue).
    """
    if signum != signal.SIGUSR1:
        return
    if os.environ.get("SUBMITIT_EXECUTOR"):
        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, None)  # submitit: checkpoint() + requeue + sys.exit
        return
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id and os.environ.get("SLURM_PROCID", "0") == "0":
        logging.getLogger("kdrun").warning("requeueing SLURM job %s", job_id)
        subprocess.run(["scontrol", "requeue", job_id], check=False, timeout=60)


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
