"""Real DDP on two CPU processes (torchrun, gloo): one run dir, rank-0-only files, and final
weights, PS-KD bank and metrics equal to a single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_kdrun

ARGS = [
    "dataset=synthetic",
    "dataset.options.train_size=128",
    "dataset.options.test_size=64",
    "dataset.options.image_size=16",
    "model=resnet8",
    "logger=none",
    "trainer.epochs=2",
    "trainer.batch_size=32",
    "method=ps_kd",
    "hardware.device=cpu",
    "hardware.amp=off",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def only_run(cwd: Path) -> Path:
    runs = list((cwd / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_ddp_two_processes_equal_single_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    run_kdrun([*ARGS, "hardware=cpu"], cwd=single)
    env = {
        **os.environ,
        "KDRUN_DATA_DIR": str(ddp / "data"),
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "kdrun",
        *ARGS,
        "hardware=ddp",
        "hardware.sync_bn=true",
    ]
    proc = subprocess.run(cmd, cwd=ddp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run, ref = only_run(ddp), only_run(single)  # one run dir whatever the rank count
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    ref_summary = json.loads((ref / "summary.json").read_text())
    for key in ("test/acc1", "test/nll", "test/ece", "test/brier"):
        assert summary[key] == pytest.approx(ref_summary[key], abs=1e-5), key
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    ref_state = torch.load(ref / "checkpoints/last.ckpt", weights_only=True)
    for name, value in ref_state["model"].items():
        if value.is_floating_point():
            assert torch.allclose(state["model"][name], value, atol=1e-5), name
    # every rank wrote every sample's prediction into its bank: identical to the single run
    assert bool(state["method"]["bank.written"].all())
    assert torch.allclose(
        state["method"]["bank.values"], ref_state["method"]["bank.values"], atol=1e-5
    )
    # only rank 0 logs: each epoch's evaluation appears once
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if "test/acc1" in e] == [1, 2]
