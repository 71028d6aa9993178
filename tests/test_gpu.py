"""The GPU tier: what a GPU user runs first, on the GPU. Every test here but the last is marked
``gpu`` and skipped without CUDA (``tests/conftest.py``); ``pytest -m gpu`` runs the tier,
``scripts/gpu-check.sh`` runs it on a fresh GPU machine.

* every method (``conf/method/*.yaml``) trains a few steps on CIFAR-shaped data (synthetic,
  32x32 RGB, 100 classes) with bf16, with fp16 + GradScaler, and with channels-last; ``ce`` and
  ``ps_kd`` also under ``torch.compile``. The steps after a warm-up run under
  ``torch.cuda.set_sync_debug_mode("error")``: any synchronising CUDA call (``item()``, a
  blocking copy, ``nonzero``, ...) in the training step raises. Only the loop over the epoch's
  batches is checked; the epoch-end read of the device-side meters (the one host sync of an
  epoch, with ``trainer.log_every`` out of reach) comes after it;
* ``hardware.amp=auto`` picks bf16 on GPUs with native bf16 (compute capability 8.0+) and fp16
  otherwise;
* ``kill -9`` of ``kdrun hardware=gpu`` and the same command again: identical final metrics and
  weights to the uninterrupted run (``hardware.deterministic=true``); checkpoints written on the
  CPU resume on the GPU and the other way round;
* a PS-KD / LSSKD bank in pinned host memory (``method.bank_device=cpu_pinned``) ends equal to
  the bank kept on the GPU;
* ``torchrun`` with NCCL over every visible GPU (one is enough) gives the single-GPU result.

The last test is not marked ``gpu``: it runs ``benchmarks/gpu_throughput.py --smoke`` on the CPU
and checks it writes its JSON file and markdown table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdrun.stages import StageRunner
from tests.conftest import run_kdrun, start_kdrun
from tests.dist_utils import free_port
from tests.method_utils import build_method, tiny_context
from tests.test_cli import only_run_dir, wait_for_glob

# cuBLAS reads this when its first handle is created: deterministic GEMMs for the equality tests
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))

#: CIFAR-shaped synthetic data: 512 32x32 RGB images of 100 classes, 4 steps of 64 per epoch
CIFAR_SHAPED = [
    "dataset.options.image_size=32",
    "dataset.options.num_classes=100",
    "dataset.options.train_size=512",
    "dataset.options.test_size=128",
    "trainer.batch_size=64",
    "trainer.limit_train_batches=4",
    "trainer.log_every=1000000",
    "trainer.epochs=3",
]
WARMUP_STEPS = 1  # untimed first step of the checked epoch (lazy initialisation, compilation)

MODES = {
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
    "channels_last": {"amp": "bf16", "channels_last": True},
}


def gpu_trainer(tmp_path: Path, method: str, overrides=(), **hardware):
    """A trainer for ``method`` on the GPU, built like the CLI builds it (teacher stages of
    two-stage methods included), with ``hardware`` fields (amp, channels_last, compile)."""
    cfg, ctx, _ = tiny_context(tmp_path, [f"method={method}", *CIFAR_SHAPED, *overrides])
    device = torch.device("cuda", torch.cuda.current_device())
    ctx = dataclasses.replace(
        ctx, hardware=dataclasses.replace(ctx.hardware, device=device, **hardware)
    )
    method_obj, model = build_method(cfg, ctx, StageRunner(ctx, cache_dir=tmp_path / "cache"))
    return ctx.make_trainer(model, method_obj)


@contextlib.contextmanager
def sync_errors_in_steps(trainer, warmup_steps: int = WARMUP_STEPS):
    """Every synchronising CUDA call raises while the epoch's batches after the first
    ``warmup_steps`` are fetched and trained; yields the list of checked step numbers."""
    original = trainer.loader.iter_from
    checked: list[int] = []

    def iter_from(start: int = 0):
        try:
            for step, batch in enumerate(original(start), start=start):
                if step == warmup_steps:
                    torch.cuda.set_sync_debug_mode("error")
                if step >= warmup_steps:
                    checked.append(step)
                yield batch
        finally:  # before the epoch-end meter read
            torch.cuda.set_sync_debug_mode("default")

    trainer.loader.iter_from = iter_from
    try:
        yield checked
    finally:
        trainer.loader.iter_from = original
        torch.cuda.set_sync_debug_mode("default")


def next_epoch(trainer) -> dict[str, float]:
    stats = trainer.train_one_epoch()
    trainer.epoch += 1
    trainer.step_in_epoch = 0
    return stats


def train_and_check_syncs(trainer, label: str, warmup_epochs: int = 1) -> dict[str, float]:
    """Warm-up epochs, then an epoch whose steps after the first must not synchronise."""
    for _ in range(warmup_epochs):
        next_epoch(trainer)
    with sync_errors_in_steps(trainer) as checked:
        try:
            stats = next_epoch(trainer)
        except RuntimeError as err:
            if "synchroniz" not in str(err):
                raise
            raise AssertionError(
                f"{label}: a training step synchronised with the host: {err}"
            ) from err
    assert checked == list(range(WARMUP_STEPS, len(trainer.loader))), checked
    return stats


def first_weight(trainer) -> torch.Tensor:
    return next(p for p in trainer.model.parameters() if p.dim() == 4).detach().clone()


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", list(MODES))
def test_method_trains_on_gpu_without_host_syncs(tmp_path, method, mode):
    trainer = gpu_trainer(tmp_path, method, **MODES[mode])
    assert trainer.device.type == "cuda" and trainer.hw.amp == MODES[mode]["amp"]
    before = first_weight(trainer)
    stats = train_and_check_syncs(trainer, f"{method} ({mode})")
    assert math.isfinite(stats["loss"]) and 0.0 <= stats["acc1"] <= 1.0, stats
    assert not torch.equal(first_weight(trainer), before), "the weights did not change"
    if mode == "fp16":
        assert trainer.scaler.is_enabled()
        assert math.isfinite(trainer.scaler.get_scale()) and trainer.scaler.get_scale() > 0
    if mode == "channels_last":
        convs = [p for p in trainer.model.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ce", "ps_kd"])
def test_compiled_training_on_gpu_without_host_syncs(tmp_path, method):
    torch._dynamo.reset()
    trainer = gpu_trainer(tmp_path, method, amp="bf16", channels_last=True, compile=True)
    assert hasattr(trainer.train_module, "_orig_mod"), "the train module is not compiled"
    before = first_weight(trainer)
    # checked in the first epoch, after the step that compiles: a new epoch changes PS-KD's
    # alpha, a Python float the compiled code is specialised on (one recompile per epoch)
    stats = train_and_check_syncs(trainer, f"{method} (torch.compile)", warmup_epochs=0)
    assert math.isfinite(stats["loss"]), stats
    assert not torch.equal(first_weight(trainer), before)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_amp_auto_picks_native_bf16_or_fp16():
    from kdrun.amp import resolve_amp

    native_bf16 = torch.cuda.get_device_capability() >= (8, 0)
    assert resolve_amp("auto", torch.device("cuda", 0)) == ("bf16" if native_bf16 else "fp16")


def cifar_shaped_run(train_size: int, test_size: int = 256) -> list[str]:
    return [
        "dataset=synthetic",
        "dataset.options.image_size=32",
        "dataset.options.num_classes=100",
        f"dataset.options.train_size={train_size}",
        f"dataset.options.test_size={test_size}",
        "model=resnet8",
        "method=ps_kd",
        "trainer.batch_size=64",
    ]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["model"]


FINAL_KEYS = ("test/acc1", "test/nll", "test/ece", "test/aurc", "test/brier", "test/acc1_max")


@pytest.mark.gpu
def test_resume_on_gpu_after_kill9_matches_uninterrupted_run(tmp_path):
    # 128 steps per epoch and a checkpoint every 8: the kill lands well before the end
    args = [
        *cifar_shaped_run(train_size=8192),
        "hardware=gpu",
        "hardware.deterministic=true",
        "trainer.epochs=4",
        "trainer.checkpoint_every_steps=8",
        "logger=wandb",
    ]
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir()
    kill_dir.mkdir()
    run_kdrun(args, cwd=ref_dir)
    proc = start_kdrun(args, cwd=kill_dir)
    wait_for_glob(kill_dir / "outputs" / "runs", "*/checkpoints/last.ckpt", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = only_run_dir(kill_dir)
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    killed_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert killed_at["epoch"] < 4, "the run ended before the kill: make it longer"
    out = run_kdrun(args, cwd=kill_dir)
    assert "(resumed)" in out.stdout
    ref_run = only_run_dir(ref_dir)
    ref_sum, new_sum = summary(ref_run), summary(run)
    native_bf16 = torch.cuda.get_device_capability() >= (8, 0)
    assert new_sum["amp"] == ref_sum["amp"] == ("bf16" if native_bf16 else "fp16")
    for key in FINAL_KEYS:
        assert new_sum[key] == ref_sum[key], key
    ref_w, new_w = weights(ref_run), weights(run)
    for name in ref_w:
        assert torch.equal(ref_w[name], new_w[name]), name
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if "test/acc1" in e] == [1, 2, 3, 4]
    steps = [e["step"] for e in events if "step" in e]
    assert steps == sorted(steps), "logged steps went backwards"
    run_id = (run / "wandb_id.txt").read_text().strip()
    fragments = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(fragments) == 2 and all(run_id in f.name for f in fragments)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


@pytest.mark.gpu
def test_checkpoints_move_between_cpu_and_gpu(tmp_path):
    """A checkpoint written on the CPU continues on the GPU, and one written on the GPU on the
    CPU (``resume=<path>``): RNG states and tensors load whatever device saved them."""
    base = [*cifar_shaped_run(train_size=256, test_size=128), "hardware.amp=off", "logger=none"]
    cpu_dir, gpu_dir, back_dir = (tmp_path / d for d in ("cpu", "gpu", "back"))
    for d in (cpu_dir, gpu_dir, back_dir):
        d.mkdir()
    run_kdrun([*base, "hardware=cpu", "trainer.epochs=1"], cwd=cpu_dir)
    cpu_ckpt = only_run_dir(cpu_dir) / "checkpoints" / "last.ckpt"
    run_kdrun([*base, "hardware=gpu", "trainer.epochs=2", f"resume={cpu_ckpt}"], cwd=gpu_dir)
    gpu_run = only_run_dir(gpu_dir)
    assert summary(gpu_run)["epochs"] == 2 and math.isfinite(summary(gpu_run)["test/nll"])
    gpu_ckpt = gpu_run / "checkpoints" / "last.ckpt"
    assert torch.load(gpu_ckpt, weights_only=True)["epoch"] == 2
    run_kdrun([*base, "hardware=cpu", "trainer.epochs=3", f"resume={gpu_ckpt}"], cwd=back_dir)
    back = summary(only_run_dir(back_dir))
    assert back["epochs"] == 3 and math.isfinite(back["test/nll"])
    events = (only_run_dir(back_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(e)["epoch"] for e in events if '"test/acc1"' in e] == [3]


@contextlib.contextmanager
def deterministic_cuda():
    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.backends.cudnn.benchmark = was[1]


def bank_state(method) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().clone()
        for k, v in method.state_dict().items()
        if torch.is_tensor(v) and "bank" in k
    }


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ps_kd", "lsskd"])
def test_pinned_cpu_bank_equals_device_bank(tmp_path, method):
    trained = {}
    with deterministic_cuda():
        for where in ("auto", "cpu_pinned"):
            (tmp_path / where).mkdir()
            trainer = gpu_trainer(
                tmp_path / where, method, [f"method.bank_device={where}"], amp="bf16"
            )
            for _ in range(2):
                next_epoch(trainer)
            torch.cuda.synchronize()
            trained[where] = trainer
    on_gpu, pinned = trained["auto"].method, trained["cpu_pinned"].method
    assert on_gpu.bank.values.is_cuda
    assert pinned.bank.values.device.type == "cpu" and pinned.bank.values.is_pinned()
    gpu_banks, pinned_banks = bank_state(on_gpu), bank_state(pinned)
    assert gpu_banks.keys() == pinned_banks.keys() and gpu_banks
    assert all(bool(v.any()) for k, v in pinned_banks.items() if k.endswith("written"))
    for key, value in gpu_banks.items():
        assert torch.equal(pinned_banks[key], value), key
    ref_w, new_w = trained["auto"].model.state_dict(), trained["cpu_pinned"].model.state_dict()
    for name in ref_w:
        assert torch.equal(ref_w[name], new_w[name]), name


@pytest.mark.gpu
def test_torchrun_nccl_on_every_gpu_matches_single_gpu(tmp_path):
    """``torchrun --nproc_per_node=<GPUs>`` with ``hardware=ddp``: NCCL (with 2+ GPUs; one
    GPU is one process without a process group), an uneven last batch (1,000 samples, batch
    64), and per-epoch test NLL within fp32 drift of the single-GPU run."""
    gpus = torch.cuda.device_count()
    args = [
        *cifar_shaped_run(train_size=1000),
        "trainer.epochs=2",
        "hardware.amp=off",
        "hardware.deterministic=true",
        "logger=none",
    ]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    run_kdrun([*args, "hardware=gpu", "hardware.channels_last=false"], cwd=single)
    env = {
        **os.environ,
        "KDRUN_DATA_DIR": str(ddp / "data"),
        "MASTER_ADDR": "127.0.0.1",
        "NCCL_DEBUG": "INFO",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={gpus}",
        f"--master_port={free_port()}",
        "-m",
        "kdrun",
        *args,
        "hardware=ddp",
    ]
    proc = subprocess.run(cmd, cwd=ddp, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    if gpus > 1:
        assert "NCCL INFO" in output, "NCCL was not used"
    run, ref = only_run_dir(ddp), only_run_dir(single)
    assert summary(run)["world_size"] == gpus
    assert f"world size {gpus}" in (run / "kdrun.log").read_text()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"

    def nll_per_epoch(path: Path) -> list[float]:
        events = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [e["test/nll"] for e in events if "test/nll" in e]

    got, want = nll_per_epoch(run), nll_per_epoch(ref)
    assert len(got) == len(want) == 2
    assert got == pytest.approx(want, rel=1e-2)


def test_gpu_throughput_benchmark_smoke_runs_on_cpu(tmp_path):
    """``benchmarks/gpu_throughput.py --smoke`` runs end to end here (CPU, tiny settings) and
    writes its JSON results and markdown table."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_throughput.py"),
            "--smoke",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_throughput.json").read_text())
    rows = report["results"]
    assert {(r["method"], r["loader"]) for r in rows} == {
        (m, loader) for m in ("ce", "ps_kd", "lsskd") for loader in ("device", "workers")
    }
    assert all(r["status"] == "measured" and not r["compile"] for r in rows), rows
    assert all(r["images_per_s"] > 0 and r["samples"] == 128 for r in rows), rows
    table = (out / "gpu_throughput.md").read_text()
    assert table.count("\n| ") == 1 + len(rows), table  # the header and one row per config
    assert "| lsskd | off | workers |" in table and "smoke settings" in table


@pytest.mark.slow
def test_gpu_check_script_smoke_runs_without_a_gpu(tmp_path):
    """``scripts/gpu-check.sh --smoke`` end to end with this interpreter: facts, the GPU tier
    (skipped without CUDA), the benchmark's smoke settings, and the summary files."""
    out = tmp_path / "gpu-check"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("environment.txt", "pytest-gpu.xml", "gpu_throughput.json", "gpu-check.md"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "gpu-check.json").read_text())
    assert summary["smoke"] and summary["gpu_tier"]["exit_status"] == 0
    tier = summary["gpu_tier"]
    expected = tier["skipped"] if not torch.cuda.is_available() else tier["passed"]
    assert tier["tests"] >= len(METHODS) * len(MODES) and expected == tier["tests"], tier
    assert "| lsskd | off | workers |" in (out / "gpu-check.md").read_text()
