"""No function in router/ or actors/ is over 60 lines or over a cyclomatic complexity of 15,
except declarative tables (the CLI's parser, the metric declarations).

Complexity is counted as radon and mccabe count it: one, plus one for each `if`, conditional
expression, loop, `except`, `assert`, comprehension (and each of its `if`s), `case`, and each
extra operand of `and` / `or`. Nested functions count on their own.

    python tests/test_code_shape.py     # lists every function with its lines and complexity
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60
MAX_COMPLEXITY = 15
TABLES = {
    "router/cli.py:parser",  # argparse declarations
    "router/telemetry/metrics.py:Metrics.__init__",  # metric declarations
}

Function = ast.FunctionDef | ast.AsyncFunctionDef


def complexity(function: Function) -> int:
    count = 1
    for node in _own_nodes(function):
        if isinstance(node, ast.If | ast.IfExp | ast.For | ast.AsyncFor | ast.While):
            count += 1
        elif isinstance(node, ast.ExceptHandler | ast.Assert | ast.match_case):
            count += 1
        elif isinstance(node, ast.BoolOp):
            count += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            count += 1 + len(node.ifs)
    return count


def _own_nodes(function: Function) -> Iterator[ast.AST]:
    """The nodes of `function`'s body, not those of the functions defined inside it."""
    stack: list[ast.AST] = list(function.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue  # counted on its own
        yield node
        stack.extend(ast.iter_child_nodes(node))


def functions() -> Iterator[tuple[str, int, int]]:
    """(`path:qualified.name`, lines, complexity) of every function in router/ and actors/."""
    for package in ("router", "actors"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            yield from _walk(tree, f"{path.relative_to(ROOT)}:", "")


def _walk(node: ast.AST, where: str, prefix: str) -> Iterator[tuple[str, int, int]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            yield from _walk(child, where, f"{prefix}{child.name}.")
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{where}{prefix}{child.name}"
            lines = (child.end_lineno or child.lineno) - child.lineno + 1
            yield name, lines, complexity(child)
            yield from _walk(child, where, f"{prefix}{child.name}.")


def offenders() -> list[str]:
    return [
        f"{name}: {lines} lines, complexity {cc}"
        for name, lines, cc in functions()
        if (lines > MAX_LINES or cc > MAX_COMPLEXITY) and name not in TABLES
    ]


def test_no_function_is_too_long_or_too_complex() -> None:
    assert offenders() == []


def test_the_measure_counts_what_it_says() -> None:
    source = (
        "def f(x):\n"
        "    if x and x > 1 or x < -1:\n"
        "        return [y for y in x if y]\n"
        "    for i in x:\n"
        "        try:\n"
        "            pass\n"
        "        except ValueError:\n"
        "            pass\n"
        "    def inner():\n"
        "        if x: pass\n"
        "    return 1 if x else 2\n"
    )
    function = ast.parse(source).body[0]
    assert isinstance(function, ast.FunctionDef)
    # 1 + if + (and, or) + comprehension and its if + for + except + conditional expression
    assert complexity(function) == 1 + 1 + 2 + 2 + 1 + 1 + 1


if __name__ == "__main__":
    for name, lines, cc in functions():
        flag = " <-" if (lines > MAX_LINES or cc > MAX_COMPLEXITY) and name not in TABLES else ""
        print(f"{cc:3d} {lines:4d}  {name}{flag}", file=sys.stdout)
