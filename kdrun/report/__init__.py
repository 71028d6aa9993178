"""``kdrun-report PATH... [--baseline METHOD]`` — aggregate finished runs into comparison tables.

PATHs may be run dirs, multirun dirs or ``outputs/``: every ``summary.json`` below them is a run
(:mod:`kdrun.report.runs`). Runs whose ``run.json`` status is not ``finished`` are listed apart,
not aggregated. Runs are grouped into configurations by method, dataset, model, their
command-line overrides other than ``seed`` (read from ``.hydra/overrides.yaml``; launcher and
bookkeeping keys are ignored) and their evaluation protocol (test set every epoch; validation
split only; selected on validation, test set once at the end).

Per configuration and metric: the seed count, mean ± std (sample std, ddof=1) and the 95 %
t-interval of the mean over seeds (:mod:`kdrun.report.stats`), at the last epoch, plus the
maximum over epochs of the accuracy — labelled "test-selected" when it was picked on the test
set — and, where a validation split selected the model, the test accuracy at that model.

``--baseline METHOD``: per context (same dataset, model, protocol and non-method overrides), each
other method's paired difference to METHOD on the seeds both have, with its 95 % t-interval and
a paired t-test (:mod:`kdrun.report.compare`); seeds only one side has are listed.

Outputs (:mod:`kdrun.report.tables`, :mod:`kdrun.report.figures`): rich tables on the terminal
(accuracy, ECE, AURC as percent / x1000 as in the PS-KD paper), ``report.md``, ``report.csv``
(every aggregated key: mean, std, interval), ``report_baseline.csv`` with ``--baseline``,
``plots/compare_<metric>.png`` (bars with std error bars) and ``plots/calibration_<dataset>.png``
(the reliability curves of every configuration of the dataset) in ``--out`` (default: the first
PATH if it is a directory).
"""

from kdrun.report.cli import main

__all__ = ["main"]
