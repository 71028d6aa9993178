"""kdrun benchmarks: method overhead per epoch relative to ``ce``, and metric computation time.

Every method trains the same model on the same data with the same batches; methods are run in
interleaved rounds (ce, m1, m2, then m1, m2, ce, ...: the order rotates) inside ONE process so
machine-load drift hits all of them alike. Three ratios to ce are reported: of the median epoch
times, the median of per-round ratios (each epoch against ce's epoch of the same round), and of
the minimum (least-disturbed) epoch times. Printed as a table (and written as JSON with
``--json``), with the machine it ran on.

Defaults: small_cnn (the smallest model, so the method's own work weighs the most), 28x28
synthetic data, short epochs (512 samples = 4 steps) and many rounds (201). Short epochs matter on
shared or frequency-scaling machines: CPU speed drifts over seconds, and only methods timed within
a fraction of a second of each other see the same speed. The fixed per-epoch costs (one host sync
for the epoch's figures) are the same for every method and make up a few percent of such an epoch.

    python benchmarks/run.py                      # the defaults above (~2 min on 2 CPU cores)
    python benchmarks/run.py --model resnet8 --image-size 32 --rounds 5 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import open_dict  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from kdrun.amp import resolve_amp  # noqa: E402
from kdrun.build import hardware_settings, trainer_settings  # noqa: E402
from kdrun.console import SilentConsole  # noqa: E402
from kdrun.data.datasets import build_datasets  # noqa: E402
from kdrun.data.spec import Datasets  # noqa: E402
from kdrun.loggers.base import MultiLogger  # noqa: E402
from kdrun.metrics import classification_metrics  # noqa: E402
from kdrun.stages import RunContext, StageRunner  # noqa: E402

DEFAULT_METHODS = ["ce", "label_smoothing", "tf_kd_reg", "ps_kd"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def make_trainer(
    method_name: str,
    args,
    device: torch.device,
    tmp: Path,
    overrides: tuple[str, ...] = (),
    data: Datasets | None = None,
):
    """A trainer for ``method_name`` on the benchmark data. ``overrides`` come last (they win,
    e.g. ``hardware.amp=bf16``); ``data`` reuses datasets already built for the same options."""
    cfg = compose_cfg(
        [
            f"method={method_name}",
            "dataset=synthetic",
            f"model={args.model}",
            "hardware=cpu",
            "logger=none",
            f"trainer.batch_size={args.batch_size}",
            "trainer.log_every=1000000",
            f"dataset.options.train_size={args.train_size}",
            "dataset.options.test_size=64",
            f"dataset.options.image_size={args.image_size}",
            f"dataset.options.channels={args.channels}",
            f"trainer.epochs={10**6}",
            *overrides,
        ]
    )
    if data is None:
        data = build_datasets("synthetic", root=str(tmp), **dict(cfg.dataset.options))
    ctx = RunContext(
        cfg=cfg,
        data=data,
        hardware=hardware_settings(cfg, device, resolve_amp(cfg.hardware.amp, device)),
        settings=trainer_settings(cfg),
        logger=MultiLogger([]),
        console=SilentConsole(),
        run_dir=tmp / method_name,
        seed=0,
    )
    if "teacher_epochs" in cfg.method:  # two-stage methods: a short teacher stage, not timed
        with open_dict(cfg):
            cfg.method.teacher_epochs = args.teacher_epochs
    method = instantiate(
        cfg.method, num_classes=data.spec.num_classes, num_samples=int(data.train_targets.shape[0])
    )
    method.prepare(StageRunner(ctx, cache_dir=tmp / "teachers", resume=False))
    return ctx.make_trainer(ctx.new_model(), method)


def samples_per_epoch(trainer) -> int:
    """Samples the method trains on per epoch (fewer than N for methods that drop samples)."""
    trainer.loader.set_epoch(trainer.epoch)
    return sum(int(b.numel()) for b in trainer.loader.sampler.global_batches())


def time_epoch(trainer) -> float:
    trainer.step_in_epoch = 0
    start = time.perf_counter()
    trainer.train_one_epoch()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    trainer.epoch += 1
    return time.perf_counter() - start


def ratios(times: dict[str, list[float]], samples: dict[str, int]) -> dict[str, dict[str, float]]:
    base, base_min = statistics.median(times["ce"]), min(times["ce"])
    return {
        m: {
            # epoch time per trained sample, relative to ce's (methods that drop samples)
            "samples": samples[m],
            "ratio_per_sample": statistics.median(t) / samples[m] / (base / samples["ce"]),
            "median_s": statistics.median(t),
            "ratio": statistics.median(t) / base,
            # each epoch against ce's epoch of the same round (seconds apart): robust to drift
            "ratio_paired": statistics.median(a / b for a, b in zip(t, times["ce"])),
            "min_s": min(t),
            "max_s": max(t),
            "ratio_min": min(t) / base_min,
        }
        for m, t in times.items()
    }


def bench_methods(args, device: torch.device) -> dict[str, dict[str, float]]:
    """Per method: epoch-time statistics and ratios to ce."""
    tmp = Path(tempfile.mkdtemp(prefix="kdrun-bench-"))
    trainers = {m: make_trainer(m, args, device, tmp) for m in args.methods}
    for trainer in trainers.values():  # warm-up epoch (allocator, oneDNN primitives)
        time_epoch(trainer)
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    names = list(trainers)
    for r in range(args.rounds):
        # rotate the order every round so no method always runs first (or after the same one)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(time_epoch(trainers[name]))
    return ratios(times, {m: samples_per_epoch(t) for m, t in trainers.items()})


def bench_metrics(device: torch.device, repeats: int = 5) -> float:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50_000, 100, generator=gen).to(device)
    labels = torch.randint(0, 100, (50_000,), generator=gen).to(device)
    classification_metrics(logits, labels, n_bins=15)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        classification_metrics(logits, labels, n_bins=15)
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {gpu}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=201)
    parser.add_argument(
        "--teacher-epochs", type=int, default=1, help="teacher stage length of two-stage methods"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if "ce" not in args.methods:
        args.methods = ["ce", *args.methods]
    device = torch.device(args.device)
    console = Console(width=max(Console().width, 140))
    console.print(f"machine: {machine()}")
    results = bench_methods(args, device)
    metric_s = bench_metrics(device)
    table = Table(
        title=f"per-epoch time relative to ce ({args.model}, {args.train_size} "
        f"{args.image_size}px samples, batch {args.batch_size}, {args.rounds} interleaved rounds)"
    )
    columns = (
        "method",
        "median epoch s",
        "min s",
        "max s",
        "ratio (median)",
        "ratio (paired)",
        "ratio (min)",
        "samples",
        "per sample",
    )
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['median_s']:.3f}",
            f"{r['min_s']:.3f}",
            f"{r['max_s']:.3f}",
            f"{r['ratio']:.3f}x",
            f"{r['ratio_paired']:.3f}x",
            f"{r['ratio_min']:.3f}x",
            str(r["samples"]),
            f"{r['ratio_per_sample']:.3f}x",
        )
    console.print(table)
    console.print(
        f"classification_metrics on 50,000 x 100 logits: {metric_s * 1000:.0f} ms (best of 5)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "methods": results,
                    "metrics_50k_x_100_s": metric_s,
                    "args": {k: v for k, v in vars(args).items() if k != "json"},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
