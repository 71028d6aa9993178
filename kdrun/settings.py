"""What one training stage is configured with: the trainer recipe and the hardware, resolved
from the config by the CLI (``trainer.*``, ``eval.*``, ``hardware.*``, ``dataset.loader``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
