"""Every knob of every shipped method is checked from its declarations alone.

The cases are generated from the declarations of each ``conf/method/*.yaml`` target (constructor
annotations, ``Literal`` choices, the class's ``ranges``): a value just outside each closed end,
each open end itself and just past it, NaN for a bounded knob, a value that is not a choice, a
value of the wrong type, null for a knob that is not nullable. Each must be rejected by
:func:`kdrun.config.validate` with one line that names ``method.<key>`` and the allowed values;
the ends that are allowed (closed ends, just inside open ones, every choice) must validate and
build. A few of the cases go through the real CLI, which must exit with status 2 and one
``kdrun: error:`` line before Hydra creates a run dir.
"""

from __future__ import annotations

import copy
import math
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf, open_dict

from kdrun.config import NUM, RUNTIME_ARGS, Rule, knob_rules, validate
from kdrun.errors import ConfigError
from kdrun.methods.base import Method, Range
from tests.conftest import run_kdrun
from tests.method_utils import compose_cfg

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
RUNTIME = RUNTIME_ARGS["method"]


def target(option: str) -> type[Method]:
    return get_object(OmegaConf.load(CONF / "method" / f"{option}.yaml")._target_)


def rules(option: str) -> dict[str, Rule]:
    return knob_rules(target(option), RUNTIME)  # type: ignore[return-value]


def is_numeric(rule: Rule) -> bool:
    kinds = rule.kind if isinstance(rule.kind, tuple) else (rule.kind,)
    return rule.choices is None and int in kinds and bool not in kinds


def step(rule: Rule, end: float) -> float:
    """The distance to "just outside" an end: 1 for an integer knob, else a relative 1e-6."""
    return 1 if rule.kind is int else max(abs(end), 1.0) * 1e-6


def rejected_values(rule: Rule) -> list[tuple[str, Any]]:
    """``(case, value)`` pairs the declaration must reject."""
    cases: list[tuple[str, Any]] = [] if rule.nullable else [("null", None)]
    if rule.choices is not None:
        cases += [("not a choice", "not_a_choice"), ("wrong type", 3)]
    elif is_numeric(rule):
        cases += [("wrong type", "abc"), ("wrong type", True)]
        if rule.kind is int:
            cases.append(("wrong type", 1.5))
        b = rule.bounds
        if b.low is not None:
            if b.low_open:
                cases.append(("open low end", b.low))
            cases.append(("below low end", b.low - step(rule, b.low)))
        if b.high is not None:
            if b.high_open:
                cases.append(("open high end", b.high))
            cases.append(("above high end", b.high + step(rule, b.high)))
        if b.low is not None or b.high is not None:
            cases.append(("nan", math.nan))
    elif rule.kind is bool:
        cases += [("wrong type", "maybe"), ("wrong type", 1)]
    elif rule.kind is str:
        cases += [("wrong type", 3)]
    return cases


def accepted_values(rule: Rule) -> list[Any]:
    """Values at the declared ends that must pass: closed ends, just inside open ends, choices."""
    if rule.choices is not None:
        return list(rule.choices)
    if not is_numeric(rule):
        return []
    b, values = rule.bounds, []
    if b.low is not None:
        values.append(b.low + step(rule, b.low) if b.low_open else b.low)
    if b.high is not None:
        values.append(b.high - step(rule, b.high) if b.high_open else b.high)
    return values


REJECTED = [
    (option, key, case, value)
    for option in METHODS
    for key, rule in rules(option).items()
    for case, value in rejected_values(rule)
]
ACCEPTED = [
    (option, key, value)
    for option in METHODS
    for key, rule in rules(option).items()
    for value in accepted_values(rule)
]


@cache
def _composed(option: str):
    return compose_cfg([f"method={option}"])


def cfg_with(option: str, key: str, value: Any):
    cfg = copy.deepcopy(_composed(option))
    with open_dict(cfg):
        cfg.method[key] = value
    return cfg


def test_every_knob_of_every_shipped_method_is_declared():
    """Numeric knobs have bounds, string knobs choices (a free string only as an optional path
    or option name), every ``ranges`` entry names a constructor argument."""
    assert len(METHODS) >= 14
    for option in METHODS:
        cls, declared = target(option), rules(option)
        assert set(cls.ranges) <= set(declared), (option, set(cls.ranges) - set(declared))
        for key, rule in declared.items():
            where = f"{option}: method.{key}"
            assert rule is not None, f"{where} has no checkable annotation"
            if is_numeric(rule):
                assert rule.low is not None or rule.high is not None, f"{where} has no range"
            elif rule.kind is str:
                assert rule.nullable, f"{where}: a string knob needs Literal choices"
            elif rule.choices is None:
                assert rule.kind is bool, f"{where}: {rule.kind}"
        yaml_keys = {k for k in OmegaConf.load(CONF / "method" / f"{option}.yaml") if k[0] != "_"}
        assert yaml_keys <= set(declared), (option, yaml_keys - set(declared))


def test_case_generation_covers_every_kind_of_case():
    kinds = {case for _, _, case, _ in REJECTED}
    assert kinds == {
        "null",
        "not a choice",
        "wrong type",
        "open low end",
        "below low end",
        "open high end",
        "above high end",
        "nan",
    }
    assert len(REJECTED) > 150 and len(ACCEPTED) > 50


def rejection_problem(option: str, key: str, value: Any) -> str | None:
    """What is wrong with the rejection of ``method.<key>=value`` (None: as it should be)."""
    rule = rules(option)[key]
    try:
        validate(cfg_with(option, key, value))
    except ConfigError as err:
        message = str(err)
    else:
        return "accepted"
    shown = "null" if value is None else repr(value)
    allowed = [str(end) for end in (rule.low, rule.high) if end is not None]
    allowed += [str(choice) for choice in rule.choices or ()]
    if (
        "\n" in message
        or not message.startswith(f"method.{key}={shown} ")
        or not message.endswith(f": must be {rule.describe()}")
        or not all(text in message for text in allowed)
    ):
        return message
    return None


@pytest.mark.parametrize("option", METHODS)
def test_bad_knobs_are_rejected_with_one_line_naming_key_and_allowed_values(option):
    problems = [
        f"method.{key}={value!r} ({case}): {problem}"
        for o, key, case, value in REJECTED
        if o == option and (problem := rejection_problem(option, key, value)) is not None
    ]
    assert not problems, "\n".join(problems)
    with pytest.raises(ConfigError) as err:  # an unknown key lists the knobs there are
        validate(cfg_with(option, "not_a_knob", 1))
    allowed = ", ".join(rules(option))
    assert str(err.value).startswith("method.not_a_knob is not an option of kdrun.methods.")
    assert str(err.value).endswith(f"; allowed: {allowed}")


@pytest.mark.parametrize("option", METHODS)
def test_allowed_ends_validate_and_build(option):
    """The constructor trusts what the declarations allow: no stricter check of its own."""
    for _, key, value in (case for case in ACCEPTED if case[0] == option):
        cfg = cfg_with(option, key, value)
        validate(cfg)
        built = instantiate(cfg.method, num_classes=10, num_samples=20)
        assert isinstance(built, Method) and getattr(built, key, value) == value, (key, value)


def test_messages_read_as_documented():
    def message(option, key, value):
        with pytest.raises(ConfigError) as err:
            validate(cfg_with(option, key, value))
        return str(err.value)

    assert message("byot", "T", 0) == "method.T=0 is out of range: must be a number > 0"
    assert message("tf_kd_reg", "a", 1.0) == (
        "method.a=1.0 is out of range: must be a number in (0, 1)"
    )
    assert message("born_again", "generations", 2.5) == (
        "method.generations=2.5 has the wrong type: must be an integer >= 1"
    )
    assert message("hybrid", "teacher_epochs", 0) == (
        "method.teacher_epochs=0 is out of range: must be an integer >= 1 (or null)"
    )
    assert message("born_again", "loss", "l2") == (
        "method.loss='l2' is not one of the choices: must be one of kd, mse"
    )
    assert message("ps_kd", "bank_device", None).startswith("method.bank_device=null is not")


def test_tuple_ranges_are_closed_and_range_ends_as_declared():
    assert Range.of((0, 1)) == Range(0, 1)
    assert 0 in Range(0, 1) and 1 in Range(0, 1) and 0 not in Range(0, 1, low_open=True)
    assert 1 not in Range(0, 1, high_open=True) and math.nan not in Range(0, None)
    rule = Rule(NUM, low=0, high=1, low_open=True)
    assert rule.describe() == "a number in (0, 1]"


@pytest.mark.parametrize("option", ["kd", "significance", "regulated", "hybrid"])
def test_check_knobs_hook_runs_in_validate(option):
    """``teacher_model`` must be a model option: a check no declaration can say."""
    validate(cfg_with(option, "teacher_model", "resnet8"))
    with pytest.raises(ConfigError, match=r"^method.teacher_model='nope' is not a model option"):
        validate(cfg_with(option, "teacher_model", "nope"))


SLOW = pytest.mark.slow  # the same guarantee as the first case, for the other kinds of error
CLI_CASES = [
    (["method=byot", "method.T=0"], "method.T=0 is out of range: must be a number > 0"),
    pytest.param(
        ["method=lsskd", "method.use_kl=maybe"],
        "method.use_kl='maybe' has the wrong type",
        marks=SLOW,
    ),
    pytest.param(
        ["method=kd", "method.teacher_model=nope"],
        "method.teacher_model='nope' is not a model",
        marks=SLOW,
    ),
]


@pytest.mark.parametrize(("args", "expected"), CLI_CASES, ids=["range", "type", "hook"])
def test_cli_rejects_before_the_run_dir_exists(tmp_path, args, expected):
    proc = run_kdrun([*args, "logger=none"], cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"kdrun: error: {expected}"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists(), sorted((tmp_path / "outputs").rglob("*"))
