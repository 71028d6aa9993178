"""Weights & Biases backend: a W&B run in the run dir. The only module that imports wandb.

Contract
--------
:class:`WandbLogger` implements :class:`~kdrun.loggers.base.Logger`:

    * ``mode='auto'`` (default): ``disabled`` if ``WANDB_MODE=disabled`` (or ``WANDB_DISABLED`` is
      true); ``offline`` if ``WANDB_MODE`` is ``offline``/``dryrun``; otherwise ``online`` only if
      wandb's own non-prompting lookup, ``wandb.login(prompt=False, verify=False)``, finds
      credentials (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, a settings file's
      ``api_key`` or a netrc entry for the configured host) and no W&B settings file says
      ``mode = offline`` (``wandb offline``), else ``offline``.
      ``'online'``, ``'offline'``, ``'disabled'`` force a mode; ``'online'`` without credentials
      falls back to offline (wandb would otherwise prompt). Credentials are only detected, never
      read into kdrun's config or logs.
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
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdrun.atomic import atomic_write_text
from kdrun.errors import one_line
from kdrun.loggers.base import FinishOnExit

__all__ = ["ID_FILE", "MODES", "WandbLogger", "clean_tags", "new_run_id", "resolve_wandb_mode"]

log = logging.getLogger("kdrun")

MODES = ("auto", "online", "offline", "disabled")
ID_FILE = "wandb_id.txt"
_TRUE = {"1", "true", "yes", "on"}


def _check_mode(mode: str) -> str:
    mode = str(mode).strip().lower()
    if mode not in MODES:
        raise ValueError(f"logger mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def _has_credentials(force_online: bool) -> bool:
    """wandb's own credential lookup, without prompting and without contacting the server.

    ``wandb.setup`` (silent; ``mode='online'`` when forced, so ``WANDB_MODE`` / settings-file
    offline modes do not hide the credentials) prepares the process-wide W&B state that the
    following ``wandb.init`` reuses; ``wandb.login(prompt=False)`` is False in offline mode.
    """
    try:
        import wandb

        if wandb.run is not None:  # login has no effect while a run is live
            wandb.finish()
        overrides: dict[str, Any] = {"mode": "online"} if force_online else {}
        wandb.setup(settings=wandb.Settings(silent=True, **overrides))
        return bool(wandb.login(prompt=False, verify=False))
    except ImportError:
        return False
    except Exception as exc:  # malformed credentials, unreadable settings files
        log.warning("W&B: credential check failed (%s); logging offline", one_line(exc))
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """Map ``auto``/``online``/``offline``/``disabled`` to the mode to run W&B in (see module doc)."""
    mode = _check_mode(mode)
    if mode in ("offline", "disabled"):
        return mode
    if mode == "auto":
        env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if env_mode == "disabled" or os.environ.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
            return "disabled"
        if env_mode in ("offline", "dryrun"):
            return "offline"
    return "online" if _has_credentials(force_online=mode == "online") else "offline"


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


class WandbLogger(FinishOnExit):
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
        min_step: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        # rows below this step are already in the W&B run from an earlier launch (a resumed run
        # repeats the steps between its checkpoint and the kill): not sent again, so the run's
        # steps never go backwards
        self.min_step = int(min_step)
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
                self._fail(f"online init failed ({one_line(exc)}), offline init failed", exc2)
                return
            self.mode = "offline"
            self._warn(
                f"W&B online init failed ({one_line(exc)}); logging offline to "
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
        atomic_write_text(id_path, run_id + "\n")
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
            f"W&B {what}: {one_line(exc)}; W&B logging disabled for this run "
            "(local files are unaffected)"
        )

    @property
    def active(self) -> bool:
        """True while W&B calls are forwarded to a live run."""
        return self._run is not None and not self._disabled

    # -- Logger API ------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active or step < self.min_step:
            return
        try:
            data = {str(k): _plain(v) for k, v in metrics.items()}
            self._run.log(data, step=int(step))
        except Exception as exc:
            self._fail("log failed", exc)

    def log_image(self, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
        if not self.active or step < self.min_step:
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
