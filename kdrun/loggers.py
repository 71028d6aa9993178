"""Logging backends: local JSONL/JSON files and Weights & Biases. The only module importing wandb.

Contract
--------
Every backend implements :class:`Logger`::

    log_metrics(metrics, step)            one event: {"epoch": ..., "train/loss": ..., ...}
    log_image(key, path, step, caption)   an image file (e.g. the reliability diagram)
    log_summary(summary)                  final results
    finish(exit_code=0)                   idempotent; safe to call twice

:class:`JsonlLogger` (the local source of truth)
    * ``<run_dir>/metrics.jsonl``: one JSON object per :meth:`log_metrics` call,
      ``{"step": step, **metrics}`` with the metric keys exactly as given. The file is opened in
      append mode (a resumed run continues it), line-buffered and flushed after every line.
      ``metrics`` must not contain a ``"step"`` key (``ValueError``).
      On open, an incomplete last line (a run killed mid-write) is cut off so the file stays valid
      JSONL; ``drop_after_step=N`` additionally drops events with ``step > N`` (for a run resumed
      from a checkpoint taken at step N, so no event is duplicated).
    * ``<run_dir>/summary.json``: written atomically (temp file in the run dir + ``os.replace``)
      on every :meth:`log_summary` call with exactly the given dict (no merging with an existing
      file: the caller passes the complete summary).
    * Output is strict JSON: NaN and +-inf are written as ``null``; numpy/torch scalars become
      Python numbers; nested mappings/sequences are converted recursively.
    * :meth:`log_image` is a no-op (the image already lives in the run dir).

:class:`WandbLogger`
    * ``mode='auto'`` (default): ``disabled`` if ``WANDB_MODE=disabled`` (or ``WANDB_DISABLED`` is
      true); ``offline`` if ``WANDB_MODE`` is ``offline``/``dryrun`` or a W&B settings file says
      ``mode = offline`` (``wandb offline``); otherwise ``online`` only if credentials exist
      (``WANDB_API_KEY`` / ``WANDB_IDENTITY_TOKEN_FILE``, or a netrc entry for the W&B host, found
      exactly where wandb looks: ``$NETRC``, ``~/.netrc``, ``~/_netrc``), else ``offline``.
      ``'online'``, ``'offline'``, ``'disabled'`` force a mode; ``'online'`` without credentials
      falls back to offline (wandb would otherwise prompt). Credentials are only detected here,
      never read into kdrun's config or logs.
    * It never prompts and never captures the console (``console='off'``, ``silent=True``). An
      online ``wandb.init`` that fails (no network, bad key, server down; bounded by
      ``init_timeout``, default 30 s) falls back to an offline run with the same id.
    * Files go to ``<run_dir>/wandb/`` (``dir=run_dir``). The run id is kept in
      ``<run_dir>/wandb_id.txt`` (written atomically before ``wandb.init``); when the file exists
      the same id is resumed with ``resume='allow'``, so a resumed or requeued job continues the
      same W&B run. Offline, wandb 0.31 cannot ask a server, so each resume creates another
      directory ``wandb/offline-run-<date>_<time>-<id>[-N]/run-<id>.wandb`` with the same id (its
      run record has ``resume: true``); ``wandb sync <run_dir>/wandb/offline-run-*`` uploads the
      fragments of one id sequentially in start-time order into one W&B run (``wandb sync --help``
      of 0.31; not verified against a server here). Because history is
      logged with explicit steps, the fragments' steps continue; W&B drops (with a warning)
      history rows whose step is lower than the run's current step.
      ``resume=False`` ignores an existing id file and starts a new W&B run (new id written).
    * ``group`` = experiment/sweep name, ``job_type`` = method, ``tags`` = [dataset, model, method]
      (given by the caller; empty tags are dropped and tags are cut to W&B's 64-character limit,
      which would otherwise fail ``wandb.init``), ``config`` = resolved config dict. History is
      logged with the explicit ``step``; with ``x_axis='epoch'`` (default) ``epoch`` is declared
      as the step metric of all other keys, so W&B charts can use it as x-axis.
    * ``log_image`` logs ``wandb.Image(path, caption=...)`` under ``key`` (a missing file is
      skipped with one warning per key); ``log_summary`` updates ``run.summary``.
    * Any W&B exception (import, init, log, finish) is reported once as a one-line warning on the
      ``'kdrun'`` logger (the only other warnings: ``mode='online'`` without credentials, and a
      missing image file, once per key) and turns the logger into a no-op (``finish`` still tries to close the
      run so no W&B state leaks into the next run). It never raises into the training loop
      (``KeyboardInterrupt`` is not swallowed; a ``SystemExit`` from ``wandb.teardown()``, which
      exits on service errors, is). With ``mode='disabled'`` nothing is written (no id file).
    * ``wandb.init(..., reinit='finish_previous')`` finishes any run left open in the process
      before starting a new one, and :meth:`finish` calls ``run.finish(exit_code=...)`` and then
      (``teardown=True``, default) ``wandb.teardown()``, so sequential runs in one process (Hydra
      multirun) never bleed into each other: the next run re-reads the environment and starts a
      fresh W&B service (about 0.3-1 s). The teardown is also what makes the ``.wandb`` file
      complete when :meth:`finish` returns: in wandb 0.31 ``run.finish()`` returns before the
      service has flushed the offline transaction log (observed: the file still held only its
      7-byte header). While a run is live, wandb flushes the file every
      ``x_transaction_log_flush_interval`` (15 s), so a ``kill -9`` can lose the last seconds of
      W&B history; ``metrics.jsonl`` has every event.
    * The API key never reaches the run dir: it is not put in config, summary or messages (strings
      equal to ``WANDB_API_KEY`` in config/summary/warnings are replaced by ``***``).

:class:`MultiLogger` fans calls out to several loggers in order; ``finish`` reaches every logger
even if one raises (the first exception is re-raised afterwards).
"""

from __future__ import annotations

import configparser
import json
import logging
import math
import netrc
import numbers
import os
import re
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

log = logging.getLogger("kdrun")

MODES = ("auto", "online", "offline", "disabled")
ID_FILE = "wandb_id.txt"
DEFAULT_WANDB_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")
_TRUE = {"1", "true", "yes", "on"}


@runtime_checkable
class Logger(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_image(
        self, key: str, path: str | Path, step: int, caption: str | None = None
    ) -> None: ...

    def log_summary(self, summary: Mapping[str, Any]) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


# --------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Convert ``value`` to plain JSON types; NaN/inf -> None; numpy/torch scalars -> numbers."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy / torch scalars and arrays
    if callable(tolist):
        return to_jsonable(tolist())
    if isinstance(value, Sequence):
        return [to_jsonable(v) for v in value]
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} as JSON")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file in the same dir + os.replace)."""
    path = Path(path)
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------


class JsonlLogger:
    """``metrics.jsonl`` (append, one object per event) and atomic ``summary.json``."""

    def __init__(
        self,
        run_dir: str | Path,
        metrics_file: str = "metrics.jsonl",
        summary_file: str = "summary.json",
        drop_after_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / metrics_file
        self.summary_path = self.run_dir / summary_file
        self._fh: Any = None
        self._repair(drop_after_step)

    def _repair(self, drop_after_step: int | None) -> None:
        """Cut an incomplete last line; optionally drop events after ``drop_after_step``."""
        if not self.metrics_path.exists():
            return
        data = self.metrics_path.read_bytes()
        if drop_after_step is None:
            if data and not data.endswith(b"\n"):
                with open(self.metrics_path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
            return
        kept = []
        for line in data.split(b"\n"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # empty or torn line
            if isinstance(obj, dict) and obj.get("step", -math.inf) <= drop_after_step:
                kept.append(line + b"\n")
        tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, self.metrics_path)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if "step" in metrics:
            raise ValueError("metrics must not contain a 'step' key; pass it as `step`")
        record = {"step": int(step), **{str(k): to_jsonable(v) for k, v in metrics.items()}}
        line = json.dumps(record, allow_nan=False)
        if self._fh is None:
            self._fh = open(self.metrics_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._fh.write(line + "\n")
        self._fh.flush()

    def log_image(self, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
        """No-op: the image file already lives in the run dir."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.summary_path, dict(summary))

    def finish(self, exit_code: int = 0) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()


# --------------------------------------------------------------------------------------------
# W&B mode and credential detection (no wandb import, nothing that could prompt)
# --------------------------------------------------------------------------------------------


def _read_ini(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return {}
    return dict(parser["default"]) if parser.has_section("default") else {}


def wandb_file_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``[default]`` section of W&B's global settings file, overridden by the workspace
    file (``$WANDB_DIR`` or cwd ``/wandb/settings``) -- where ``wandb login --host`` and
    ``wandb offline`` store ``base_url`` and ``mode``."""
    env = os.environ if environ is None else environ
    config_dir = env.get("WANDB_CONFIG_DIR")
    global_file = (
        Path(config_dir).expanduser() / "settings"
        if config_dir
        else Path("~/.config/wandb/settings").expanduser()
    )
    root = Path(env.get("WANDB_DIR") or os.getcwd()).expanduser()
    settings = _read_ini(global_file)
    settings.update(_read_ini(root / "wandb" / "settings"))
    return settings


def _netrc_path(env: Mapping[str, str]) -> Path:
    # Same lookup order as wandb 0.31 (wandb.sdk.lib.wbauth.wbnetrc._get_netrc_file_path).
    if env.get("NETRC"):
        return Path(env["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        path = Path(name).expanduser()
        if path.exists():
            return path
    return Path("~/.netrc").expanduser()


def has_wandb_credentials(environ: Mapping[str, str] | None = None) -> bool:
    """True if wandb would find credentials without prompting: ``WANDB_API_KEY`` or
    ``WANDB_IDENTITY_TOKEN_FILE``, or a netrc entry (with a password) for the W&B host
    (``WANDB_BASE_URL``, else the settings file's ``base_url``, else the default hosts)."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY", "").strip() or env.get("WANDB_IDENTITY_TOKEN_FILE", "").strip():
        return True
    base_url = env.get("WANDB_BASE_URL") or wandb_file_settings(env).get("base_url")
    hosts: tuple[str, ...] = DEFAULT_WANDB_HOSTS
    if base_url:
        netloc = urlsplit(base_url.strip()).netloc
        hosts = (netloc,) if netloc else ()
        if netloc in DEFAULT_WANDB_HOSTS or netloc in ("forge.coreweave.com",):
            hosts = (netloc, *DEFAULT_WANDB_HOSTS)
    try:
        entries = netrc.netrc(str(_netrc_path(env)))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    for host in hosts:
        creds = entries.authenticators(host)
        if creds and creds[2]:
            return True
    return False


def resolve_wandb_mode(mode: str = "auto", environ: Mapping[str, str] | None = None) -> str:
    """Map ``auto``/``online``/``offline``/``disabled`` to the mode to run W&B in (see module doc)."""
    env = os.environ if environ is None else environ
    mode = str(mode).strip().lower()
    if mode not in MODES:
        raise ValueError(f"logger mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode in ("offline", "disabled"):
        return mode
    if mode == "auto":
        env_mode = env.get("WANDB_MODE", "").strip().lower()
        if env_mode == "disabled" or env.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
            return "disabled"
        if env_mode in ("offline", "dryrun"):
            return "offline"
        if not env_mode and wandb_file_settings(env).get("mode", "").strip() in (
            "offline",
            "dryrun",
        ):
            return "offline"
    return "online" if has_wandb_credentials(env) else "offline"


# --------------------------------------------------------------------------------------------
# W&B
# --------------------------------------------------------------------------------------------

_VALID_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def new_run_id(length: int = 8) -> str:
    """A random base-36 id like wandb's own (lowercase letters and digits)."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(secrets.choice(alphabet) for _ in range(length))


def clean_tags(tags: Sequence[Any]) -> list[str]:
    """W&B tags must be 1-64 characters: drop empty ones, truncate long ones, de-duplicate."""
    out: list[str] = []
    for tag in tags:
        text = str(tag).strip()[:64]
        if text and text not in out:
            out.append(text)
    return out


def _secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    key = env.get("WANDB_API_KEY", "").strip()
    return [key] if len(key) >= 8 else []


def _redact(obj: Any, hidden: Sequence[str]) -> Any:
    if not hidden:
        return obj
    if isinstance(obj, str):
        for s in hidden:
            obj = obj.replace(s, "***")
        return obj
    if isinstance(obj, Mapping):
        return {k: _redact(v, hidden) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, hidden) for v in obj)
    return obj


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class WandbLogger:
    """A W&B run in ``<run_dir>/wandb``; see the module docstring for the contract."""

    def __init__(
        self,
        run_dir: str | Path,
        project: str,
        entity: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: Sequence[str] = (),
        name: str | None = None,
        mode: str = "auto",
        config: Mapping[str, Any] | None = None,
        notes: str | None = None,
        *,
        x_axis: str | None = "epoch",
        init_timeout: float = 30.0,
        settings: Mapping[str, Any] | None = None,
        teardown: bool = True,
        resume: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.requested_mode = mode
        self._teardown = teardown
        self.mode = resolve_wandb_mode(mode)  # raises ValueError on an unknown mode
        self.run_id: str | None = None
        self.resumed = False
        self._run: Any = None
        self._wandb: Any = None
        self._disabled = self.mode == "disabled"
        self._warned = False
        self._missing_images: set[str] = set()
        if mode == "online" and self.mode == "offline":
            log.warning("W&B: logger mode 'online' but no W&B credentials found; logging offline")
        if self._disabled:
            log.info("W&B logging disabled (mode=disabled)")
            return
        try:
            import wandb

            self._wandb = wandb
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.run_id, self.resumed = self._load_or_create_id(resume)
        except Exception as exc:
            self._fail("init failed", exc)
            return

        init_kwargs = dict(
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            tags=clean_tags(tags),
            name=name,
            notes=notes,
            config=_redact(dict(config or {}), _secrets()),
        )
        try:
            self._run = self._init(self.mode, init_kwargs, init_timeout, settings)
        except Exception as exc:
            if self.mode != "online":
                self._fail("init failed", exc)
                return
            try:
                # The failed online stream still holds the run id in the W&B service
                # ("run ID ... is in use"): drop the service before retrying offline.
                self._wandb.teardown()
                self._run = self._init("offline", init_kwargs, init_timeout, settings)
            except (Exception, SystemExit) as exc2:
                self._fail(f"online init failed ({_one_line(exc)}), offline init failed", exc2)
                return
            self.mode = "offline"
            self._warn(
                f"W&B online init failed ({_one_line(exc)}); logging offline to "
                f"{self.run_dir / 'wandb'} instead (upload later with `wandb sync`)"
            )
        self._define_axis(x_axis)
        where = getattr(self._run, "dir", None) or self.run_dir / "wandb"
        log.info(
            "W&B run %s (%s%s) in %s",
            self.run_id,
            self.mode,
            ", resumed" if self.resumed else "",
            Path(where).parent,
        )

    # -- setup ---------------------------------------------------------------------------------

    def _load_or_create_id(self, resume: bool) -> tuple[str, bool]:
        id_path = self.run_dir / ID_FILE
        if resume and id_path.exists():
            run_id = id_path.read_text(encoding="utf-8").strip()
            if _VALID_ID.match(run_id):
                return run_id, True
            log.warning("W&B: ignoring invalid run id %r in %s", run_id[:80], id_path)
        run_id = new_run_id()
        tmp = id_path.with_name(f".{ID_FILE}.tmp")
        tmp.write_text(run_id + "\n", encoding="utf-8")
        os.replace(tmp, id_path)
        return run_id, False

    def _init(
        self,
        mode: str,
        init_kwargs: dict[str, Any],
        init_timeout: float,
        overrides: Mapping[str, Any] | None,
    ) -> Any:
        wandb = self._wandb
        values: dict[str, Any] = {
            "console": "off",  # no stdout/stderr capture: rich progress bars and kdrun.log stay intact
            "silent": True,  # no banners/prompts on the terminal; kdrun logs its own lines
            "init_timeout": float(init_timeout),  # bounds an online init that cannot connect
        }
        values.update(overrides or {})
        fields = getattr(wandb.Settings, "model_fields", None)
        if fields is not None:
            values = {k: v for k, v in values.items() if k in fields}
        return wandb.init(
            dir=str(self.run_dir),
            id=self.run_id,
            resume="allow" if self.resumed else None,
            mode=mode,
            reinit="finish_previous",
            settings=wandb.Settings(**values),
            **init_kwargs,
        )

    def _define_axis(self, x_axis: str | None) -> None:
        if not x_axis or self._run is None:
            return
        try:
            self._run.define_metric(x_axis)
            self._run.define_metric("*", step_metric=x_axis)
        except Exception as exc:
            self._fail("define_metric failed", exc)

    # -- failure handling ------------------------------------------------------------------------

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s", _redact(" ".join(message.split()), _secrets()))

    def _fail(self, what: str, exc: BaseException) -> None:
        """Report the first failure once, then become a no-op (the run is still finished)."""
        self._disabled = True
        self._warn(
            f"W&B {what}: {_one_line(exc)}; W&B logging disabled for this run "
            "(local files are unaffected)"
        )

    @property
    def active(self) -> bool:
        """True while W&B calls are forwarded to a live run."""
        return self._run is not None and not self._disabled

    # -- Logger API ------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        try:
            data = {str(k): _plain(v) for k, v in metrics.items()}
            self._run.log(data, step=int(step))
        except Exception as exc:
            self._fail("log failed", exc)

    def log_image(self, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
        if not self.active:
            return
        if not Path(path).is_file():
            if key not in self._missing_images:
                self._missing_images.add(key)
                log.warning("W&B: image %s for %r not found; not logged", path, key)
            return
        try:
            image = self._wandb.Image(str(path), caption=caption)
            self._run.log({key: image}, step=int(step))
        except Exception as exc:
            self._fail("image log failed", exc)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        if not self.active:
            return
        try:
            self._run.summary.update(
                _redact({str(k): _plain(v) for k, v in summary.items()}, _secrets())
            )
        except Exception as exc:
            self._fail("summary failed", exc)

    def finish(self, exit_code: int = 0) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish(exit_code=int(exit_code))
        except Exception as exc:
            self._fail("finish failed", exc)
        if self._teardown:
            try:
                # wandb 0.31's run.finish() returns before the service has written the offline
                # transaction log; teardown waits for it and drops the process-wide W&B state.
                self._wandb.teardown()
            except (Exception, SystemExit) as exc:  # teardown may sys.exit() on service errors
                self._fail("teardown failed", exc)
        if self._disabled:
            return
        if self.mode == "offline":
            log.info(
                "W&B offline run %s saved; upload with: wandb sync %s/offline-run-*",
                self.run_id,
                self.run_dir / "wandb",
            )

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def _plain(value: Any) -> Any:
    """numpy/torch scalars -> Python numbers (W&B accepts NaN/inf, so they are kept)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError):
            return value
    return value


# --------------------------------------------------------------------------------------------
# Fan-out
# --------------------------------------------------------------------------------------------


class MultiLogger:
    """Calls every logger in order."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers = list(loggers)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_image(self, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
        for lg in self.loggers:
            lg.log_image(key, path, step, caption)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_summary(summary)

    def finish(self, exit_code: int = 0) -> None:
        first: BaseException | None = None
        for lg in self.loggers:
            try:
                lg.finish(exit_code)
            except BaseException as exc:  # finish the others first, then re-raise
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> MultiLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
