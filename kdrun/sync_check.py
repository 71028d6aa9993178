"""Count host synchronisations at the dispatcher level, region by region.

:class:`HostSyncCounter` is a context manager that watches every ATen call (a
``TorchDispatchMode``) and records each one that makes the host wait for the training device:

* **tensor -> Python scalar**: ``aten._local_scalar_dense`` (what ``item()``, ``float()``,
  ``bool()``, ``if tensor:`` and a 0-d tensor passed where an op expects a Scalar all become,
  e.g. ``torch._foreach_lerp_(xs, ys, 1.0 - tensor)``) and ``aten.equal``;
* **data-dependent output shape**: ``nonzero``, ``masked_select``, the ``unique`` family,
  ``bincount``, ``repeat_interleave`` without ``output_size``, boolean-mask indexing
  (``x[mask]`` and ``x[mask] = v``, i.e. ``index``/``index_put_`` with a bool index), ``histc``
  with ``min == max``;
* **device-to-host copy**: ``_to_copy``/``copy_`` from the watched device to the CPU (never
  seen on a CPU run);
* **host conversion** (CPU runs only): ``tolist()``, ``numpy()`` and ``cpu()`` of a tensor.
  On a GPU these are device-to-host copies the dispatcher sees; on a CPU tensor they dispatch
  nothing, so the counter patches these three Python methods while it is active.

Only calls on tensors of the watched device type count (on a GPU run, ``item()`` of a CPU
tensor does not wait for the GPU). A CPU run watches CPU tensors as the stand-in for the
device, so it shows on a CPU what a GPU run would stall on.

One CPU-only exception, narrow and explicit: ``F.one_hot(labels, num_classes)`` validates
the labels on the host for CPU tensors only (``aminmax`` + two ``_local_scalar_dense``; on
CUDA the scatter's device asserts check them). The ``_local_scalar_dense`` calls made inside
such a call (seen with a ``TorchFunctionMode``) are recorded in :attr:`excused`, not in
:attr:`syncs`. ``F.one_hot(labels)`` without ``num_classes`` reads the maximum on every
device and counts.

Regions: every event carries the counter's :attr:`region` at the time. :meth:`label_steps`
wraps a batch iterator so that the work done between receiving batch ``i`` and asking for
the next one is region ``"step i"``, the loader's own work ``"loader"``, and everything else
keeps the label it had (``"outside"`` by default). Typical use, on any device::

    with HostSyncCounter(device) as counter:
        for x, y in counter.label_steps(batches):
            train_step(x, y)
    assert not counter.in_steps(), counter.summary(counter.in_steps())
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

TO_SCALAR = {aten._local_scalar_dense.default, aten.equal.default}
DATA_DEPENDENT_SHAPE = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
    aten.bincount.default,
}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
HOST_CONVERSIONS = ("tolist", "numpy", "cpu")

_THIS_FILE = str(Path(__file__).resolve())
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


@dataclass(frozen=True)
class HostSync:
    op: str  #: the ATen overload or Tensor method, e.g. ``aten._local_scalar_dense.default``
    kind: str  #: to-scalar | data-dependent-shape | device-to-host | host-conversion
    region: str  #: the counter's region when it happened, e.g. ``step 3``
    where: str  #: ``file:line`` of the innermost caller outside torch and this module

    def __str__(self) -> str:
        return f"{self.region}: {self.op} ({self.kind}) at {self.where}"


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name != _THIS_FILE and not name.startswith(_TORCH_DIR):
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _is_bool_index(indices: Any) -> bool:
    return any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ()
    )


class _ForwardToCounter:
    """Base of the two torch modes below: each forwards its hook to one handler of the counter
    (``handler(func, args, kwargs)`` runs ``func`` and returns its result)."""

    def __init__(self, handler: Callable[[Any, tuple, dict], Any]) -> None:
        super().__init__()
        self.handler = handler


class _Dispatch(_ForwardToCounter, TorchDispatchMode):
    """Every ATen call, to :meth:`HostSyncCounter._on_aten_call`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.handler(func, args, kwargs or {})


class _OneHot(_ForwardToCounter, TorchFunctionMode):
    """Every torch function call, to :meth:`HostSyncCounter._on_torch_function` (which marks the
    inside of ``F.one_hot(cpu_labels, num_classes)``: CPU-only host checks)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.handler(func, args, kwargs or {})


class HostSyncCounter:
    """``with HostSyncCounter("cpu") as c: ...`` then read :attr:`syncs` (see module doc)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device_type = torch.device(device).type
        self.region = "outside"
        #: batches handed out by :meth:`label_steps` (so a check can tell it saw the steps)
        self.steps_seen = 0
        self.syncs: list[HostSync] = []
        #: the CPU-only label checks of ``F.one_hot`` with ``num_classes`` (not host syncs on GPU)
        self.excused: list[HostSync] = []
        self._inside_one_hot = 0
        self._modes = (_OneHot(self._on_torch_function), _Dispatch(self._on_aten_call))
        self._saved: dict[str, Any] = {}

    # ----- what counts ------------------------------------------------------------------------
    def _watched(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.device_type

    def _classify(self, func, args, kwargs) -> str | None:
        if func in TO_SCALAR:
            return "to-scalar" if any(map(self._watched, args)) else None
        if func in DATA_DEPENDENT_SHAPE:
            return "data-dependent-shape" if self._watched(args[0]) else None
        if func in INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices")
            bool_index = self._watched(args[0]) and _is_bool_index(indices)
            return "data-dependent-shape" if bool_index else None
        if func is aten.repeat_interleave.Tensor:
            no_size = kwargs.get("output_size") is None
            return "data-dependent-shape" if no_size and self._watched(args[0]) else None
        if func is aten.histc.default:
            lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
            hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
            return "data-dependent-shape" if lo == hi and self._watched(args[0]) else None
        if self.device_type == "cpu":
            return None
        if func is aten._to_copy.default:
            to_host = torch.device(kwargs.get("device") or args[0].device).type == "cpu"
            return "device-to-host" if to_host and self._watched(args[0]) else None
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            return "device-to-host" if dst.device.type == "cpu" and self._watched(src) else None
        return None

    def _on_aten_call(self, func, args: tuple, kwargs: dict) -> Any:
        kind = self._classify(func, args, kwargs)
        if kind is not None:
            self._record(str(func), kind)
        return func(*args, **kwargs)

    def _on_torch_function(self, func, args: tuple, kwargs: dict) -> Any:
        if func is not torch.nn.functional.one_hot:
            return func(*args, **kwargs)
        labels = args[0] if args else kwargs.get("input")
        num_classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
        cpu_only_check = labels.device.type == "cpu" and num_classes != -1
        self._inside_one_hot += cpu_only_check
        try:
            return func(*args, **kwargs)
        finally:
            self._inside_one_hot -= cpu_only_check

    def _record(self, op: str, kind: str) -> None:
        event = HostSync(op, kind, self.region, _caller())
        if self._inside_one_hot and op == "aten._local_scalar_dense.default":
            self.excused.append(event)
        else:
            self.syncs.append(event)

    # ----- host conversions a CPU tensor dispatches nothing for -------------------------------
    def _patch_host_conversions(self) -> None:
        counter = self

        def wrap(name: str, original):
            def converted(t, *args, **kwargs):
                counter._record(f"Tensor.{name}", "host-conversion")
                return original(t, *args, **kwargs)

            return converted

        for name in HOST_CONVERSIONS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, wrap(name, self._saved[name]))

    def _restore_host_conversions(self) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    # ----- context ----------------------------------------------------------------------------
    def __enter__(self) -> HostSyncCounter:
        if self.device_type == "cpu":
            self._patch_host_conversions()
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._restore_host_conversions()
        self.region = "outside"

    def label_steps(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield ``batches``, labelling the consumer's work on batch ``i`` as ``"step i"``."""
        iterator = iter(batches)
        step = 0
        while True:
            self.region = "loader"
            try:
                batch = next(iterator)
            except StopIteration:
                self.region = "outside"
                return
            self.region = f"step {step}"
            self.steps_seen += 1
            yield batch
            step += 1

    # ----- reading ----------------------------------------------------------------------------
    def in_steps(self) -> list[HostSync]:
        return [s for s in self.syncs if s.region.startswith("step ")]

    def by_region(self) -> Counter[str]:
        return Counter(s.region for s in self.syncs)

    def summary(self, syncs: Iterable[HostSync] | None = None) -> str:
        """One line per distinct (region kind, op, caller) of ``syncs`` (default: all), with
        counts: ``12x step: aten._local_scalar_dense.default (to-scalar) at engine.py:514``."""
        syncs = self.syncs if syncs is None else syncs
        rows = Counter((s.region.split(" ")[0], s.op, s.kind, s.where) for s in syncs).most_common()
        return "\n".join(
            f"{n}x {region}: {op} ({kind}) at {where}" for (region, op, kind, where), n in rows
        )
