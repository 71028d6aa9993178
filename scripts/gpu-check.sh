#!/usr/bin/env bash
# gpu-check.sh — check kdrun on a GPU machine in one command: install what is missing, print the
# GPU and torch facts, run the GPU test tier (pytest -m gpu) and the throughput benchmark
# (benchmarks/gpu_throughput.py), and write the results into one directory.
#
#   scripts/gpu-check.sh [--smoke] [WHEEL_DIR]
#
#   --smoke    check the script itself on any machine, also without a GPU: the tier runs (and
#              skips without CUDA), the benchmark runs with its tiny --smoke settings
#   WHEEL_DIR  (or $KDRUN_WHEELS) install kdrun's dependencies from this directory only
#
# Output directory: $OUT if set, else outputs/gpu-check/:
#   environment.txt                  nvidia-smi and torch facts
#   pytest-gpu.log, pytest-gpu.xml   the GPU tier's output and JUnit report
#   gpu_throughput.json / .md        images/s per method, compile on/off, device/worker loader
#   gpu-check.json / .md             summary: machine, what ran, how long, results
# Exit status: 0 passed; 1 the GPU tier failed or timed out; 2 setup failed (no GPU, install);
# 3 the tier passed but the benchmark failed.
#
# Python: an interpreter that already imports kdrun from this checkout with its test tools
# ($PYTHON, default python3, or an existing $KDRUN_VENV) is used as is. Otherwise a venv is
# created at $KDRUN_VENV (default .venv-gpu) with --system-site-packages, so a preinstalled torch
# is kept, and `pip install -e ".[dev]"` runs in it: from the package registry, or with a wheel
# directory from that directory only (--no-index --find-links), for machines without registry
# access. Make the directory on a machine with internet, the same OS and Python version, pinning
# torch to the GPU machine's version so the matching torchvision comes with it:
#   pip download -d kdrun-wheels ".[dev]" "setuptools>=68" wheel "torch==<its version>"
#
# Time budget: the whole check stays under $KDRUN_GPU_CHECK_TOTAL_S (default 470 s, under 8
# minutes on one H100-class GPU): install at most 120 s, the tier at most
# $KDRUN_GPU_CHECK_TIER_S (default 270 s), the benchmark the rest (it skips the configurations it
# has no time left for, and lists them as skipped).
set -euo pipefail

PROG=${0##*/}
die() {
    echo "$PROG: error: $*" >&2
    exit 2
}
log() { echo "$PROG: $*" >&2; }

SMOKE=0
WHEELS=${KDRUN_WHEELS:-}
for arg in "$@"; do
    case "$arg" in
    --smoke) SMOKE=1 ;;
    -h | --help)
        sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    -*) die "unknown option $arg (see $PROG --help)" ;;
    *) WHEELS=$arg ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
OUT_DIR=${OUT:-$ROOT/outputs/gpu-check}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd -P)
PYTHON=${PYTHON:-python3}
VENV=${KDRUN_VENV:-$ROOT/.venv-gpu}
TOTAL_S=${KDRUN_GPU_CHECK_TOTAL_S:-470}
TIER_S=${KDRUN_GPU_CHECK_TIER_S:-270}
INSTALL_S=120
START=$SECONDS

if [[ -n "$WHEELS" ]]; then
    [[ -d "$WHEELS" ]] || die "wheel directory $WHEELS does not exist"
    WHEELS=$(cd "$WHEELS" && pwd -P)
fi

# ---- Python with kdrun and its test tools -------------------------------------------------------
# usable PY: imports kdrun from this checkout (run from another directory, so the checkout is not
# on sys.path by accident) and everything the tier and the benchmark need
usable() {
    (cd / && "$1" - "$ROOT" <<'EOF') >/dev/null 2>&1
import os, sys
import hydra, omegaconf, optuna, pytest, pytest_timeout, rich, submitit, torch, torchvision, wandb
import kdrun
sys.exit(0 if os.path.realpath(kdrun.__file__).startswith(os.path.realpath(sys.argv[1])) else 1)
EOF
}

PY=""
if command -v "$PYTHON" >/dev/null 2>&1 && usable "$PYTHON"; then
    PY=$(command -v "$PYTHON")
elif [[ -x "$VENV/bin/python" ]] && usable "$VENV/bin/python"; then
    PY=$VENV/bin/python
else
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3)"
    if [[ ! -x "$VENV/bin/python" ]]; then
        log "creating $VENV (system site packages: a preinstalled torch stays)"
        "$PYTHON" -m venv --system-site-packages "$VENV" ||
            die "could not create a venv with $PYTHON (Debian/Ubuntu: apt-get install python3-venv)"
    fi
    pip_args=(install --disable-pip-version-check -q -e ".[dev]")
    if [[ -n "$WHEELS" ]]; then
        pip_args+=(--no-index --find-links "$WHEELS")
        log "installing kdrun from $WHEELS (no index)"
    else
        log "installing kdrun from the package registry (give a wheel directory if there is none)"
    fi
    timeout "$INSTALL_S" "$VENV/bin/python" -m pip "${pip_args[@]}" ||
        die "pip install -e .[dev] failed or took over ${INSTALL_S}s (see $PROG --help: wheel directory)"
    usable "$VENV/bin/python" || die "kdrun does not import from $ROOT in $VENV after the install"
    PY=$VENV/bin/python
fi
PATH="$(dirname "$PY"):$PATH"
export PATH
log "python: $PY"

# ---- facts --------------------------------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "kdrun: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv || true
        nvidia-smi || true
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"CUDA available: {torch.cuda.is_available()}, GPUs: {n}")
for i in range(n):
    cap = torch.cuda.get_device_capability(i)
    props = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {props.name}, capability {cap[0]}.{cap[1]}, "
          f"{props.total_memory / 2**30:.1f} GiB, native bf16: {cap >= (8, 0)}")
if n and torch.distributed.is_nccl_available():
    print("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
EOF
} 2>&1 | tee "$OUT_DIR/environment.txt"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    ((SMOKE)) || die "torch sees no CUDA GPU (facts in $OUT_DIR/environment.txt); --smoke checks the script without one"
    log "no CUDA GPU: --smoke, the GPU tier will skip"
fi

# ---- the GPU tier -------------------------------------------------------------------------------
log "GPU tier: pytest -m gpu (at most ${TIER_S}s)"
tier_start=$SECONDS
set +e
timeout --kill-after=15 "$TIER_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider --timeout=200 \
    --junitxml="$OUT_DIR/pytest-gpu.xml" 2>&1 | tee "$OUT_DIR/pytest-gpu.log"
tier_rc=${PIPESTATUS[0]}
set -e
tier_s=$((SECONDS - tier_start))

# ---- throughput ---------------------------------------------------------------------------------
bench_s_left=$((TOTAL_S - (SECONDS - START) - 10))
bench_rc=0
bench_start=$SECONDS
if ((bench_s_left < 30)); then
    log "no time left for the benchmark"
    bench_rc=124
else
    bench_args=(--out "$OUT_DIR" --budget-s "$((bench_s_left * 2 / 3))")
    ((SMOKE)) && bench_args+=(--smoke)
    log "throughput benchmark (at most ${bench_s_left}s)"
    set +e
    timeout --kill-after=10 "$bench_s_left" "$PY" benchmarks/gpu_throughput.py "${bench_args[@]}"
    bench_rc=$?
    set -e
fi
bench_s=$((SECONDS - bench_start))

# ---- summary ------------------------------------------------------------------------------------
"$PY" - "$OUT_DIR" "$tier_rc" "$tier_s" "$bench_rc" "$bench_s" "$((SECONDS - START))" "$SMOKE" <<'EOF'
import json, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
tier_rc, tier_s, bench_rc, bench_s, total_s, smoke = map(int, sys.argv[2:])
tier = {"exit_status": tier_rc, "seconds": tier_s, "timed_out": tier_rc in (124, 137)}
try:
    suites = ET.parse(out / "pytest-gpu.xml").getroot()
    cases = list(suites.iter("testcase"))
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    tier.update(tests=len(cases), failed=len(failed), skipped=len(skipped),
                passed=len(cases) - len(failed) - len(skipped),
                failures=[f"{c.get('classname')}::{c.get('name')}" for c in failed])
except (OSError, ET.ParseError):
    tier["report"] = "no JUnit report (the tier did not finish)"
bench = {"exit_status": bench_rc, "seconds": bench_s}
env = (out / "environment.txt").read_text() if (out / "environment.txt").is_file() else ""
summary = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "smoke": bool(smoke), "total_seconds": total_s, "gpu_tier": tier, "benchmark": bench,
    "environment": env.splitlines(),
}
(out / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")
result = "passed" if tier_rc == 0 else ("timed out" if tier["timed_out"] else "FAILED")
lines = ["# kdrun GPU check" + (" (smoke, not a GPU measurement)" if smoke else ""), "",
         f"{summary['date']}, {total_s} s in total.", "", "```", env.rstrip(), "```", "",
         f"GPU tier (`pytest -m gpu`): {result} in {tier_s} s"]
if "tests" in tier:
    lines[-1] += (f": {tier['passed']} passed, {tier['failed']} failed, "
                  f"{tier['skipped']} skipped of {tier['tests']}")
lines += [f"- failed: `{name}`" for name in tier.get("failures", [])]
lines += ["", f"Benchmark: exit status {bench_rc} in {bench_s} s.", ""]
table = out / "gpu_throughput.md"
if table.is_file():
    lines.append(table.read_text().replace("# Training throughput", "## Training throughput", 1))
(out / "gpu-check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

log "results in $OUT_DIR (gpu-check.md, gpu-check.json)"
if ((tier_rc != 0)); then
    log "the GPU tier failed (exit status $tier_rc): see $OUT_DIR/pytest-gpu.log"
    exit 1
fi
if ((bench_rc != 0)); then
    log "the benchmark failed (exit status $bench_rc)"
    exit 3
fi
