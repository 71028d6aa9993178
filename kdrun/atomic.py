"""Atomic file writes: a reader sees either the old file or the complete new one, never a part.

Contract
--------
* ``atomic_write(path, write, durable=False)`` creates the parent directories, calls
  ``write(tmp)`` with the :class:`~pathlib.Path` of a new, empty temporary file in the same
  directory (``.<name>.<pid>.<random>.tmp``, created with the usual umask permissions), then
  renames it over ``path`` (``os.replace``). If ``write`` raises, or the process is interrupted,
  the temporary file is removed and ``path`` is left as it was.
* ``durable=True`` also fsyncs the file before the rename and the directory after it, so the new
  content survives a power loss (checkpoints, summaries), at the cost of two disk flushes.
* ``atomic_write_bytes`` / ``atomic_write_text`` / ``atomic_write_json`` are the common cases;
  ``atomic_write_json`` writes ``json.dumps(obj, ...)`` plus a final newline.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], object], durable: bool = False
) -> Path:
    """Write ``path`` through ``write(tmp)`` and an atomic rename; returns ``path`` as a Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        try:  # make the rename itself durable
            _fsync(path.parent)
        except OSError:  # some filesystems cannot fsync a directory
            pass
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, durable: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def atomic_write_text(path: str | os.PathLike[str], text: str, durable: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def atomic_write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    allow_nan: bool = True,
    default: Callable[[Any], Any] | None = None,
    durable: bool = False,
) -> Path:
    """``json.dumps(obj, indent=..., sort_keys=..., allow_nan=..., default=...)`` + newline."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default)
    return atomic_write_text(path, text + "\n", durable=durable)
