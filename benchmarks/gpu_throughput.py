"""GPU training throughput: images/s of ``ce``, ``ps_kd`` and ``lsskd`` on CIFAR-100-shaped data.

Every configuration trains the CIFAR-stem ResNet-18 (``model=resnet18``) with bf16 autocast and
channels-last on an in-memory synthetic set shaped like CIFAR-100 (32x32 RGB, 100 classes,
50,000 samples by default), through kdrun's own trainer (``benchmarks/run.py``'s
``make_trainer``: the same ``RunContext.make_trainer`` a real run uses), for each combination of

    method   ce, ps_kd, lsskd
    compile  off, on          hardware.compile (torch.compile of the model + method step)
    loader   device, workers  dataset.loader (batches gathered and augmented on the GPU, or a
                              DataLoader with per-sample transforms in worker processes)

A configuration first trains ``--warmup-steps`` untimed steps (cuDNN autotuning, compilation,
worker start-up), then one full epoch is timed between two ``torch.cuda.synchronize()`` calls;
nothing inside the epoch synchronises for the timer. Both run at the same epoch number, so the
methods' per-epoch constants (PS-KD's alpha) do not change and compiled code is not recompiled
in the timed epoch; ``trainer.drop_last=true`` keeps every batch the same shape. Images/s is the
number of samples trained in the timed epoch over its wall time (LSSKD trains each image in 4
rotations; it counts once). Peak memory is ``torch.cuda.max_memory_allocated`` in that epoch.

Results go to ``<out>/gpu_throughput.json`` and ``<out>/gpu_throughput.md`` (a markdown table),
rewritten after every configuration so an interrupted run keeps what it measured.
``--budget-s`` skips (and lists as skipped) the configurations that would start after that many
seconds. The exit status is 1 if any configuration failed.

    python benchmarks/gpu_throughput.py --out outputs/gpu-check            # on a GPU: a few minutes
    python benchmarks/gpu_throughput.py --smoke --out outputs/gpu-smoke    # tiny, runs on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run import compose_cfg, machine, make_trainer, samples_per_epoch  # noqa: E402
from kdrun.data.datasets import build_datasets  # noqa: E402

METHODS = ("ce", "ps_kd", "lsskd")
LOADERS = ("device", "workers")


@dataclass(frozen=True)
class Config:
    method: str
    compile: bool
    loader: str

    @property
    def name(self) -> str:
        return f"{self.method} compile={'on' if self.compile else 'off'} loader={self.loader}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu-throughput")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    parser.add_argument("--compile", choices=("both", "off", "on"), default="both")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off", "auto"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=None, help="skip configs after this")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings that finish in seconds on a CPU (resnet8, 16 px, 128 samples, fp32, "
        "no compile): proves the benchmark runs, measures nothing",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.image_size, args.train_size = "resnet8", 16, 128
        args.batch_size, args.warmup_steps, args.num_workers = 32, 1, 1
        args.compile, args.amp = "off", "off"
    return args


def configs(args: argparse.Namespace) -> list[Config]:
    """Eager first (device, then workers), then compiled: the cheap measurements come first."""
    compiles = {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]
    return [
        Config(method, compiled, loader)
        for compiled in compiles
        for loader in args.loaders
        for method in args.methods
    ]


def overrides(args: argparse.Namespace, config: Config) -> tuple[str, ...]:
    return (
        f"dataset.options.num_classes={args.num_classes}",
        f"hardware.amp={args.amp}",
        "hardware.channels_last=true",
        f"hardware.compile={str(config.compile).lower()}",
        f"hardware.num_workers={args.num_workers}",
        f"dataset.loader={config.loader}",
        "trainer.drop_last=true",
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer, warmup_steps: int) -> dict[str, float]:
    """Untimed warm-up steps, then one timed full epoch at the same epoch number."""
    device = trainer.device
    loader = trainer.loader
    full_epoch = loader.limit_batches
    loader.limit_batches = max(1, warmup_steps)
    trainer.step_in_epoch = 0
    started = time.perf_counter()
    trainer.train_one_epoch()
    synchronize(device)
    warmup_s = time.perf_counter() - started
    loader.limit_batches = full_epoch
    trainer.step_in_epoch = 0
    samples = samples_per_epoch(trainer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    trainer.train_one_epoch()
    synchronize(device)
    epoch_s = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return {
        "images_per_s": samples / epoch_s,
        "epoch_s": epoch_s,
        "samples": samples,
        "steps": len(loader),
        "warmup_steps": loader.limit_batches or max(1, warmup_steps),
        "warmup_s": warmup_s,
        "peak_mem_gib": peak,
        "amp": trainer.hw.amp,
    }


def device_facts(device: torch.device) -> dict[str, object]:
    facts: dict[str, object] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(
            gpu=props.name,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return facts


def markdown(report: dict) -> str:
    s = report["settings"]
    title = "smoke settings: checks the benchmark runs, not a measurement" if s["smoke"] else ""
    lines = [
        "# Training throughput (kdrun benchmarks/gpu_throughput.py)",
        "",
        f"Machine: {report['machine']}.",
        f"{s['model']}, {s['train_size']} synthetic {s['image_size']}x{s['image_size']} images, "
        f"{s['num_classes']} classes, batch {s['batch_size']}, amp {s['amp']}, channels-last; "
        f"one timed epoch after {s['warmup_steps']} untimed warm-up step(s). {title}".rstrip(),
        "",
        "| method | compile | loader | images/s | epoch s | peak GiB | images/s of ce |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    by_key = {(r["method"], r["compile"], r["loader"]): r for r in report["results"]}
    for r in report["results"]:
        compiled = "on" if r["compile"] else "off"
        if r["status"] != "measured":
            lines.append(
                f"| {r['method']} | {compiled} | {r['loader']} | {r['status']} | | | |"
                if r["status"] == "skipped"
                else f"| {r['method']} | {compiled} | {r['loader']} | failed: "
                f"{r['error'].splitlines()[0][:80]} | | | |"
            )
            continue
        ce = by_key.get(("ce", r["compile"], r["loader"]))
        ratio = (
            f"{r['images_per_s'] / ce['images_per_s']:.2f}x"
            if ce and ce["status"] == "measured"
            else ""
        )
        peak = "" if math.isnan(r["peak_mem_gib"]) else f"{r['peak_mem_gib']:.2f}"
        lines.append(
            f"| {r['method']} | {compiled} | {r['loader']} | {r['images_per_s']:,.0f} | "
            f"{r['epoch_s']:.2f} | {peak} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_throughput.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="kdrun-gpu-throughput-"))
    todo = configs(args)
    # one dataset for every configuration (the options every config composes to)
    cfg = compose_cfg(
        [
            "dataset=synthetic",
            f"dataset.options.train_size={args.train_size}",
            "dataset.options.test_size=64",
            f"dataset.options.image_size={args.image_size}",
            f"dataset.options.channels={args.channels}",
            *overrides(args, todo[0]),
        ]
    )
    data = build_datasets("synthetic", root=str(tmp), **dict(cfg.dataset.options))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"machine": machine(), "device": device_facts(device), "settings": settings}
    report["results"] = results = []
    failed = False
    for config in todo:
        row: dict[str, object] = {
            "method": config.method,
            "compile": config.compile,
            "loader": config.loader,
        }
        if args.budget_s is not None and time.monotonic() - started > args.budget_s:
            row["status"] = "skipped"
            results.append(row)
            write(report, args.out)
            continue
        print(f"{config.name} ...", flush=True)
        trainer = None
        try:
            trainer = make_trainer(
                config.method, args, device, tmp, overrides(args, config), data=data
            )
            row.update(measure(trainer, args.warmup_steps), status="measured")
            print(
                f"  {row['images_per_s']:,.0f} images/s ({row['epoch_s']:.2f} s epoch, "
                f"warm-up {row['warmup_s']:.1f} s)",
                flush=True,
            )
        except Exception as exc:  # one failing configuration must not hide the others
            failed = True
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        finally:
            del trainer
            gc.collect()
            if config.compile:
                torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(row)
        write(report, args.out)
    report["total_s"] = time.monotonic() - started
    write(report, args.out)
    print(markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
