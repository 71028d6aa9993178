"""Terminal output: a rich progress bar on a TTY, plain periodic log lines otherwise.

Only rank 0 creates a :class:`Console`; other ranks get :class:`SilentConsole`. Everything the
console prints also goes through the ``kdrun`` logger (hence ``kdrun.log``) when it is a log line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

from rich.console import Console as RichConsole
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from kdrun.metrics import METRIC_KEYS

log = logging.getLogger("kdrun")

# Metrics shown in the final table, in metrics.py's order; fractions shown as percentages.
TABLE_KEYS = METRIC_KEYS
PERCENT = {"acc1", "acc5", "ece", "mce", "ece_adaptive", "ece_classwise", "auroc", "fpr95"}


class Console:
    def __init__(self, interactive: bool | None = None) -> None:
        self.rich = RichConsole(stderr=False)
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.progress: Progress | None = None
        self.task = None

    def start_epoch(self, epoch: int, epochs: int, total_steps: int, start: int = 0) -> None:
        if not self.interactive:
            return
        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.rich,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=start, info="")

    def advance(self, info: str | None = None) -> None:
        if self.progress is not None:
            if info is None:
                self.progress.advance(self.task)
            else:
                self.progress.update(self.task, advance=1, info=info)

    def end_epoch(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def metrics_table(self, title: str, metrics: Mapping[str, float]) -> None:
        """The final table: ``val/*``, ``test/*`` and ``test_at_best/*`` figures, the selection
        (``val/<m>_best``; without a validation split the test-selected ``test/acc1_max``,
        labelled so), ``params`` and ``train_time_s``."""
        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for prefix in ("val/", "test/", "test_at_best/"):
            for key in TABLE_KEYS:
                full = prefix + key
                if full in metrics and metrics[full] is not None:
                    v = metrics[full]
                    table.add_row(full, f"{100 * v:.2f}%" if key in PERCENT else f"{v:.4f}")
        selection = [
            k for k in metrics if k.startswith("val/") and k.endswith(("_best", "_best_epoch"))
        ]
        for key in [*selection, "test/acc1_max", "test/acc1_max_epoch", "params", "train_time_s"]:
            if key in metrics:
                v = metrics[key]
                label = f"{key} (test-selected)" if key.startswith("test/acc1_max") else key
                table.add_row(label, f"{v:.4f}" if isinstance(v, float) else str(v))
        self.rich.print(table)


class SilentConsole(Console):
    def __init__(self) -> None:
        self.interactive = False
        self.progress = None

    def metrics_table(self, title: str, metrics: Mapping[str, float]) -> None:
        pass
