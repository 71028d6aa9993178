"""Training methods. Each lives in its own module (or package) under ``kdrun/methods/`` and its
config file ``conf/method/<name>.yaml`` names it by that path
(``_target_: kdrun.methods.pskd.PSKD``); adding a method needs only those two files.

The base interface is imported here; a method class is also reachable as ``kdrun.methods.<Class>``:
on first access the submodules are imported in turn until one defines it, so importing this
package never imports every method."""

import pkgutil
from importlib import import_module

from kdrun.methods.bank import SampleBank
from kdrun.methods.base import (
    Batch,
    Method,
    StageResult,
    StageRunner,
    StepOutput,
    kd_loss,
    soft_cross_entropy,
)
from kdrun.methods.basic import CrossEntropy, LabelSmoothing


def __getattr__(name: str):
    if not name.startswith("_"):
        for module in pkgutil.iter_modules(__path__, prefix=f"{__name__}."):
            found = getattr(import_module(module.name), name, None)
            if isinstance(found, type) and issubclass(found, Method):
                return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Batch",
    "CrossEntropy",
    "LabelSmoothing",
    "Method",
    "SampleBank",
    "StageResult",
    "StageRunner",
    "StepOutput",
    "kd_loss",
    "soft_cross_entropy",
]
