"""Clean functions of the Hilbert-space experiment, written as arithmetic expressions in ``x``.

Contract: ``parse_clean_function(expr)`` checks the expression's syntax tree against a short list
of allowed nodes, names and numpy functions and returns a vectorised float64 function; anything
else is a ``ValueError`` naming the offending part. The string is never executed as arbitrary
Python.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["parse_clean_function"]

_SAFE_FUNCS: dict[str, Any] = {
    name: getattr(np, name)
    for name in (
        "sin",
        "cos",
        "tan",
        "exp",
        "log",
        "sqrt",
        "abs",
        "tanh",
        "sinh",
        "cosh",
        "arctan",
        "sign",
    )
}
_SAFE_CONSTS = {"pi": math.pi, "e": math.e}
_SAFE_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Call,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.Pow,
    ast.USub,
    ast.UAdd,
)


def parse_clean_function(expr: str) -> Callable[[np.ndarray], np.ndarray]:
    """Turn an arithmetic expression in ``x`` (e.g. ``"sin(2*pi*x)"``) into a vectorised function.

    Only numbers, ``x``, ``pi``, ``e``, ``+ - * / **`` and the numpy functions
    ``sin cos tan exp log sqrt abs tanh sinh cosh arctan sign`` are accepted: the string is parsed
    and checked, never executed as arbitrary Python.
    """
    try:
        tree = ast.parse(str(expr).strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"clean_function {expr!r} is not a valid expression") from err
    for node in ast.walk(tree):
        if not isinstance(node, _SAFE_NODES):
            raise ValueError(f"clean_function {expr!r}: {type(node).__name__} is not allowed")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
            raise ValueError(f"clean_function {expr!r}: only numeric constants are allowed")
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in _SAFE_FUNCS and not node.keywords
        ):
            raise ValueError(
                f"clean_function {expr!r}: allowed functions are {', '.join(_SAFE_FUNCS)}"
            )
        if isinstance(node, ast.Name) and node.id not in {"x", *_SAFE_CONSTS, *_SAFE_FUNCS}:
            raise ValueError(f"clean_function {expr!r}: unknown name {node.id!r}")
    code = compile(tree, "<clean_function>", "eval")

    def f(x: np.ndarray) -> np.ndarray:
        env = {"__builtins__": {}, **_SAFE_FUNCS, **_SAFE_CONSTS, "x": np.asarray(x, np.float64)}
        return np.asarray(eval(code, env), dtype=np.float64)  # noqa: S307 - checked AST above

    return f
