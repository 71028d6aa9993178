"""Evaluation helpers: predictions over a split, and what ``eval.monitor`` means.

``predict`` runs a model over evaluation batches under autocast and returns fp32 logits and labels
on the device. ``monitor_metric("val/<metric>")`` gives the metric and its direction: accuracies
and AUROC are higher-better, every other metric (NLL, ECE, Brier, AURC, ...) lower-better; a model
is only ever selected on the validation split.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from kdrun.amp import autocast
from kdrun.errors import ConfigError
from kdrun.metrics import METRIC_KEYS

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
