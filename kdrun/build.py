"""Building a run's parts from its config nodes: data, logger, trainer and hardware settings, and
the summary written at the end (``summary.json``). Pure functions of the config (and of what
was built), so the CLI's ``train`` reads as the run's outline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kdrun import rundir
from kdrun.data.datasets import build_datasets
from kdrun.data.spec import Datasets
from kdrun.settings import HardwareSettings, TrainerSettings


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


def build_data(cfg: DictConfig) -> Datasets:
    """The dataset of ``cfg.dataset`` (splits, subsets and augmentation as configured)."""
    return build_datasets(
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


def run_summary(
    cfg: DictConfig, data: Datasets, params: int, world_size: int, amp: str, **parts: Any
) -> dict[str, Any]:
    """``summary.json``: what ran (method, dataset, model, seed, epochs, params, world size, amp,
    the evaluation protocol) followed by ``parts`` in order (timing, stage figures, the final
    metrics, the method's own figures)."""
    choices = HydraConfig.get().runtime.choices
    summary: dict[str, Any] = {
        "method": choices.get("method"),
        "dataset": str(cfg.dataset.name),
        "model": choices.get("model"),
        "seed": int(cfg.seed),
        "epochs": int(cfg.trainer.epochs),
        "params": params,
        "world_size": world_size,
        "amp": amp,
        **protocol_fields(cfg, data),
    }
    for part in parts.values():
        summary.update(part)
    return summary
