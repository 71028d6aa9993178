"""The README's shell commands are tests: every command in a ```bash block runs here, as written,
so a documented command cannot break silently.

Extraction: the lines of each ```bash block; a line ending in ``\\`` continues on the next; a
line starting with ``#`` (including the ``#   <output>`` lines under a command) and a trailing
`` # comment`` are not part of the command. Output lines under a command are checked: the text of
each (up to its first digit, whitespace collapsed; ``...`` lines skipped) must appear in what
the command printed.

The marker: a command the suite does not run carries ``[manual: <reason>]`` in its trailing
comment, visible to readers, e.g. ``torchrun ... # 4 GPUs: NCCL [manual: needs 4 GPUs]``. Every
other command is run; a command that is neither marked nor one this module knows how to run
here (:data:`RUNNABLE`) fails :func:`test_every_readme_command_is_run_or_marked`, naming the line
and the marker to add.

How the commands run: with ``bash -c`` in a temp copy of the project (so ``scripts/...`` and
``make`` work and ``outputs/`` lands in the copy), in README order, all blocks sharing that copy;
``KDRUN_DATA_DIR`` points to small data in the real on-disk formats (a Fashion-MNIST in idx
files, CIFAR-10/100 in the pickled batches; commands naming ``dataset=cifar10/100`` run
``kdrun`` through a shim that accepts the fixture's checksums, since torchvision checks them).
Where Debian's dataset-fashion-mnist is installed, kdrun replaces the small Fashion-MNIST with
the package's 60,000 images (raw files of any other size count as missing), so the budget below
bounds the Fashion-MNIST commands by batches and epochs, not by the size of the data.
Placeholders are resolved from what earlier commands produced: ``<run>`` is the newest run dir,
``<sweep dir>`` the newest sweep dir, a lone ``...`` argument becomes :data:`ELLIPSIS_ARGS`.
SLURM commands (the block that starts ``scripts/slurm-local.sh``, and every ``launcher=slurm``
line) run on the local cluster of ``tests/test_slurm.py``'s fixture, which starts and stops it
itself; that test is skipped, with the reason, where the cluster cannot run.

CPU budget: commands documented with long runs get overrides appended (they win over the same
keys earlier on the line; the rest of the command stays as written). Each is listed with its
reason in :data:`BUDGET`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.test_slurm import slurm_cluster  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"\[manual: [^\]]+\]")
PLACEHOLDER = re.compile(r"<[^<>]+>")

#: what a lone ``...`` argument (``python -m kdrun ...``: "any arguments") stands for here
ELLIPSIS_ARGS = "logger=none trainer.epochs=1"

#: command (as extracted, placeholders unresolved) -> overrides appended for the CPU budget
BUDGET = {
    # the embedded default's 15 epochs run once, as written (`kdrun`); these two show a switch
    "kdrun logger=none": "trainer.epochs=2",
    "kdrun resume=never": "trainer.epochs=2",
    # starts from the 2-epoch run above: one more epoch, not the default's 13
    "kdrun resume=outputs/runs/<run>/checkpoints/last.ckpt": "trainer.epochs=3",
    # an epoch of Debian's 60,000 images (test_cli's Debian test trains it and checks the
    # accuracy): ten batches
    "kdrun dataset=fashion_mnist trainer.epochs=1": "trainer.limit_train_batches=10",
    # ten epochs of the 10 % subset: one
    "kdrun dataset=fashion_mnist dataset.fraction=0.1": "trainer.epochs=1",
    # 200-epoch ResNet-18 / WRN recipes: one epoch of two batches on the 256-image fixture
    "kdrun method=label_smoothing dataset=cifar100": (
        "trainer.epochs=1 trainer.limit_train_batches=2 logger=none"
    ),
    "kdrun dataset=cifar100 model=wrn_40_2 optim.lr=0.05 eval.n_bins=10": (
        "trainer.epochs=1 trainer.limit_train_batches=2 logger=none"
    ),
    # nine 30-epoch jobs: two epochs of four batches each
    "kdrun -m method=ce,label_smoothing,ps_kd seed=0,1,2 dataset=fashion_mnist "
    "dataset.fraction=0.1 trainer.epochs=30": "trainer.epochs=2 trainer.limit_train_batches=4",
    # six 5-epoch trials (60 s): two 2-epoch trials
    "kdrun hparams_search=ps_kd_alpha dataset=digits trainer.epochs=5 hydra.sweeper.n_trials=6": (
        "trainer.epochs=2 hydra.sweeper.n_trials=2"
    ),
    # 201 interleaved rounds (about 2 min): three
    "make bench": 'BENCH_ARGS="--rounds 3 --train-size 128"',
}

#: how a command may start to be run here (the program and, where it matters, its arguments)
RUNNABLE = re.compile(
    r"^(kdrun|kdrun-report|kdrun-hilbert|python -m kdrun|torchrun|wandb sync --dry-run"
    r"|make (lint|bench))\b"
)
#: done by the slurm_cluster fixture (start with the exports, stop at the end)
CLUSTER_LIFECYCLE = re.compile(r"slurm-local\.sh (start|stop)")


@dataclass
class Command:
    block: int  # index of the ```bash block
    heading: str  # the section it is in
    line: int  # 1-based line in README.md
    text: str  # the command, continuations joined, comment dropped
    comment: str  # its trailing comment
    output: list[str]  # the documented output lines under it

    @property
    def manual(self) -> bool:
        return bool(MARKER.search(self.comment))

    @property
    def slurm(self) -> bool:
        """Runs on the local SLURM cluster: a ``launcher=slurm`` line, or any line of the block
        that starts the cluster."""
        return "launcher=slurm" in self.text or self.block in SLURM_BLOCKS


def split_comment(line: str) -> tuple[str, str]:
    """``(code, comment)``: the comment starts at a ``#`` that begins a word outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def readme_commands(text: str) -> list[Command]:
    commands: list[Command] = []
    heading, block, in_block = "", -1, False
    pending: list[str] = []
    pending_comment, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not in_block:
            if raw.startswith("#"):
                heading = raw.lstrip("#").strip()
            if raw.strip() == "```bash":
                in_block, block = True, block + 1
            continue
        if raw.strip() == "```":
            in_block = False
            continue
        if not pending and raw.lstrip().startswith("#"):  # a comment, or output if "#   "
            output = raw.lstrip()[1:].strip()
            documented = raw.lstrip().startswith("#   ") and output != "..."
            if documented and commands and commands[-1].block == block:
                commands[-1].output.append(output)
            continue
        code, comment = split_comment(raw)
        if not pending:
            start, pending_comment = number, ""
        pending_comment = " ".join(c for c in (pending_comment, comment) if c)
        if code.endswith("\\"):
            pending.append(code[:-1].strip())
            continue
        pending.append(code.strip())
        joined = " ".join(p for p in pending if p)
        pending = []
        if joined:
            commands.append(Command(block, heading, start, joined, pending_comment, []))
    return commands


COMMANDS = readme_commands(README.read_text())
SLURM_BLOCKS = {c.block for c in COMMANDS if "slurm-local.sh start" in c.text}


def problems(command: Command) -> list[str]:
    """Why the suite could not run this unmarked command ([] if it can)."""
    if command.manual or CLUSTER_LIFECYCLE.search(command.text):
        return []
    found = []
    if not RUNNABLE.match(command.text):
        found.append("this suite does not know how to run it here")
    unresolved = [p for p in PLACEHOLDER.findall(command.text) if p not in ("<run>", "<sweep dir>")]
    if unresolved:
        found.append(f"placeholders {unresolved} have no value here")
    return found


def test_every_readme_command_is_run_or_marked():
    assert len(COMMANDS) >= 20, [c.text for c in COMMANDS]
    bad = [
        f"README.md:{c.line}: {c.text!r}: {'; '.join(problems(c))}" for c in COMMANDS if problems(c)
    ]
    assert not bad, (
        "README commands the suite can neither run nor skip; make them runnable here, or add "
        "'[manual: <why>]' to the line's trailing comment:\n" + "\n".join(bad)
    )
    # a budget whose command left the README would silently stop applying
    stale = sorted(set(BUDGET) - {c.text for c in COMMANDS})
    assert not stale, f"BUDGET entries for commands the README no longer has: {stale}"
    # the marker is used where it must be: no GPU, second node or W&B upload line runs here
    for c in COMMANDS:
        needs_gpus = any(k in c.text for k in ("gpus_per_node", "--nnodes", "nproc_per_node=4"))
        uploads = c.text.startswith("wandb sync") and "--dry-run" not in c.text
        if needs_gpus or uploads or c.text.startswith(("make demo", "make test", "make install")):
            assert c.manual, f"README.md:{c.line}: {c.text!r} needs a [manual: ...] marker"
    # the trailing-comment parser: quotes protect '#', continuations join
    assert split_comment('eval "$(x # y)"   # z') == ('eval "$(x # y)"', "z")
    joined = [c for c in COMMANDS if "--nnodes" in c.text]
    assert joined and all("-m kdrun" in c.text for c in joined)


# ---------------------------------------------------------------------------------------------
# the workspace: a copy of the project with small real-format data
# ---------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """An (uncompressed) idx file as torchvision's MNIST readers expect."""
    code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(root: Path, n_train: int = 600, n_test: int = 100) -> None:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        tint = (labels[:, None, None] * 20 + 30).astype(np.int16)
        images = np.clip(tint + rng.integers(-30, 30, (n, 28, 28)), 0, 255)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


SHIM = """#!{python}
import json, os, sys
sys.path.insert(0, {root!r})
from tests.fake_datasets import patched_cifar_checksums
with open(os.environ["KDRUN_README_CIFAR_MD5S"]) as fh:
    md5s = json.load(fh)
with patched_cifar_checksums(md5s):
    from kdrun.cli import main
    sys.argv[0] = "kdrun"
    main()
"""


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    shim_dir: Path

    def newest(self, pattern: str) -> Path | None:
        found = [p for p in self.root.glob(pattern) if p.is_dir()]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None


def project_copy(dest: Path) -> Path:
    """The project's tracked and untracked-not-ignored files (no run outputs) copied to ``dest``,
    so documented commands run as in a fresh checkout."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.startswith("outputs/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    from tests.fake_datasets import write_fake_cifar

    root = project_copy(tmp_path_factory.mktemp("readme") / "kdrun")
    data = root.parent / "data"
    write_fake_fashion_mnist(data)
    md5s = {}
    for which in ("cifar10", "cifar100"):
        md5s.update(write_fake_cifar(data, which=which, n_train=256, n_test=100))
    (root.parent / "cifar_md5s.json").write_text(json.dumps(md5s))
    shim_dir = root.parent / "shim"
    shim_dir.mkdir()
    (shim_dir / "kdrun").write_text(SHIM.format(python=sys.executable, root=str(ROOT)))
    (shim_dir / "kdrun").chmod(0o755)
    home = Path(os.environ["HOME"])  # conftest's isolated home (module scope: set again here)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "KDRUN_DATA_DIR": str(data),
        "KDRUN_README_CIFAR_MD5S": str(root.parent / "cifar_md5s.json"),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
        # an active environment, as the Makefile expects of a user who installed kdrun
        "VIRTUAL_ENV": sys.prefix,
        "PYTHON": sys.executable,
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(home / ".config" / "wandb"),
    }
    for var in ("WANDB_API_KEY", "WANDB_MODE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID"):
        env.pop(var, None)
    return Workspace(root, env, shim_dir)


def resolve(command: Command, ws: Workspace) -> str:
    text = command.text
    if "<run>" in text:
        run = ws.newest("outputs/runs/*")
        assert run is not None, f"README.md:{command.line}: no run dir yet for <run>"
        text = text.replace("<run>", run.name)
    if "<sweep dir>" in text:
        sweep = ws.newest("outputs/multiruns/*")
        assert sweep is not None, f"README.md:{command.line}: no sweep dir yet for <sweep dir>"
        text = text.replace("<sweep dir>", sweep.name)
    text = re.sub(r"(?<=\s)\.\.\.(?=\s|$)", ELLIPSIS_ARGS, text)
    if command.text in BUDGET:
        text = f"{text} {BUDGET[command.text]}"
    return text


def documented_prefix(line: str) -> str:
    """A documented output line up to its first digit (values differ from run to run)."""
    return " ".join(re.split(r"\d", line, maxsplit=1)[0].split())


def run_command(command: Command, ws: Workspace, env: dict[str, str], timeout: float = 400) -> str:
    text = resolve(command, ws)
    if re.search(r"dataset=cifar(10|100)\b", text):
        env = {**env, "PATH": f"{ws.shim_dir}:{env['PATH']}"}
    runs_before = set(ws.root.glob("outputs/runs/*")) | set(ws.root.glob("outputs/multiruns/*"))
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", text],
        cwd=ws.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.monotonic() - started
    print(f"README.md:{command.line}: {elapsed:6.1f} s  {text}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"README.md:{command.line}: `{text}` failed ({proc.returncode}):\n{output[-5000:]}"
    )
    flat = " ".join(output.split())
    for line in command.output:
        assert documented_prefix(line) in flat, (
            f"README.md:{command.line}: the documented output {line!r} is not in what "
            f"`{text}` printed:\n{output[-3000:]}"
        )
    trains = re.match(r"(kdrun|python -m kdrun|torchrun)\b", text) and "kdrun-" not in text
    if trains:
        new = (set(ws.root.glob("outputs/runs/*")) | set(ws.root.glob("outputs/multiruns/*"))) - (
            runs_before
        )
        summaries = [p for d in new for p in [d / "summary.json", *d.glob("*/summary.json")]]
        resumed = "resume=" in text  # continues a run dir that already exists
        assert resumed or any(p.is_file() for p in summaries), (
            f"README.md:{command.line}: `{text}` wrote no summary.json:\n{output[-3000:]}"
        )
    return output


LOCAL_BLOCKS = sorted({c.block for c in COMMANDS if not c.manual and not c.slurm})


def block_id(block: int) -> str:
    first = next(c for c in COMMANDS if c.block == block)
    return f"{block:02d}-" + re.sub(r"[^a-z0-9]+", "-", first.heading.lower()).strip("-")


@pytest.mark.parametrize("block", LOCAL_BLOCKS, ids=[block_id(b) for b in LOCAL_BLOCKS])
def test_readme_commands_run(workspace, block):
    ran = []
    for command in COMMANDS:
        if command.block != block or command.manual or command.slurm:
            continue
        run_command(command, workspace, workspace.env)
        ran.append(command.text)
    assert ran


@pytest.mark.slurm
def test_readme_slurm_commands_run_on_the_local_cluster(workspace, slurm_cluster):  # noqa: F811
    """The SLURM commands on the single-node cluster the fixture started (it also stops it)."""
    cluster = slurm_cluster.client_env()  # what `eval "$(scripts/slurm-local.sh start)"` exports
    env = {
        **workspace.env,
        "SLURM_CONF": cluster["SLURM_CONF"],
        "PATH": f"{Path(sys.executable).parent}:{cluster['PATH']}",
    }
    ran = []
    for command in COMMANDS:
        if not command.slurm or command.manual or CLUSTER_LIFECYCLE.search(command.text):
            continue
        run_command(command, workspace, env, timeout=600)
        ran.append(command.text)
    assert any("launcher=slurm" in t for t in ran), ran
