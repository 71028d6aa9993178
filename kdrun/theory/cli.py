"""``kdrun-hilbert``: the kernel self-distillation experiment (docs/theory.md) as a Hydra app.

Contract: ``main()`` composes ``kdrun/theory/conf/hilbert.yaml`` (keys ``kernel``, ``width``,
``eps`` (list or scalar), ``max_rounds``, ``data``, ``n_test``, ``test_interval``, ``plots``),
rejects invalid values with a one-line error (exit code 2), runs every ``eps`` on the same
eigen-decomposition, and writes into the Hydra run dir (default
``outputs/hilbert/<date>_<time>_<microseconds>``):

* ``hilbert.json`` — ``{"kernel", "width", "data", "n_points", "max_rounds", "eigenvalues",
  "runs": [{"eps", "kernel", "width", "collapsed_at", "collapse_lower_bound",
  "rounds": [{"t", "c", "c_lower", "c_upper", "y_norm", "b", "n_effective", "train_mse",
  "test_mse"}]}]}`` (``t`` counted from 1, ``b`` = diag(B_t) in decreasing-eigenvalue order);
* ``plots/*.png`` (see :mod:`kdrun.theory.plots`);

and prints rich tables (one per eps, and a summary). Also runs as ``python -m kdrun.theory.cli``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdrun.atomic import atomic_write_json

from .hilbert import (
    KERNELS,
    HilbertModel,
    HilbertRun,
    default_test_interval,
    load_data,
    parse_clean_function,
)

PROG = "kdrun-hilbert"


class ConfigError(ValueError):
    """An invalid configuration value (reported as one line)."""


@dataclass
class Options:
    kernel: str
    width: float
    eps: list[float]
    max_rounds: int
    data: str | None
    n_test: int
    test_interval: tuple[float, float] | None
    plots: bool


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


def validate(cfg: DictConfig | dict[str, Any]) -> Options:
    """Check every key and return typed options; raise :class:`ConfigError` on the first problem."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    kernel = c.get("kernel")
    if kernel not in KERNELS:
        raise ConfigError(f"kernel={kernel!r} is not allowed (allowed: {', '.join(KERNELS)})")
    width = c.get("width")
    if not _is_number(width) or float(width) <= 0:
        raise ConfigError(f"width={width!r} must be a number > 0")
    eps = c.get("eps")
    eps_list = list(eps) if isinstance(eps, (list, tuple, ListConfig)) else [eps]
    if not eps_list:
        raise ConfigError("eps=[] must list at least one value > 0")
    for e in eps_list:
        if not _is_number(e) or float(e) <= 0:
            raise ConfigError(f"eps={eps!r}: every value must be a number > 0 (got {e!r})")
    max_rounds = c.get("max_rounds")
    if not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1:
        raise ConfigError(f"max_rounds={max_rounds!r} must be an integer >= 1")
    n_test = c.get("n_test", 1001)
    if not isinstance(n_test, int) or isinstance(n_test, bool) or n_test < 2:
        raise ConfigError(f"n_test={n_test!r} must be an integer >= 2")
    data = c.get("data")
    if data is not None and not isinstance(data, str):
        raise ConfigError(f"data={data!r} must be null (packaged toy set) or a JSON file path")
    ti = c.get("test_interval")
    interval = None
    if ti is not None:
        if (
            not isinstance(ti, (list, tuple))
            or len(ti) != 2
            or not all(_is_number(v) for v in ti)
            or not float(ti[0]) < float(ti[1])
        ):
            raise ConfigError(f"test_interval={ti!r} must be null or [lo, hi] with lo < hi")
        interval = (float(ti[0]), float(ti[1]))
    plots = c.get("plots", True)
    if not isinstance(plots, bool):
        raise ConfigError(f"plots={plots!r} must be true or false")
    return Options(
        kernel=kernel,
        width=float(width),
        eps=[float(e) for e in eps_list],
        max_rounds=max_rounds,
        data=data,
        n_test=n_test,
        test_interval=interval,
        plots=plots,
    )


def run_experiment(opts: Options, run_dir: str | Path) -> tuple[dict[str, Any], list[HilbertRun]]:
    """Run every eps, write ``hilbert.json`` (and plots) into ``run_dir``; return (json, runs)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        ds = load_data(opts.data)
        model = HilbertModel(ds.x, ds.y, kernel=opts.kernel, width=opts.width)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    x_grid = clean = None
    if model.X.shape[1] == 1:
        lo, hi = opts.test_interval or default_test_interval(model.X[:, 0])
        x_grid = np.linspace(lo, hi, opts.n_test)
        if ds.clean_function is not None:
            clean = parse_clean_function(ds.clean_function)
    runs = [model.run(e, max_rounds=opts.max_rounds, x_grid=x_grid, clean=clean) for e in opts.eps]
    result = {
        "kernel": opts.kernel,
        "width": opts.width,
        "data": ds.source,
        "n_points": model.K,
        "max_rounds": opts.max_rounds,
        "eigenvalues": [float(v) for v in model.d],
        "runs": [r.to_dict() for r in runs],
    }
    atomic_write_json(run_dir / "hilbert.json", result, indent=1)
    if opts.plots:
        from .plots import plot_all

        plot_all(runs, run_dir / "plots")
    return result, runs


def print_tables(runs: list[HilbertRun], opts: Options, run_dir: Path, seconds: float) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for run in runs:
        best = run.best_round
        end = (
            f"collapse at round {run.collapsed_at}"
            if run.collapsed_at is not None
            else f"no collapse within {run.max_rounds} rounds"
        )
        table = Table(
            title=f"{opts.kernel} width={opts.width:g}  eps={run.eps:g}: {len(run.rounds)} rounds, "
            f"{end} (lower bound {run.collapse_lower_bound:.3g})",
            title_justify="left",
            box=box.SIMPLE_HEAD,
        )
        for col in ("t", "c_t", "bracket of c_t", "||y_t||", "n_eff", "train MSE", "test MSE"):
            table.add_column(col, justify="right")
        for r in run.rounds:
            star = " *" if r.t == best else ""
            test = "-" if r.test_mse is None else f"{r.test_mse:.4f}{star}"
            table.add_row(
                str(r.t),
                f"{r.c:#.4g}",
                f"[{r.c_lower:.3g}, {r.c_upper:.3g}]",
                f"{r.y_norm:.4f}",
                str(r.n_effective),
                f"{r.train_mse:.4f}",
                test,
            )
        console.print(table)
    summary = Table(
        title="Summary (* = best round by test MSE; train MSE is against y_0)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for col in ("eps", "rounds", "collapsed at", "bound", "best round", "best test MSE"):
        summary.add_column(col, justify="right")
    for run in runs:
        best = run.best_round
        summary.add_row(
            f"{run.eps:g}",
            str(len(run.rounds)),
            "-" if run.collapsed_at is None else str(run.collapsed_at),
            f"{run.collapse_lower_bound:.3g}",
            "-" if best is None else str(best),
            "-" if best is None else f"{run.rounds[best - 1].test_mse:.4f}",
        )
    console.print(summary)
    console.print(f"wrote {run_dir / 'hilbert.json'} ({seconds:.2f} s)")


# An absolute config path (the ``conf/`` directory next to this file): with the relative form
# ``config_path="conf"``, Hydra resolves the configs as the Python package ``kdrun.theory.conf``
# whenever the app is started through its console script (module != __main__), and that
# requires a ``conf/__init__.py``; the file-based path works for ``kdrun-hilbert``,
# ``python -m kdrun.theory.cli``, editable and regular installs, from any working directory.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(config_path=CONFIG_DIR, config_name="hilbert", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``kdrun-hilbert``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import to_absolute_path

    start = time.perf_counter()
    try:
        opts = validate(cfg)
        if opts.data is not None:
            opts.data = to_absolute_path(opts.data)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        _, runs = run_experiment(opts, run_dir)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print_tables(runs, opts, run_dir, time.perf_counter() - start)


if __name__ == "__main__":
    main()
