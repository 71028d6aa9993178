"""Training methods. Config files in ``conf/method/`` point their ``_target_`` here."""

from kdrun.methods.bank import SampleBank
from kdrun.methods.base import Batch, Method, StepOutput, kd_loss, soft_cross_entropy
from kdrun.methods.basic import CrossEntropy, LabelSmoothing

__all__ = [
    "Batch",
    "CrossEntropy",
    "LabelSmoothing",
    "Method",
    "SampleBank",
    "StepOutput",
    "kd_loss",
    "soft_cross_entropy",
]
