"""Tests of the Hilbert-space self-distillation model (docs/theory.md) and of ``kdrun-hilbert``.

Every property is checked against computations written independently here (kernel matrices from
explicit formulas, rounds iterated with ``np.linalg.solve``, the root compared with scipy's
``brentq``), on the packaged toy set and on seeded random data (1-D and 2-D), for RBF and Laplace
kernels at several widths and eps values.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kdrun.theory.cli import ConfigError, Options, run_experiment, validate
from kdrun.theory.hilbert import (
    HilbertModel,
    HilbertRun,
    kernel_matrix,
    load_data,
    parse_clean_function,
    self_distill,
    solve_c,
)

REPO = Path(__file__).resolve().parents[1]
MAX_ROUNDS = 2000  # high enough that every run below collapses


# ------------------------------------------------------------------------------------------
# Independent reference computations
# ------------------------------------------------------------------------------------------
def ref_kernel(a: np.ndarray, b: np.ndarray, kernel: str, width: float) -> np.ndarray:
    a2 = a.reshape(len(a), -1)
    b2 = b.reshape(len(b), -1)
    sq = np.zeros((len(a2), len(b2)))
    for j in range(a2.shape[1]):
        sq += (a2[:, j][:, None] - b2[:, j][None, :]) ** 2
    if kernel == "rbf":
        return np.exp(-sq / (2 * width**2))
    return np.exp(-np.sqrt(sq) / width)


def iterate_direct(x, y0, kernel, width, cs):
    """y_t = G (c_t I + G)^{-1} y_{t-1} with plain linear solves; returns [y_1, ..., y_T] and
    the dual coefficients alpha_t = (c_t I + G)^{-1} y_{t-1}."""
    K = len(y0)
    G = ref_kernel(x, x, kernel, width) / K
    ys, alphas, y = [], [], np.asarray(y0, float)
    for c in cs:
        alpha = np.linalg.solve(c * np.eye(K) + G, y)
        y = G @ alpha
        ys.append(y)
        alphas.append(alpha)
    return ys, alphas


def solve_tolerance(model: HilbertModel, cs, scale: float) -> float:
    """Round-off allowed when comparing two exact formulas for round ``len(cs)``: machine epsilon
    times the worst condition number of the systems ``c_i I + G`` solved so far (up to 1e8 for
    random points that nearly coincide), times the size of the quantity compared."""
    cond = max((c + model.d[0]) / (c + model.d[-1]) for c in cs)
    return 100 * np.finfo(float).eps * cond * scale


def toy():
    ds = load_data()
    return ds.x, ds.y


def random_1d(seed=0, K=25):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, K), rng.normal(0, 1, K)


def random_2d(seed=1, K=30):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (K, 2)), rng.normal(0, 1, K)


DATASETS = {"toy": toy, "random1d": random_1d, "random2d": random_2d}

# (data, kernel, width, eps); widths include nearly-diagonal Gram matrices (kappa ~ 1, where the
# collapse lower bound is tight) and ill-conditioned ones (kappa ~ 1e3).
CASES = [
    ("toy", "rbf", 0.05, 0.003),
    ("toy", "rbf", 0.08, 0.01),
    ("toy", "rbf", 0.08, 0.001),
    ("toy", "rbf", 0.15, 0.03),
    ("toy", "laplace", 0.02, 0.003),
    ("toy", "laplace", 0.3, 0.01),
    ("toy", "laplace", 1.0, 0.001),
    ("random1d", "rbf", 0.05, 0.05),
    ("random1d", "laplace", 0.2, 0.01),
    ("random2d", "rbf", 0.2, 0.1),
    ("random2d", "laplace", 0.5, 0.02),
    ("random2d", "laplace", 0.02, 0.01),
]


def case_id(case):
    return "-".join(str(v) for v in case)


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def case(request):
    name, kernel, width, eps = request.param
    x, y = DATASETS[name]()
    model = HilbertModel(x, y, kernel=kernel, width=width)
    grid = (
        np.linspace(0, 1, 201)
        if np.ndim(x) == 1
        else np.random.default_rng(5).uniform(0, 1, (50, 2))
    )
    run = model.run(eps, max_rounds=MAX_ROUNDS, x_grid=grid)
    return dict(
        x=np.asarray(x),
        y=np.asarray(y),
        kernel=kernel,
        width=width,
        eps=eps,
        model=model,
        run=run,
        grid=grid,
    )


# ------------------------------------------------------------------------------------------
# Reference values on the toy set (docs/theory.md)
# ------------------------------------------------------------------------------------------
def _toy_run(kernel: str, width: float, eps: float = 0.01) -> HilbertRun:
    ds = load_data()
    return self_distill(
        ds.x,
        ds.y,
        kernel=kernel,
        width=width,
        eps=eps,
        max_rounds=50,
        clean_function=ds.clean_function,
        n_test=1001,
    )


def _printed_digits_match(value: float, printed: str) -> bool:
    decimals = len(printed.split(".")[1])
    return f"{round(value, decimals):.{decimals}f}" == printed


def test_reference_values_rbf_toy():
    run = _toy_run("rbf", 0.08)
    assert len(run.rounds) == 7 and run.collapsed_at == 8  # the eighth round returns f = 0
    ref_c = ["0.01775", "0.02357", "0.03065", "0.04017", "0.05552", "0.08698", "0.1930"]
    ref_norm = ["2.2228", "1.9144", "1.5940", "1.2678", "0.9389", "0.6086", "0.2774"]
    ref_mse = ["0.1652", "0.1496", "0.1549", "0.1823", "0.2323", "0.3051", "0.4010"]
    for name, ref, got in [
        ("c_t", ref_c, [r.c for r in run.rounds]),
        ("||y_t||", ref_norm, [r.y_norm for r in run.rounds]),
        ("test MSE", ref_mse, [r.test_mse for r in run.rounds]),
    ]:
        np.testing.assert_allclose(got, [float(v) for v in ref], rtol=1e-3, err_msg=name)
        # Stronger: every printed digit of the reference is reproduced.
        assert all(_printed_digits_match(g, p) for g, p in zip(got, ref)), (name, got)
    assert run.best_round == 2


def test_reference_values_laplace_toy():
    run = _toy_run("laplace", 0.3)
    assert len(run.rounds) == 8 and run.collapsed_at == 9
    ref_mse = ["0.1493", "0.1365", "0.1393", "0.1608"]
    got = [r.test_mse for r in run.rounds[:4]]
    np.testing.assert_allclose(got, [float(v) for v in ref_mse], rtol=1e-3)
    assert all(_printed_digits_match(g, p) for g, p in zip(got, ref_mse)), got
    assert run.best_round == 2


def test_test_mse_is_against_sin_on_1001_points():
    run = _toy_run("rbf", 0.08)
    xs = np.linspace(0, 1, 1001)
    clean = np.sin(2 * np.pi * xs)
    ds = load_data()
    _, alphas = iterate_direct(ds.x, ds.y, "rbf", 0.08, run.cs)
    gx = ref_kernel(xs, ds.x, "rbf", 0.08) / len(ds.y)
    for r, alpha in zip(run.rounds, alphas):
        assert r.test_mse == pytest.approx(np.mean((gx @ alpha - clean) ** 2), rel=1e-10)


# ------------------------------------------------------------------------------------------
# The properties the paper proves (docs/theory.md; parametrised over CASES)
# ------------------------------------------------------------------------------------------
def test_collapse_is_finite_and_not_before_the_bound(case):
    run, K, eps = case["run"], len(case["y"]), case["eps"]
    assert run.collapsed_at is not None, "no collapse within MAX_ROUNDS"
    assert run.collapsed_at == len(run.rounds) + 1
    norms = [np.linalg.norm(case["y"])] + [r.y_norm for r in run.rounds]
    assert all(n**2 > K * eps for n in norms[:-1])  # every completed round had something to fit
    assert norms[-1] ** 2 <= K * eps  # ... and the collapsing round had not
    d = np.linalg.eigvalsh(ref_kernel(case["x"], case["x"], case["kernel"], case["width"]) / K)
    bound = (np.linalg.norm(case["y"]) / math.sqrt(K * eps) - 1) / (d.max() / d.min())
    assert run.collapse_lower_bound == pytest.approx(bound, rel=1e-8)
    assert len(run.rounds) >= bound
    # The per-round step behind the bound: ||y_t|| >= ||y_{t-1}|| - kappa sqrt(K eps).
    kappa = d.max() / d.min()
    for prev, cur in zip(norms[:-1], norms[1:]):
        assert cur >= prev - kappa * math.sqrt(K * eps) - 1e-12


def test_c_strictly_increases_and_lies_in_its_bracket(case):
    run, K, eps = case["run"], len(case["y"]), case["eps"]
    cs = np.array(run.cs)
    assert np.all(cs > 0) and np.all(np.diff(cs) > 0)
    d = np.linalg.eigvalsh(ref_kernel(case["x"], case["x"], case["kernel"], case["width"]) / K)
    norms = [np.linalg.norm(case["y"])] + [r.y_norm for r in run.rounds]
    s = math.sqrt(K * eps)
    for r, prev in zip(run.rounds, norms):
        lo, hi = d.min() * s / (prev - s), d.max() * s / (prev - s)
        assert r.c_lower == pytest.approx(lo, rel=1e-9) and r.c_upper == pytest.approx(hi, rel=1e-9)
        assert lo * (1 - 1e-12) <= r.c <= hi * (1 + 1e-12)


def test_y_norm_strictly_decreases(case):
    run = case["run"]
    norms = np.array([np.linalg.norm(case["y"])] + [r.y_norm for r in run.rounds])
    assert np.all(np.diff(norms) < 0)


def test_b_entries_shrink_and_small_eigenvalues_shrink_fastest(case):
    run, model = case["run"], case["model"]
    d = model.d
    assert np.all(np.diff(d) <= 0)  # stored in decreasing order
    np.testing.assert_allclose(
        np.sort(d)[::-1],
        np.sort(np.linalg.eigvalsh(model.G))[::-1],
        rtol=1e-10,
        atol=1e-14,
    )
    prev = np.ones_like(d)
    j, k = np.triu_indices(len(d), 1)  # index j < k  <=>  d_j >= d_k
    distinct = d[k] < d[j] * (1 - 1e-6)
    for r in run.rounds:
        b = r.b
        np.testing.assert_allclose(b, prev * d / (r.c + d), rtol=1e-12)  # B_t recursion
        assert np.all(b > 0) and np.all(b < prev)  # every entry shrinks
        assert np.all(np.diff(b) <= 1e-15)  # larger eigenvalue -> larger entry
        # the ratio b[small d]/b[large d] falls
        ratio_now = b[k[distinct]] / b[j[distinct]]
        ratio_before = prev[k[distinct]] / prev[j[distinct]]
        assert np.all(ratio_now < ratio_before)
        prev = b


def test_n_effective_never_grows(case):
    run = case["run"]
    n = [r.n_effective for r in run.rounds]
    for r in run.rounds:
        assert r.n_effective == int(np.sum(r.b / r.b.max() > 0.1))
    assert all(a >= b for a, b in zip(n, n[1:]))
    assert n[0] <= len(case["y"])


def test_closed_form_equals_iterated_solve(case):
    run, model = case["run"], case["model"]
    ys, _ = iterate_direct(case["x"], case["y"], case["kernel"], case["width"], run.cs)
    for t, (r, y_direct) in enumerate(zip(run.rounds, ys), start=1):
        tol = solve_tolerance(model, run.cs[:t], np.linalg.norm(case["y"]))
        np.testing.assert_allclose(r.y, y_direct, rtol=0, atol=tol)
        closed = model.closed_form_targets(run.cs[:t])  # V B_t V^T y_0
        np.testing.assert_allclose(closed, y_direct, rtol=0, atol=tol)
        # and B_t written out explicitly
        B = np.diag(np.prod([model.d / (c + model.d) for c in run.cs[:t]], axis=0))
        np.testing.assert_allclose(model.V @ B @ model.V.T @ case["y"], y_direct, atol=tol)


def test_equivalent_kernel_equals_round_function(case):
    run, model, grid = case["run"], case["model"], case["grid"]
    _, alphas = iterate_direct(case["x"], case["y"], case["kernel"], case["width"], run.cs)
    g = ref_kernel(grid, case["x"], case["kernel"], case["width"]) / len(case["y"])
    for t, (r, alpha) in enumerate(zip(run.rounds, alphas), start=1):
        f_direct = g @ alpha  # g(x, X)/K (c_t I + G)^{-1} y_{t-1}
        f_equiv = model.predict_equivalent(grid, run.cs[:t])  # one-shot kernel applied to y_0
        tol = solve_tolerance(model, run.cs[:t], np.linalg.norm(case["y"]))
        np.testing.assert_allclose(f_equiv, f_direct, rtol=0, atol=tol)
        np.testing.assert_allclose(r.f_grid, f_direct, rtol=0, atol=tol)
        # the equivalent kernel at the training points reproduces y_t
        np.testing.assert_allclose(
            model.equivalent_kernel(case["x"], run.cs[:t]) @ case["y"], r.y, rtol=0, atol=tol
        )


def test_each_round_meets_its_constraint_with_equality(case):
    run, eps = case["run"], case["eps"]
    ys, _ = iterate_direct(case["x"], case["y"], case["kernel"], case["width"], run.cs)
    prev = [np.asarray(case["y"], float), *ys[:-1]]
    for r, y_t, y_prev in zip(run.rounds, ys, prev):
        assert np.mean((y_t - y_prev) ** 2) == pytest.approx(eps, rel=1e-9)
        assert r.target_mse == pytest.approx(eps, rel=1e-9)
        assert r.train_mse == pytest.approx(np.mean((y_t - case["y"]) ** 2), rel=1e-9, abs=1e-15)


# ------------------------------------------------------------------------------------------
# U-shaped test error on the toy set for small eps
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kernel,width,eps",
    [
        ("rbf", 0.08, 0.001),
        ("rbf", 0.08, 0.003),
        ("rbf", 0.08, 0.01),
        ("rbf", 0.15, 0.01),
        ("laplace", 0.3, 0.001),
        ("laplace", 0.3, 0.003),
        ("laplace", 0.3, 0.01),
        ("laplace", 1.0, 0.003),
    ],
)
def test_test_error_is_u_shaped_for_small_eps(kernel, width, eps):
    run = _toy_run(kernel, width, eps)
    mse = np.array([r.test_mse for r in run.rounds])
    best = int(np.argmin(mse))
    assert 0 < best < len(mse) - 1, mse  # distillation helps at first, then hurts
    assert np.all(np.diff(mse[: best + 1]) < 0) and np.all(np.diff(mse[best:]) > 0), mse
    assert run.best_round == best + 1


# ------------------------------------------------------------------------------------------
# Pieces: root solve, kernels, data
# ------------------------------------------------------------------------------------------
def test_solve_c_matches_brentq_and_meets_the_equation():
    from scipy.optimize import brentq

    rng = np.random.default_rng(3)
    for trial in range(300):
        K = int(rng.integers(2, 40))
        d = np.exp(rng.uniform(-25, 1, K)) if trial % 2 else rng.uniform(0.01, 1, K)
        z = rng.normal(size=K) * math.exp(rng.uniform(-2, 2))
        eps = float(np.sum(z**2) / K * math.exp(rng.uniform(-12, -0.01)))
        c, lo, hi = solve_c(z, d, K, eps)

        def h(u, d, z, target):
            cc = math.exp(u)
            return np.sum((cc / (cc + d)) ** 2 * z**2) - target

        a, b = math.log(lo) - 1e-6, math.log(hi) + 1e-6
        u = brentq(h, a, b, args=(d, z, K * eps), xtol=1e-300, rtol=1e-15)
        assert c == pytest.approx(math.exp(u), rel=1e-13)
        assert np.sum((c / (c + d)) ** 2 * z**2) == pytest.approx(K * eps, rel=1e-13)
        assert lo * (1 - 1e-12) <= c <= hi * (1 + 1e-12)


def test_solve_c_collapse():
    d = np.array([0.5, 0.1])
    z = np.array([0.3, 0.4])  # ||z||^2 = 0.25
    assert solve_c(z, d, 2, 0.125) is None  # ||z||^2 == K eps: f = 0 meets the constraint
    assert solve_c(z, d, 2, 0.2) is None
    assert solve_c(z, d, 2, 0.12) is not None


def test_first_round_collapses_when_data_are_within_eps():
    x, y = random_1d(K=10)
    run = HilbertModel(x, y, "rbf", 0.05).run(eps=float(np.mean(y**2)) * 1.01)
    assert run.rounds == [] and run.collapsed_at == 1


def test_max_rounds_without_collapse():
    x, y = toy()
    run = HilbertModel(x, y, "rbf", 0.08).run(eps=0.001, max_rounds=5)
    assert len(run.rounds) == 5 and run.collapsed_at is None


@pytest.mark.parametrize("kernel", ["rbf", "laplace"])
def test_kernel_matrix_matches_formula_1d_and_nd(kernel):
    rng = np.random.default_rng(7)
    a, b = rng.uniform(size=(6, 3)), rng.uniform(size=(4, 3))
    np.testing.assert_allclose(
        kernel_matrix(a, b, kernel, 0.3), ref_kernel(a, b, kernel, 0.3), rtol=1e-13
    )
    x = rng.uniform(size=5)
    np.testing.assert_allclose(
        kernel_matrix(x, x, kernel, 0.1), kernel_matrix(x[:, None], x[:, None], kernel, 0.1)
    )
    assert np.all(np.diag(kernel_matrix(x, x, kernel, 0.1)) == 1.0)
    assert kernel_matrix(np.array([0.0]), np.array([0.5]), kernel, 0.25).dtype == np.float64


def test_kernel_and_model_reject_bad_input():
    with pytest.raises(ValueError, match="unknown kernel"):
        kernel_matrix([0.0], [1.0], "poly", 1.0)
    with pytest.raises(ValueError, match="width"):
        kernel_matrix([0.0], [1.0], "rbf", 0.0)
    with pytest.raises(ValueError, match="singular"):
        HilbertModel([0.1, 0.1, 0.5], [1.0, 2.0, 3.0], "rbf", 0.1)  # duplicate point
    with pytest.raises(ValueError, match="values"):
        HilbertModel([0.1, 0.2], [1.0], "rbf", 0.1)
    with pytest.raises(ValueError, match="eps"):
        HilbertModel([0.1, 0.2], [1.0, 2.0], "rbf", 0.1).run(eps=0.0)


def test_packaged_toy_data():
    ds = load_data()
    assert ds.x.shape == (11,) and ds.y.shape == (11,) and ds.clean_function == "sin(2*pi*x)"
    np.testing.assert_array_equal(ds.x, np.linspace(0, 1, 11).round(1))
    # the 11 noisy targets the reference values are computed on (to 4 decimals)
    y = [0.3848, 1.2334, 1.3323, 0.6920, -0.2976, -0.2419]
    y += [-0.7964, -0.9616, -0.4967, -0.3469, 0.5590]
    np.testing.assert_allclose(ds.y, y, atol=5e-5)


def test_parse_clean_function_is_safe():
    f = parse_clean_function("sin(2*pi*x)")
    xs = np.linspace(0, 1, 7)
    np.testing.assert_allclose(f(xs), np.sin(2 * np.pi * xs))
    np.testing.assert_allclose(
        parse_clean_function("exp(-x**2) + 0.5*x")(xs), np.exp(-(xs**2)) + 0.5 * xs
    )
    for bad in [
        "__import__('os').system('true')",
        "x.__class__",
        "open('f')",
        "[x]",
        "'a'",
        "sin(x",
    ]:
        with pytest.raises(ValueError):
            parse_clean_function(bad)


def test_load_user_data_and_errors(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"x": [[0, 0], [1, 0], [0, 1]], "y": [1, 2, 3]}))
    ds = load_data(p)
    assert ds.x.shape == (3, 2) and ds.clean_function is None
    for content, msg in [
        ("{", "not valid JSON"),
        (json.dumps({"x": [1, 2]}), "keys 'x' and 'y'"),
        (json.dumps({"x": [1, 2], "y": [1]}), "shape"),
        (json.dumps({"x": [1, 2], "y": [1, 2], "clean_function": "os.system"}), "clean_function"),
    ]:
        p.write_text(content)
        with pytest.raises(ValueError, match=msg):
            load_data(p)
    with pytest.raises(ValueError, match="not found"):
        load_data(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
BASE_CFG = {
    "kernel": "rbf",
    "width": 0.08,
    "eps": [0.001, 0.01],
    "max_rounds": 20,
    "data": None,
    "n_test": 1001,
    "test_interval": None,
    "plots": True,
}


@pytest.mark.parametrize(
    "override,key",
    [
        ({"kernel": "poly"}, "kernel"),
        ({"width": 0}, "width"),
        ({"width": -0.1}, "width"),
        ({"width": "abc"}, "width"),
        ({"eps": [0.01, 0.0]}, "eps"),
        ({"eps": -1}, "eps"),
        ({"eps": []}, "eps"),
        ({"max_rounds": 0}, "max_rounds"),
        ({"n_test": 1}, "n_test"),
        ({"test_interval": [1, 0]}, "test_interval"),
    ],
)
def test_validate_rejects_bad_values(override, key):
    with pytest.raises(ConfigError, match=key) as err:
        validate({**BASE_CFG, **override})
    assert "\n" not in str(err.value)


def test_validate_accepts_scalar_eps():
    assert validate({**BASE_CFG, "eps": 0.01}).eps == [0.01]


def test_run_experiment_user_nd_data_without_clean_function(tmp_path):
    x, y = random_2d(K=12)
    p = tmp_path / "data.json"
    p.write_text(json.dumps({"x": x.tolist(), "y": y.tolist()}))
    opts = Options(
        kernel="laplace",
        width=0.5,
        eps=[0.05],
        max_rounds=50,
        data=str(p),
        n_test=11,
        test_interval=None,
        plots=True,
    )
    result, runs = run_experiment(opts, tmp_path / "run")
    assert result["n_points"] == 12
    (r,) = result["runs"]
    assert r["collapsed_at"] == len(r["rounds"]) + 1
    assert all(rd["test_mse"] is None for rd in r["rounds"])
    assert sorted(p.name for p in (tmp_path / "run" / "plots").iterdir()) == [
        "b_diag.png",
        "c_bracket.png",
        "fitted_functions.png",
        "test_error.png",
    ]


def test_run_experiment_1d_user_data_with_clean_function(tmp_path):
    xs = np.linspace(-1, 1, 9)
    p = tmp_path / "data.json"
    p.write_text(
        json.dumps({"x": xs.tolist(), "y": (xs**2 + 0.1).tolist(), "clean_function": "x**2"})
    )
    opts = Options(
        kernel="rbf",
        width=0.3,
        eps=[0.001],
        max_rounds=3,
        data=str(p),
        n_test=101,
        test_interval=None,
        plots=False,
    )
    result, runs = run_experiment(opts, tmp_path / "run")
    # data outside [0, 1]: the test grid spans the data range
    assert runs[0].x_grid[0] == -1 and runs[0].x_grid[-1] == 1 and len(runs[0].x_grid) == 101
    rd = result["runs"][0]["rounds"][0]
    g = ref_kernel(runs[0].x_grid, xs, "rbf", 0.3) / 9
    (_,), (alpha,) = iterate_direct(xs, xs**2 + 0.1, "rbf", 0.3, [rd["c"]])
    assert rd["test_mse"] == pytest.approx(
        np.mean((g @ alpha - runs[0].x_grid ** 2) ** 2), rel=1e-10
    )
    assert not (tmp_path / "run" / "plots").exists()


def _cli_command() -> list[str]:
    exe = shutil.which("kdrun-hilbert")
    return [exe] if exe else [sys.executable, "-m", "kdrun.theory.cli"]


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


RUN_KEYS = {"eps", "kernel", "width", "collapsed_at", "collapse_lower_bound", "rounds"}
ROUND_KEYS = {"t", "c", "c_lower", "c_upper", "y_norm", "b", "n_effective", "train_mse", "test_mse"}
PLOTS = ["fitted_functions", "b_diag", "c_bracket", "test_error"]


def _run_cli(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run the console script (or ``python -m kdrun.theory.cli``) from a foreign cwd, so configs
    and data must come from the package; return (process, wall seconds, CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [*_cli_command(), *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr
    return proc, wall, cpu


def _check_schema(out: dict, eps: list[float]) -> dict[float, dict]:
    assert out["kernel"] == "rbf" and out["width"] == 0.08
    assert [r["eps"] for r in out["runs"]] == eps
    for run in out["runs"]:
        assert set(run) == RUN_KEYS
        assert run["kernel"] == "rbf" and run["width"] == 0.08
        assert [r["t"] for r in run["rounds"]] == list(range(1, len(run["rounds"]) + 1))
        for r in run["rounds"]:
            assert set(r) == ROUND_KEYS
            assert isinstance(r["b"], list) and len(r["b"]) == 11
            assert isinstance(r["test_mse"], float) and isinstance(r["n_effective"], int)
    by_eps = {r["eps"]: r for r in out["runs"]}
    ref = by_eps[0.01]
    assert ref["collapsed_at"] == 8 and len(ref["rounds"]) == 7
    expected = [0.1652, 0.1496, 0.1549, 0.1823, 0.2323, 0.3051, 0.4010]
    assert [round(r["test_mse"], 4) for r in ref["rounds"]] == expected
    return by_eps


def test_cli_writes_json_and_plots(tmp_path):
    proc, _, _ = _run_cli(tmp_path, "eps=[0.01]")
    run_dir = tmp_path / "run"
    _check_schema(json.loads((run_dir / "hilbert.json").read_text()), [0.01])
    for name in PLOTS:
        png = run_dir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "best round" in proc.stdout and "0.1496 *" in proc.stdout


@pytest.mark.slow  # ~4-5 s: the default configuration (four eps) with imports and four plots
def test_cli_default_run_is_under_10_s(tmp_path):
    _, wall, cpu = _run_cli(tmp_path)
    # The requirement is < 10 s (imports, all eps, JSON, four plots). The CPU time of the process
    # is checked strictly; wall time too, unless other jobs oversubscribe the CPUs (then the
    # wall clock measures them, not us, and only a loose bound is kept).
    assert cpu < 10.0, f"kdrun-hilbert used {cpu:.1f} s of CPU"
    load_per_cpu = os.getloadavg()[0] / (os.cpu_count() or 1)
    wall_limit = 10.0 if load_per_cpu <= 1.0 else 10.0 * min(load_per_cpu, 3.0)
    assert wall < wall_limit, f"kdrun-hilbert took {wall:.1f} s (load/cpu {load_per_cpu:.1f})"
    out = json.loads((tmp_path / "run" / "hilbert.json").read_text())
    by_eps = _check_schema(out, [0.001, 0.003, 0.01, 0.03])
    assert by_eps[0.001]["collapsed_at"] is None and len(by_eps[0.001]["rounds"]) == 20
    for name in PLOTS:
        assert (tmp_path / "run" / "plots" / f"{name}.png").stat().st_size > 10_000


def test_cli_rejects_bad_kernel_with_one_line(tmp_path):
    proc = subprocess.run(
        [*_cli_command(), "kernel=poly", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "kernel='poly'" in lines[0] and "rbf, laplace" in lines[0]
    assert not (tmp_path / "run" / "hilbert.json").exists()
