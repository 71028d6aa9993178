"""A small reader for offline W&B transaction logs (``run-<id>.wandb``), for tests.

wandb 0.31 no longer ships a Python reader, so the tests read the files themselves.
Format (verified byte by byte on files written by wandb 0.31.0 / wandb-core):

* File header, 7 bytes: ``b":W&B"`` + magic ``0xBEE1`` as little-endian uint16 (bytes ``e1 be``) +
  version byte ``0x00``. The header occupies the first 7 bytes of block 0.
* The file is a LevelDB-style log made of 32 KiB blocks (block boundaries at absolute file offsets
  that are multiples of 32768). Each block holds records with a 7-byte header:
  ``crc: uint32 LE``, ``length: uint16 LE``, ``type: uint8`` (1=FULL, 2=FIRST, 3=MIDDLE, 4=LAST),
  followed by ``length`` payload bytes. If fewer than 7 bytes are left in a block, they are zero
  padding and the next record starts in the next block.
* The CRC is the plain (IEEE, ``zlib.crc32``) CRC-32 of the type byte followed by the payload.
  It is NOT LevelDB's masked CRC-32C, despite LevelDB heritage. Every record's CRC is checked, so
  a corrupt file raises :class:`WandbFileError`.
* A reassembled payload is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

History and summary items produced by wandb-core carry their key in ``nested_key`` (a list with
one element for flat keys such as ``"train/loss"``; several elements for the fields of a dict
value such as a media descriptor, rebuilt here into nested dicts); items written by the SDK
directly use ``key``. Values are JSON strings in ``value_json`` (the default
``x_history_value_encoding='json'``) or, for other encodings, one of the typed fields of the
``value`` oneof.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FILE_HEADER_LEN = 7
BLOCK_LEN = 32768
RECORD_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a valid W&B transaction log (bad header, CRC, framing or truncation)."""


def iter_payloads(path: str | Path, allow_truncated_tail: bool = False) -> Iterator[bytes]:
    """Yield the reassembled record payloads of a ``.wandb`` file, checking every CRC.

    A file that ends inside a record (e.g. a run killed while writing) raises unless
    ``allow_truncated_tail`` is true, in which case the incomplete tail is ignored.
    """
    data = Path(path).read_bytes()
    if data[:FILE_HEADER_LEN] != FILE_HEADER:
        raise WandbFileError(f"{path}: bad file header {data[:FILE_HEADER_LEN]!r}")
    off = FILE_HEADER_LEN
    pending: bytearray | None = None
    while off < len(data):
        left_in_block = BLOCK_LEN - off % BLOCK_LEN
        if left_in_block < RECORD_HEADER_LEN:
            pad = data[off : off + left_in_block]
            if pad.strip(b"\x00"):
                raise WandbFileError(f"{path}: non-zero block trailer at offset {off}")
            off += left_in_block
            continue
        if off + RECORD_HEADER_LEN > len(data):
            if allow_truncated_tail:
                return
            raise WandbFileError(f"{path}: truncated record header at offset {off}")
        crc, length, rtype = struct.unpack_from("<IHB", data, off)
        start = off + RECORD_HEADER_LEN
        end = start + length
        if length > left_in_block - RECORD_HEADER_LEN:
            raise WandbFileError(f"{path}: record at offset {off} crosses a block boundary")
        if end > len(data):
            if allow_truncated_tail:
                return
            raise WandbFileError(f"{path}: truncated record at offset {off}")
        payload = data[start:end]
        if rtype == 0 and length == 0 and crc == 0:
            # Zero padding (pre-allocated or padded block): skip the rest of the block.
            off += left_in_block
            continue
        if zlib.crc32(bytes([rtype]) + payload) != crc:
            raise WandbFileError(f"{path}: CRC mismatch in record at offset {off}")
        off = end
        if rtype == FULL:
            if pending is not None:
                raise WandbFileError(f"{path}: FULL record inside a fragmented record at {off}")
            yield payload
        elif rtype == FIRST:
            if pending is not None:
                raise WandbFileError(f"{path}: FIRST record inside a fragmented record at {off}")
            pending = bytearray(payload)
        elif rtype in (MIDDLE, LAST):
            if pending is None:
                raise WandbFileError(f"{path}: {rtype=} without a FIRST record at {off}")
            pending += payload
            if rtype == LAST:
                yield bytes(pending)
                pending = None
        else:
            raise WandbFileError(f"{path}: unknown record type {rtype} at offset {off}")
    if pending is not None and not allow_truncated_tail:
        raise WandbFileError(f"{path}: file ends inside a fragmented record")


def read_records(path: str | Path, allow_truncated_tail: bool = False) -> list[pb.Record]:
    """All records of a ``.wandb`` file, in file order, as ``wandb_internal_pb2.Record``."""
    records = []
    for payload in iter_payloads(path, allow_truncated_tail=allow_truncated_tail):
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _records(path_or_records: str | Path | Iterable[pb.Record]) -> list[pb.Record]:
    if isinstance(path_or_records, (str, Path)):
        return read_records(path_or_records)
    return list(path_or_records)


def _path(item: Any) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _history_value(item: pb.HistoryItem) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def history(path_or_records: str | Path | Iterable[pb.Record]) -> list[dict[str, Any]]:
    """One dict per history row, ``{key: value}``, including W&B's ``_step``/``_runtime``/...

    Values are decoded from JSON. wandb-core flattens dict values into multi-part
    ``nested_key``s; they are rebuilt into nested dicts here, so a logged image comes back as
    its descriptor ``{"_type": "image-file", "path": "media/images/...", ...}``.
    """
    rows = []
    for record in _records(path_or_records):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, _path(item), _history_value(item))
            rows.append(row)
    return rows


def _set(target: dict[str, Any], keys: list[str], value: Any) -> None:
    node = target
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = node[k] = {}
        node = child
    node[keys[-1]] = value


def _apply(target: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any]) -> None:
    for item in updates:
        _set(target, _path(item), json.loads(item.value_json) if item.value_json else None)
    for item in removes:
        keys = _path(item)
        node = target
        for k in keys[:-1]:
            node = node.get(k, {})
            if not isinstance(node, dict):
                break
        else:
            node.pop(keys[-1], None)


def summary(path_or_records: str | Path | Iterable[pb.Record]) -> dict[str, Any]:
    """The final summary: summary updates/removes folded in file order (nested keys nest)."""
    result: dict[str, Any] = {}
    for record in _records(path_or_records):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            _apply(result, record.summary.update, record.summary.remove)
        elif kind == "run" and record.run.HasField("summary"):
            _apply(result, record.run.summary.update, record.run.summary.remove)
    return result


def config(path_or_records: str | Path | Iterable[pb.Record]) -> dict[str, Any]:
    """The final config: the run record's config plus later config updates (keeps ``_wandb``)."""
    result: dict[str, Any] = {}
    for record in _records(path_or_records):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply(result, record.run.config.update, record.run.config.remove)
        elif kind == "config":
            _apply(result, record.config.update, record.config.remove)
    return result


def run_record(path_or_records: str | Path | Iterable[pb.Record]) -> pb.RunRecord:
    """The (first) run record: run_id, project, run_group, job_type, tags, display_name, ..."""
    for record in _records(path_or_records):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise WandbFileError("no run record found")


def run_id(path_or_records: str | Path | Iterable[pb.Record]) -> str:
    """The run id stored in the run record."""
    return run_record(path_or_records).run_id


def exit_code(path_or_records: str | Path | Iterable[pb.Record]) -> int | None:
    """The exit code of the exit record, or None if the run never finished."""
    for record in _records(path_or_records):
        if record.WhichOneof("record_type") == "exit":
            return record.exit.exit_code
    return None


def wandb_files(run_dir: str | Path) -> list[Path]:
    """The ``.wandb`` files under ``run_dir/wandb/*/`` (ignoring the ``latest-run`` symlink),
    sorted by run directory name (i.e. by start time)."""
    root = Path(run_dir) / "wandb"
    files = [p for p in root.glob("*/run-*.wandb") if p.parent.name != "latest-run" and p.is_file()]
    return sorted(files, key=_dir_sort_key)


def _dir_sort_key(path: Path) -> tuple[str, int, str]:
    # Run dirs are "[offline-]run-<YYYYMMDD_HHMMSS>-<id>[-<n>]" (the "-<n>" suffix appears on a
    # second dir of the same id started in the same second); the file is "run-<id>.wandb".
    rid = path.stem[len("run-") :]
    m = re.search(r"run-(\d{8}_\d{6})-" + re.escape(rid) + r"(?:-(\d+))?$", path.parent.name)
    if not m:
        return ("", 0, path.parent.name)
    return (m.group(1), int(m.group(2) or 0), path.parent.name)
