"""Distributed helpers: rank facts, process-group setup from torchrun or SLURM, collectives.

Everything here is a no-op in a single process, so callers never branch on ``world_size``.
``init_distributed`` reads the torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) or, failing those, SLURM's (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, the first host of ``SLURM_JOB_NODELIST``). The backend is NCCL on CUDA and gloo
on CPU. Under CUDA every rank binds its GPU (``torch.cuda.set_device(LOCAL_RANK)``) before the
process group exists, so NCCL collectives, object broadcasts and pinned-memory threads use the
rank's own GPU.

Uneven batches: a training step may give ranks slices that differ in length (the last global batch
of an epoch). The engine declares every rank's slice length for the step with
:func:`batch_layout` (host values known to all ranks, no communication); :func:`all_gather_cat`
then pads each rank's rows to the longest slice, gathers, and trims every part back — exact, in
rank order, with no host synchronisation.

Stopping together: :class:`StopAgreement` lets all ranks agree to stop at the same step when a
signal reached any of them, through an asynchronous MAX all-reduce of a host integer on a
separate gloo group, read one step later — no device synchronisation in the step.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_dist_info() -> DistInfo | None:
    """Rank facts from torchrun or SLURM task variables, or None when not launched distributed."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistInfo(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(
            int(os.environ["SLURM_PROCID"]),
            int(os.environ["SLURM_NTASKS"]),
            int(os.environ.get("SLURM_LOCALID", 0)),
        )
    return None


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group if launched distributed; return this rank's facts."""
    info = env_dist_info()
    if info is None or info.world_size == 1:
        return DistInfo()
    if dist.is_initialized():
        return info
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
    if "MASTER_PORT" not in os.environ:
        job = int(os.environ.get("SLURM_JOB_ID", "0"))
        os.environ["MASTER_PORT"] = str(20000 + job % 20000)
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    backend = "nccl" if device_type == "cuda" else "gloo"
    from datetime import timedelta

    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    global _CONTROL_GROUP
    # host-side control messages (the stop agreement) never touch the GPU stream
    _CONTROL_GROUP = dist.new_group(backend="gloo")
    return info


_CONTROL_GROUP = None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` must run: NCCL only moves CUDA tensors, so host tensors (e.g.
    a pinned-CPU bank's checksum) travel through this rank's GPU; gloo takes them as they are."""
    if t.device.type != "cuda" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


_LAYOUT: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar(
    "kdrun_batch_layout", default=None
)


@contextlib.contextmanager
def batch_layout(sizes: Sequence[int] | None) -> Iterator[None]:
    """Within this block, per-sample tensors gathered by :func:`all_gather_cat` have
    ``sizes[r]`` rows on rank ``r`` (or a whole multiple ``k * sizes[r]`` on every rank, e.g. a
    rotated batch). ``None``: equal shapes on every rank."""
    token = _LAYOUT.set(tuple(int(n) for n in sizes) if sizes is not None else None)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows along dim 0 (rank order), on ``t``'s device.

    Inside :func:`batch_layout` the ranks may hold different numbers of rows (padded to the
    longest, gathered, trimmed); outside it every rank's ``t`` must have the same shape."""
    if not is_initialized():
        return t
    world = dist.get_world_size()
    src = t.contiguous().to(_comm_device(t))
    rows = _layout_rows(src.shape[0], world)
    if rows is not None and max(rows) != src.shape[0]:
        pad = src.new_zeros((max(rows) - src.shape[0], *src.shape[1:]))
        src = torch.cat([src, pad])
    parts = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(parts, src)
    if rows is not None:
        parts = [p[:n] for p, n in zip(parts, rows)]
    return torch.cat(parts, dim=0).to(t.device)


def slice_weight(layout: Sequence[int] | None) -> float | None:
    """``W * n_rank / n_global`` for a step with per-rank slice lengths ``layout``, or None when
    the slices are equal (or in one process). DDP averages gradients over the ``W`` ranks, so a
    rank's loss that is a mean over its own slice, weighted by this host float, gives the
    single-process gradient of the global batch — divisible or not."""
    if layout is None or len(set(layout)) == 1:
        return None
    return len(layout) * layout[dist.get_rank()] / sum(layout)


def _layout_rows(local_rows: int, world: int) -> list[int] | None:
    """Every rank's row count for a gather inside :func:`batch_layout`, or None if equal."""
    layout = _LAYOUT.get()
    if layout is None or len(set(layout)) == 1:
        return None
    if len(layout) != world:
        raise RuntimeError(f"batch layout {layout} does not match world size {world}")
    mine = layout[dist.get_rank()]
    if mine == 0 or local_rows % mine:
        raise RuntimeError(
            f"a per-sample tensor with {local_rows} rows does not fit this rank's {mine} samples"
        )
    k = local_rows // mine
    return [k * n for n in layout]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy, on ``t``'s device); identity in one process."""
    if not is_initialized():
        return t
    out = t.to(_comm_device(t), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def broadcast_object(obj):
    """Rank 0's Python object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers of ``module`` (e.g. BatchNorm running statistics) on every rank."""
    if not is_initialized():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


class StopAgreement:
    """All ranks stop at the same step when any of them received a stop signal.

    ``poll(local_signum)`` is called once per training step on every rank. It waits for the
    MAX all-reduce started by the previous poll (long finished: the ranks met in the gradient
    all-reduce since), reads it from host memory, and starts the next one with this rank's
    flag. So a signal seen by one rank at step k is acted on by every rank at step k + 1 or
    k + 2, the same step everywhere. The flag lives in host memory and travels on a gloo group:
    nothing here waits for the GPU. In one process it returns ``local_signum`` at once.
    """

    def __init__(self) -> None:
        self.enabled = is_initialized()
        self._flag = torch.zeros(1, dtype=torch.int64)
        self._view = self._flag.numpy()  # host reads without a tensor op
        self._work = None

    def poll(self, local_signum: int | None) -> int | None:
        if not self.enabled:
            return local_signum
        agreed = self._wait()
        if agreed:
            return agreed
        self._view[0] = int(local_signum or 0)
        self._work = dist.all_reduce(
            self._flag, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP, async_op=True
        )
        return None

    def _wait(self) -> int | None:
        if self._work is None:
            return None
        self._work.wait()
        self._work = None
        return int(self._view[0]) or None

    def close(self) -> None:
        """Finish the reduction in flight (every rank calls this at the same point)."""
        self._wait()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


class CPUSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm with statistics over the global batch of all ranks, for gloo/CPU.

    PyTorch's ``nn.SyncBatchNorm`` refuses CPU modules under DDP; this computes the per-channel
    sum, sum of squares and count locally, all-reduces them with the differentiable
    ``torch.distributed.nn.functional.all_reduce`` (so gradients flow through the global
    statistics exactly as in a single process with the whole batch), and normalises with the
    global biased variance. Running statistics use the unbiased global variance, as BatchNorm does.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_initialized()):
            return torch.nn.functional.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                self.training or not self.track_running_stats,
                self.momentum or 0.0,
                self.eps,
            )
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        # float64 statistics: E[x^2] - E[x]^2 in float32 loses digits to cancellation where a
        # channel's mean is large against its spread, which single-process BatchNorm does not
        xf = x.double()
        count = torch.full((1,), xf.numel() / xf.shape[1], device=x.device, dtype=torch.float64)
        packed = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        packed = all_reduce(packed)
        channels = x.shape[1]
        total = packed[-1]
        mean = packed[:channels] / total
        var = packed[channels : 2 * channels] / total - mean * mean
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                momentum = 0.1 if self.momentum is None else self.momentum
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
                self.num_batches_tracked.add_(1)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """BatchNorm layers -> synchronised ones: ``nn.SyncBatchNorm`` on CUDA, the CPU variant on
    gloo. Parameters and buffers are shared with the original layers."""
    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, CPUSyncBatchNorm
    ):
        out = CPUSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device_type))
    return out
