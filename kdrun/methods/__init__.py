"""Training methods. Config files in ``conf/method/`` point their ``_target_`` here
(``kdrun.methods.<Class>``); each class lives in its family's module and is imported on first
use, so adding a method never slows down the import of the others."""

from importlib import import_module

from kdrun.methods.bank import SampleBank
from kdrun.methods.base import Batch, Method, StepOutput, kd_loss, soft_cross_entropy
from kdrun.methods.basic import CrossEntropy, LabelSmoothing

#: public class name -> module that defines it
_LAZY = {
    "PSKD": "kdrun.methods.pskd",
    "TFKDReg": "kdrun.methods.tfkd",
    "TFKDSelf": "kdrun.methods.tfkd",
    "CSKD": "kdrun.methods.cskd",
    "BYOT": "kdrun.methods.byot",
    "DLB": "kdrun.methods.dlb",
    "BornAgain": "kdrun.methods.born_again",
    "SelfRegulatedTeacher": "kdrun.methods.self_regulated",
    "KDStudent": "kdrun.methods.self_regulated",
    "SignificanceStudent": "kdrun.methods.self_regulated",
    "RegulatedStudent": "kdrun.methods.self_regulated",
    "HybridStudent": "kdrun.methods.self_regulated",
    "LSSKD": "kdrun.methods.lsskd",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdrun.methods' has no attribute {name!r}")


__all__ = [
    "Batch",
    "CrossEntropy",
    "LabelSmoothing",
    "Method",
    "SampleBank",
    "StepOutput",
    "kd_loss",
    "soft_cross_entropy",
    *_LAZY,
]
