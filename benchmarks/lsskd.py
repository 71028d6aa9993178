"""LSSKD cost: per-epoch time and peak training memory of ``lsskd`` relative to ``ce`` and ``ps_kd``.

Same model, data and batches for every method (synthetic data shaped like Fashion-MNIST by
default). LSSKD trains every batch as 4 rotated copies, so about 4x ``ce``'s compute is inherent;
the table also divides LSSKD's time by 4x ``ce``'s to show the overhead beyond that (the auxiliary
heads, their losses and banks).

* Time: interleaved rounds in one process with a rotating order (as ``benchmarks/run.py``); ratios
  of the median epoch times and the median of per-round ratios.
* Memory: peak tensor memory of training — the static tensors (parameters, heads, banks, counted
  from the tensors) plus the peak growth over the first epoch (gradients, optimizer state,
  activations, temporaries). On CPU the growth is the prefix-sum maximum of the PyTorch
  profiler's allocation records; on a GPU ``torch.cuda.max_memory_allocated``. Process overheads
  (interpreter, libraries, allocator caching) are not included.

    python benchmarks/lsskd.py                           # resnet8, 28x28x1, batch 64 (~3 min)
    python benchmarks/lsskd.py --model resnet20 --image-size 32 --channels 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from run import bench_methods, machine, make_trainer, time_epoch  # noqa: E402

METHODS = ["ce", "ps_kd", "lsskd"]


def static_bytes(trainer) -> dict[str, int]:
    """Parameter bytes of the backbone and of the method's own modules, and bank bytes."""
    model_b = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    method = trainer.method
    method_params = sum(p.numel() * p.element_size() for p in method.parameters())
    banks = sum(b.numel() * b.element_size() for b in method.buffers())
    return {"model_bytes": model_b, "method_param_bytes": method_params, "bank_bytes": banks}


def peak_tensor_growth_cpu(trainer) -> int:
    """Peak of the bytes allocated by tensors during one training epoch, above what existed
    before it: the prefix-sum maximum of the profiler's allocation/free records (activations,
    gradients, optimizer state created in the epoch, temporaries)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        time_epoch(trainer)
    deltas = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    level = peak = 0
    for _, nbytes in deltas:
        level += nbytes
        peak = max(peak, level)
    return peak


def measure_memory(method: str, args, device: torch.device) -> dict[str, float]:
    """Peak tensor memory of training ``method``: the static tensors (parameters, heads, banks)
    plus the peak growth during its first epoch (gradients, optimizer state, activations)."""
    tmp = Path(tempfile.mkdtemp(prefix="kdrun-bench-mem-"))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    trainer = make_trainer(method, args, device, tmp)
    static = static_bytes(trainer)
    if device.type == "cuda":
        time_epoch(trainer)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = sum(static.values()) + peak_tensor_growth_cpu(trainer)
    return {"peak_bytes": peak, **static}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    memory = {m: measure_memory(m, args, device) for m in METHODS}
    args.methods = METHODS
    times = bench_methods(args, device)  # benchmarks/run.py's interleaved, rotating rounds

    console = Console(width=max(Console().width, 170))
    console.print(f"machine: {machine()}")
    mib = 2**20
    table = Table(
        title=f"lsskd vs ce and ps_kd ({args.model}, {args.image_size}px x{args.channels}, "
        f"batch {args.batch_size}, {args.train_size} samples/epoch, {args.rounds} rounds)"
    )
    for col in (
        "method",
        "median epoch s",
        "x ce",
        "x ce (paired)",
        "x ps_kd",
        "x (4 x ce)",
        "peak tensor MiB",
        "x ce mem",
        "x ps_kd mem",
        "params+banks MiB",
    ):
        table.add_column(col, justify="right", no_wrap=True)
    for m in METHODS:
        t, mem = times[m], memory[m]
        static = mem["model_bytes"] + mem["method_param_bytes"] + mem["bank_bytes"]
        table.add_row(
            m,
            f"{t['median_s']:.3f}",
            f"{t['ratio']:.2f}x",
            f"{t['ratio_paired']:.2f}x",
            f"{t['median_s'] / times['ps_kd']['median_s']:.2f}x",
            f"{t['ratio'] / 4:.2f}x",
            f"{mem['peak_bytes'] / mib:.1f}",
            f"{mem['peak_bytes'] / memory['ce']['peak_bytes']:.2f}x",
            f"{mem['peak_bytes'] / memory['ps_kd']['peak_bytes']:.2f}x",
            f"{static / mib:.2f}",
        )
    console.print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "time": times, "memory": memory, "args": vars(args)},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
