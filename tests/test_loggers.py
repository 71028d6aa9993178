"""Tests for kdrun.loggers (JSONL, W&B, fan-out): real offline W&B runs read back from their ``.wandb`` files.

Nothing here mocks wandb away: every W&B test starts a real (offline) run in ``tmp_path`` and
reads the transaction log with ``tests/wandb_reader.py``. Fault-injection tests make
``wandb.init`` / ``run.log`` raise to check that failures never reach the training loop.
Isolation: ``HOME``, ``NETRC``, ``WANDB_CONFIG_DIR``, ``WANDB_CACHE_DIR``, ``WANDB_DATA_DIR`` and the
cwd point into ``tmp_path``, every inherited ``WANDB_*`` variable is removed, and the wandb
singleton (and its service process) is torn down around each test so it re-reads the
environment. No test talks to the network (the online-fallback test uses a closed local port).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
import time
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

sys.path.insert(0, str(Path(__file__).parent))
import wandb_reader as wr  # noqa: E402

from kdrun.loggers.base import Logger, MultiLogger  # noqa: E402
from kdrun.loggers.jsonl import JsonlLogger  # noqa: E402
from kdrun.loggers.wandb import WandbLogger, resolve_wandb_mode  # noqa: E402
from tests.dist_utils import free_port  # noqa: E402

FAST = {"x_disable_stats": True, "x_save_requirements": False, "disable_git": True}
FAKE_KEY = "kdrunfakekey" + "0123456789abcdefghij" * 2  # 52 chars, a valid-looking API key


@pytest.fixture
def wb_env(tmp_path, monkeypatch):
    """Isolated W&B environment; returns the home dir."""
    home = tmp_path / "home"
    home.mkdir()
    for key in list(os.environ):
        if key.startswith("WANDB_") or key in ("NETRC",):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))  # does not exist
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "wandb-data"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.chdir(tmp_path)
    wandb.teardown()
    yield home
    wandb.teardown()


def kdrun_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "kdrun" and r.levelno >= logging.WARNING]


def make_logger(run_dir, **kw) -> WandbLogger:
    args = dict(
        project="kdrun-test",
        entity=None,
        group="sweep-a",
        job_type="ps_kd",
        tags=["digits", "small_cnn", "ps_kd"],
        name="job0",
        mode="auto",
        config={"seed": 3, "optim": {"lr": 0.1, "nesterov": True}, "method": {"name": "ps_kd"}},
        notes="unit test",
        settings=FAST,
    )
    args.update(kw)
    return WandbLogger(run_dir, **args)


def metric_rows(path) -> dict[int, dict]:
    """History rows keyed by step, without W&B's own underscore keys."""
    out = {}
    for row in wr.history(path):
        out[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return out


# ---------------------------------------------------------------------------------------------
# W&B: what lands in the .wandb file
# ---------------------------------------------------------------------------------------------


def test_offline_run_records_history_summary_config_and_run_metadata(wb_env, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdrun")
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    lg = make_logger(run_dir)
    init_s = time.perf_counter() - t0
    assert lg.mode == "offline" and lg.active  # auto + no credentials -> offline
    logged = {}
    for epoch in range(3):
        m = {"epoch": epoch, "train/loss": 2.0 / (epoch + 1), "test/acc1": 0.25 + 0.1 * epoch}
        lg.log_metrics(m, step=10 * epoch)
        logged[10 * epoch] = m
    lg.log_summary({"test/acc1_max": 0.45, "test/acc1_max_epoch": 2, "method": "ps_kd"})
    lg.finish()
    lg.finish()  # idempotent
    assert init_s < 30

    files = wr.wandb_files(run_dir)
    assert len(files) == 1
    path = files[0]
    assert path.parent.name.startswith("offline-run-")
    assert path.read_bytes()[:7] == b":W&B\xe1\xbe\x00"

    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id == lg.run_id == wr.run_id(path)
    assert path.name == f"run-{run_id}.wandb"

    rec = wr.run_record(path)
    assert rec.project == "kdrun-test"
    assert rec.run_group == "sweep-a"
    assert rec.job_type == "ps_kd"
    assert list(rec.tags) == ["digits", "small_cnn", "ps_kd"]
    assert rec.display_name == "job0"
    assert rec.notes == "unit test"

    rows = metric_rows(path)
    assert set(rows) == set(logged)
    for step, m in logged.items():
        assert rows[step].keys() == m.keys()
        for k, v in m.items():
            assert rows[step][k] == pytest.approx(v, rel=1e-12)

    summ = wr.summary(path)
    assert summ["test/acc1_max"] == 0.45
    assert summ["test/acc1_max_epoch"] == 2
    assert summ["method"] == "ps_kd"
    assert summ["test/acc1"] == pytest.approx(0.45)  # last history value

    cfg = wr.config(path)
    assert cfg["seed"] == 3
    assert cfg["optim"] == {"lr": 0.1, "nesterov": True}
    assert cfg["method"] == {"name": "ps_kd"}

    metrics = [r.metric for r in wr.read_records(path) if r.WhichOneof("record_type") == "metric"]
    assert any(m.name == "epoch" for m in metrics)
    assert any(m.glob_name == "*" and m.step_metric == "epoch" for m in metrics)
    assert wr.exit_code(path) == 0
    assert not kdrun_warnings(caplog)


def test_exit_code_is_recorded(wb_env, tmp_path):
    lg = make_logger(tmp_path / "run", x_axis=None)
    lg.log_metrics({"train/loss": 1.5}, step=0)
    lg.finish(exit_code=3)
    (path,) = wr.wandb_files(tmp_path / "run")
    assert wr.exit_code(path) == 3
    assert not [r for r in wr.read_records(path) if r.WhichOneof("record_type") == "metric"]


def test_resume_continues_the_same_run_id(wb_env, tmp_path):
    run_dir = tmp_path / "run"
    first = make_logger(run_dir)
    assert not first.resumed
    for step in range(3):
        first.log_metrics({"epoch": step, "train/loss": 1.0 + step}, step=step)
    first.finish(exit_code=1)  # e.g. preempted
    run_id = (run_dir / "wandb_id.txt").read_text().strip()

    second = make_logger(run_dir)  # requeued job, same run dir
    assert second.resumed and second.run_id == run_id
    for step in range(3, 5):
        second.log_metrics({"epoch": step, "train/loss": 1.0 + step}, step=step)
    second.finish()

    files = wr.wandb_files(run_dir)
    assert len(files) == 2  # offline: one fragment per (re)start, same id
    assert [wr.run_id(f) for f in files] == [run_id, run_id]
    assert all(f.name == f"run-{run_id}.wandb" for f in files)
    assert wr.run_record(files[1]).resume  # marks the fragment as a resume for `wandb sync`
    assert sorted(metric_rows(files[0])) == [0, 1, 2]
    later = metric_rows(files[1])
    assert sorted(later) == [3, 4]
    assert later[4] == {"epoch": 4, "train/loss": 5.0}

    fresh = make_logger(run_dir, resume=False)  # e.g. `resume=never`: a new W&B run
    fresh.finish()
    assert not fresh.resumed and fresh.run_id != run_id
    assert (run_dir / "wandb_id.txt").read_text().strip() == fresh.run_id


def test_sequential_runs_in_one_process_do_not_bleed(wb_env, tmp_path, caplog):
    a = make_logger(tmp_path / "a", x_axis=None)
    a.log_metrics({"only_a": 1.0}, step=0)
    # `a` is deliberately not finished before the next run starts (a crashed job in a multirun).
    b = make_logger(tmp_path / "b", x_axis=None)
    b.log_metrics({"only_b": 2.0}, step=0)
    b.log_metrics({"only_b": 3.0}, step=1)
    a.log_metrics({"only_a": 9.0}, step=5)  # a's run was closed by b's init: reported, no-op
    b.finish()
    a.finish()
    a.finish()
    # A third logger after everything finished works too.
    c = make_logger(tmp_path / "c", x_axis=None)
    c.log_metrics({"only_c": 4.0}, step=0)
    c.finish()

    (fa,) = wr.wandb_files(tmp_path / "a")
    (fb,) = wr.wandb_files(tmp_path / "b")
    (fc,) = wr.wandb_files(tmp_path / "c")
    assert len({wr.run_id(fa), wr.run_id(fb), wr.run_id(fc)}) == 3
    assert metric_rows(fa) == {0: {"only_a": 1.0}}
    assert metric_rows(fb) == {0: {"only_b": 2.0}, 1: {"only_b": 3.0}}
    assert metric_rows(fc) == {0: {"only_c": 4.0}}
    assert wr.exit_code(fa) is not None  # finished by b's init (reinit='finish_previous')
    warnings = kdrun_warnings(caplog)
    assert len(warnings) == 1 and "is finished" in warnings[0].getMessage()


def test_tags_are_made_valid_for_wandb(wb_env, tmp_path):
    long_tag = "m" * 70
    lg = make_logger(tmp_path / "run", tags=["cifar100", "", long_tag, "cifar100", "ps_kd"])
    assert lg.active
    lg.finish()
    (path,) = wr.wandb_files(tmp_path / "run")
    assert list(wr.run_record(path).tags) == ["cifar100", "m" * 64, "ps_kd"]


def test_log_image_creates_media_file(wb_env, tmp_path):
    from PIL import Image

    png = tmp_path / "reliability_test.png"
    Image.new("RGB", (16, 12), (200, 30, 30)).save(png)
    run_dir = tmp_path / "run"
    lg = make_logger(run_dir)
    lg.log_metrics({"epoch": 1, "test/acc1": 0.5}, step=7)
    lg.log_image("plots/reliability_test", png, step=7, caption="test set")
    lg.finish()

    (path,) = wr.wandb_files(run_dir)
    row = metric_rows(path)[7]
    img = row["plots/reliability_test"]
    assert img["_type"] == "image-file"
    assert img["caption"] == "test set"
    assert (img["width"], img["height"]) == (16, 12)
    media = path.parent / "files" / img["path"]
    assert media.is_file()
    assert Image.open(media).size == (16, 12)
    assert row["test/acc1"] == 0.5


def test_missing_image_is_skipped_without_disabling(wb_env, tmp_path, caplog):
    lg = make_logger(tmp_path / "run", x_axis=None)
    lg.log_image("plots/x", tmp_path / "nope.png", step=0)
    lg.log_image("plots/x", tmp_path / "nope.png", step=1)
    lg.log_metrics({"m": 1.0}, step=2)
    lg.finish()
    assert len(kdrun_warnings(caplog)) == 1
    (path,) = wr.wandb_files(tmp_path / "run")
    assert metric_rows(path) == {2: {"m": 1.0}}


# ---------------------------------------------------------------------------------------------
# W&B failures never reach the training loop
# ---------------------------------------------------------------------------------------------


def test_init_failure_is_reported_once_and_training_continues(
    wb_env, tmp_path, monkeypatch, caplog
):
    def broken_init(*args, **kwargs):
        raise RuntimeError("injected init failure\nsecond line")

    monkeypatch.setattr(wandb, "init", broken_init)
    run_dir = tmp_path / "run"
    wb = make_logger(run_dir)
    local = JsonlLogger(run_dir)
    both = MultiLogger([local, wb])
    assert not wb.active
    for step in range(4):
        both.log_metrics({"epoch": step, "train/loss": 1.0}, step=step)
    both.log_image("plots/x", tmp_path / "missing.png", step=3)
    both.log_summary({"test/acc1": 0.5})
    both.finish()
    both.finish()

    warnings = kdrun_warnings(caplog)
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "injected init failure second line" in msg and "\n" not in msg
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text()) == {"test/acc1": 0.5}


def test_log_failure_is_reported_once_and_run_still_finished(wb_env, tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    lg = make_logger(run_dir, x_axis=None)
    lg.log_metrics({"m": 1.0}, step=0)
    lg.log_metrics({"m": 2.0}, step=1)
    calls = []

    def broken_log(*args, **kwargs):
        calls.append(args)
        raise OSError("injected log failure")

    monkeypatch.setattr(lg._run, "log", broken_log)
    for step in range(2, 6):
        lg.log_metrics({"m": float(step)}, step=step)  # must not raise
    lg.log_summary({"x": 1})
    lg.finish()
    assert len(calls) == 1  # became a no-op after the first failure
    warnings = kdrun_warnings(caplog)
    assert len(warnings) == 1 and "injected log failure" in warnings[0].getMessage()
    (path,) = wr.wandb_files(run_dir)
    assert metric_rows(path) == {0: {"m": 1.0}, 1: {"m": 2.0}}
    assert wr.exit_code(path) == 0  # the run was still closed cleanly


def test_uncreatable_run_dir_is_reported_once(wb_env, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    lg = make_logger(blocker / "run")
    assert not lg.active
    lg.log_metrics({"m": 1.0}, step=0)
    lg.log_summary({"m": 1.0})
    lg.finish()
    assert len(kdrun_warnings(caplog)) == 1


def test_disabled_mode_creates_nothing(wb_env, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "run"
    lg = make_logger(run_dir)
    assert lg.mode == "disabled" and not lg.active
    lg.log_metrics({"m": 1.0}, step=0)
    lg.finish()
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_id.txt").exists()
    assert not kdrun_warnings(caplog)


def test_online_init_failure_falls_back_to_offline_and_leaks_no_key(
    wb_env, tmp_path, monkeypatch, caplog
):
    # Credentials exist but the server is unreachable (a closed local port, no real network).
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    lg = make_logger(run_dir, init_timeout=2.0)
    assert time.perf_counter() - t0 < 25
    assert lg.active and lg.mode == "offline"
    lg.log_metrics({"epoch": 0, "train/loss": 0.5}, step=0)
    lg.finish()
    warnings = kdrun_warnings(caplog)
    assert len(warnings) == 1 and "online init failed" in warnings[0].getMessage()
    assert FAKE_KEY not in warnings[0].getMessage()
    offline = [f for f in wr.wandb_files(run_dir) if f.parent.name.startswith("offline-run-")]
    assert len(offline) == 1
    assert wr.run_id(offline[0]) == lg.run_id
    assert metric_rows(offline[0]) == {0: {"epoch": 0, "train/loss": 0.5}}
    assert_secret_absent(run_dir, FAKE_KEY)


def assert_secret_absent(root: Path, secret: str) -> None:
    needle = secret.encode()
    checked = 0
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert needle not in p.read_bytes(), f"API key found in {p}"
            checked += 1
    assert checked > 3


def test_api_key_never_written_to_run_dir(wb_env, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    run_dir = tmp_path / "run"
    lg = MultiLogger(
        [
            JsonlLogger(run_dir),
            # default W&B settings (metadata, requirements, git) on purpose
            WandbLogger(
                run_dir,
                project="kdrun-test",
                tags=["digits"],
                mode="offline",
                config={"seed": 0, "oops": FAKE_KEY, "nested": {"k": [FAKE_KEY]}},
                settings={"x_disable_stats": True},
            ),
        ]
    )
    lg.log_metrics({"epoch": 0, "train/loss": 1.0}, step=0)
    lg.log_summary({"test/acc1": 0.5})
    lg.finish()
    assert_secret_absent(run_dir, FAKE_KEY)
    (path,) = wr.wandb_files(run_dir)
    cfg = wr.config(path)
    assert cfg["oops"] == "***" and cfg["nested"] == {"k": ["***"]}
    assert not any(FAKE_KEY in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Mode resolution (no wandb run needed)
# ---------------------------------------------------------------------------------------------


def test_mode_resolution(wb_env, tmp_path, monkeypatch):
    def mode(requested: str, **env: str) -> str:
        """resolve_wandb_mode with ``env`` set, on a fresh wandb state (as for a new run)."""
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            try:
                return resolve_wandb_mode(requested)
            finally:
                wandb.teardown()

    assert mode("auto") == "offline"
    assert mode("online") == "offline"  # would prompt: never
    assert mode("auto", WANDB_API_KEY=FAKE_KEY) == "online"
    assert mode("offline", WANDB_API_KEY=FAKE_KEY) == "offline"
    assert mode("auto", WANDB_API_KEY=FAKE_KEY, WANDB_MODE="offline") == "offline"
    assert mode("auto", WANDB_API_KEY=FAKE_KEY, WANDB_MODE="dryrun") == "offline"
    assert mode("auto", WANDB_API_KEY=FAKE_KEY, WANDB_MODE="disabled") == "disabled"
    assert mode("auto", WANDB_API_KEY=FAKE_KEY, WANDB_DISABLED="true") == "disabled"
    assert mode("online", WANDB_API_KEY=FAKE_KEY, WANDB_MODE="offline") == "online"
    assert mode("disabled", WANDB_API_KEY=FAKE_KEY) == "disabled"
    with pytest.raises(ValueError, match="auto, online, offline, disabled"):
        mode("sometimes")

    netrc_file = wb_env / ".netrc"
    netrc_file.write_text(f"machine example.org\n  login user\n  password {FAKE_KEY}\n")
    netrc_file.chmod(0o600)
    assert mode("auto") == "offline"  # entry for another host
    assert mode("auto", WANDB_BASE_URL="https://example.org") == "online"
    netrc_file.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    assert mode("auto") == "online"
    assert mode("auto", WANDB_MODE="offline") == "offline"

    # `wandb offline` writes mode=offline into the workspace settings file.
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nmode = offline\n")
    assert mode("auto", WANDB_DIR=str(tmp_path)) == "offline"
    assert mode("online", WANDB_DIR=str(tmp_path)) == "online"
    # nothing was written: no netrc change, no settings file in the home dir
    assert sorted(p.name for p in wb_env.iterdir() if not p.name.startswith("wandb-")) == [".netrc"]


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


def test_jsonl_logger_writes_valid_jsonl_and_appends_on_resume(tmp_path):
    np = pytest.importorskip("numpy")
    run_dir = tmp_path / "run"
    lg = JsonlLogger(run_dir)
    lg.log_metrics({"epoch": 0, "train/loss": 1.25, "test/acc1": np.float32(0.5)}, step=0)
    lg.log_metrics({"epoch": np.int64(1), "train/loss": float("nan"), "x": math.inf}, step=1)
    # flushed after every line: readable before finish()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    lg.finish()
    lg.finish()
    rows = [json.loads(x) for x in lines]
    assert rows[0] == {"step": 0, "epoch": 0, "train/loss": 1.25, "test/acc1": 0.5}
    assert rows[1] == {"step": 1, "epoch": 1, "train/loss": None, "x": None}
    assert list(rows[0]) == ["step", "epoch", "train/loss", "test/acc1"]
    with pytest.raises(ValueError, match="step"):
        lg.log_metrics({"step": 3}, step=3)

    # resume: append, after repairing a torn last line (process killed mid-write)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "epoch": 2, "train/lo')
    lg2 = JsonlLogger(run_dir)
    lg2.log_metrics({"epoch": 2, "train/loss": 0.75}, step=2)
    lg2.finish()
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]

    # resume from a checkpoint taken at step 1: later events are dropped, then re-logged
    lg3 = JsonlLogger(run_dir, drop_after_step=1)
    lg3.log_metrics({"epoch": 2, "train/loss": 0.5}, step=2)
    lg3.finish()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["train/loss"] == 0.5


def test_summary_json_is_atomic(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    lg = JsonlLogger(run_dir)
    lg.log_summary({"method": "ce", "test/acc1": 0.9, "test/ece": float("nan"), "n": {"a": [1]}})
    path = run_dir / "summary.json"
    assert json.loads(path.read_text()) == {
        "method": "ce",
        "test/acc1": 0.9,
        "test/ece": None,
        "n": {"a": [1]},
    }
    before = path.read_bytes()

    # a summary that cannot be serialised leaves the old file untouched
    with pytest.raises(TypeError):
        lg.log_summary({"bad": object()})

    # a crash at the rename leaves the old file untouched and no temp file behind
    def broken_replace(src, dst):
        raise OSError("injected rename failure")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        lg.log_summary({"method": "ce", "test/acc1": 0.1})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"]

    lg.log_summary({"only": 1})  # the given dict replaces the file (no merge)
    assert json.loads(path.read_text()) == {"only": 1}


def test_multilogger_finishes_every_logger(tmp_path):
    class Boom:
        def __init__(self):
            self.finished = 0

        def log_metrics(self, metrics, step):
            pass

        def log_image(self, key, path, step, caption=None):
            pass

        def log_summary(self, summary):
            pass

        def finish(self, exit_code=0):
            self.finished += 1
            raise RuntimeError("boom")

    boom = Boom()
    local = JsonlLogger(tmp_path)
    assert isinstance(local, Logger) and isinstance(boom, Logger)
    multi = MultiLogger([boom, local])
    multi.log_metrics({"m": 1}, step=0)
    with pytest.raises(RuntimeError, match="boom"):
        multi.finish(exit_code=2)
    assert boom.finished == 1 and local._fh is None


# ---------------------------------------------------------------------------------------------
# The reader itself, on real files
# ---------------------------------------------------------------------------------------------


def test_reader_checks_crc_reassembles_fragments_and_detects_corruption(wb_env, tmp_path):
    run_dir = tmp_path / "run"
    big = "x" * 70_000  # > 2 blocks: forces FIRST/MIDDLE/LAST fragments
    lg = make_logger(run_dir, config={"big": big}, x_axis=None)
    for step in range(50):
        lg.log_metrics({"m": float(step)}, step=step)
    lg.finish()
    (path,) = wr.wandb_files(run_dir)
    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)

    # Independent walk over the framing: block trailers, record types, plain CRC-32.
    import zlib

    off, kinds = 7, []
    while off < len(data):
        left = 32768 - off % 32768
        if left < 7:
            off += left
            continue
        crc, n, kind = struct.unpack_from("<IHB", data, off)
        assert crc == zlib.crc32(data[off + 6 : off + 7 + n])  # type byte + payload
        kinds.append(kind)
        off += 7 + n
    assert off == len(data)
    assert {2, 3, 4} <= set(kinds)

    assert wr.config(path)["big"] == big
    assert sorted(metric_rows(path)) == list(range(50))

    corrupt = tmp_path / "corrupt.wandb"
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(wr.WandbFileError, match="CRC|record"):
        wr.read_records(corrupt)

    truncated = tmp_path / "truncated.wandb"
    truncated.write_bytes(data[: len(data) - 5])
    with pytest.raises(wr.WandbFileError, match="truncated"):
        wr.read_records(truncated)
    assert len(wr.read_records(truncated, allow_truncated_tail=True)) == (
        len(wr.read_records(path)) - 1
    )

    bad_header = tmp_path / "bad.wandb"
    bad_header.write_bytes(b"LEVELDB" + data[7:])
    with pytest.raises(wr.WandbFileError, match="header"):
        wr.read_records(bad_header)
