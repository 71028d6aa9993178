"""The optimizer and its step, where they differ from ``optimizer.step()``.

* ``build_optimizer``: under fp16 the optimizer is built fused, because ``GradScaler`` hands a
  fused optimizer its inf/NaN flag on the device (an unfused step reads it on the host every
  step).
* ``step_unless_empty``: the step of a method that reports how many samples took part
  (``StepOutput.weight``): undone, without a host synchronisation, when none did on any rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from kdrun import distributed

log = logging.getLogger("kdrun")


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer], params: list, amp: str
) -> torch.optim.Optimizer:
    if amp == "fp16":
        try:
            return factory(params, fused=True)
        except (TypeError, RuntimeError) as exc:  # an optimizer without a fused variant
            log.warning("fp16: no fused optimizer (%s); each step reads the inf flag", exc)
    return factory(params)


@torch.no_grad()
def step_unless_empty(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, weight: torch.Tensor
) -> None:
    """The optimizer step, undone when no sample took part on any rank (``weight``, the step's
    participant count, sums to 0). The parameters and the floating optimizer state on the
    parameters' device are snapshotted, stepped, and blended back with ``lerp(new, old, 1 -
    keep)``, ``keep`` in {0, 1} (exact for finite values); state the step created is multiplied
    by ``keep`` (zeros = fresh SGD momentum / Adam moments). Not restored: host-side scalars
    (Adam's ``step`` count unless ``capturable``), BatchNorm running statistics (updated by the
    forward pass). The learning-rate schedule advances as on any step. Cost: one fused copy of
    the parameters and optimizer state per step, only for methods that report ``weight``."""
    total = distributed.all_reduce_sum(weight.detach().float().reshape(()))
    keep = (total > 0).to(torch.float32)
    device = keep.device
    params = [p for g in optimizer.param_groups for p in g["params"] if p.device == device]

    def state_tensors() -> dict[tuple[int, str], torch.Tensor]:
        return {
            (i, k): v
            for i, p in enumerate(params)
            for k, v in optimizer.state.get(p, {}).items()
            if torch.is_tensor(v) and v.is_floating_point() and v.device == device
        }

    before = state_tensors()
    saved = torch._foreach_mul([*params, *before.values()], 1.0)  # fused copy
    scaler.step(optimizer)
    after = state_tensors()
    current = [*params, *(after[k] for k in before)]
    created = [v for k, v in after.items() if k not in before]
    # one pass: lerp with weight 0 returns the start and with weight 1 the end, exactly; the
    # weight stays a tensor (a 0-d tensor taken as a Scalar would be read on the host)
    torch._foreach_lerp_(current, saved, [1.0 - keep] * len(current))
    if created:
        torch._foreach_mul_(created, keep)
