"""The agent stays in parts with one job each (issue 22): no class in leaseagent/agent
over MAX_CLASS_LINES lines, no function over MAX_FUNCTION_LINES (docstrings and
comments count: they are what a reader reads)."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "leaseagent" / "agent"
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60


def sizes(kind: type[ast.AST] | tuple[type[ast.AST], ...], directory: Path = AGENT
          ) -> dict[str, int]:
    """Lines of every `kind` node in `directory`'s modules, by 'module.py:name:line'."""
    out = {}
    for path in sorted(directory.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind):
                name = getattr(node, "name", "?")
                start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])
                out[f"{path.name}:{name}:{start}"] = (node.end_lineno or node.lineno) - start + 1
    return out


def test_no_class_of_the_agent_is_over_300_lines() -> None:
    classes = sizes(ast.ClassDef)
    assert classes, "no class found: the path is wrong"
    assert {k: n for k, n in classes.items() if n > MAX_CLASS_LINES} == {}


def test_no_function_of_the_agent_is_over_60_lines() -> None:
    functions = sizes((ast.FunctionDef, ast.AsyncFunctionDef))
    assert functions, "no function found: the path is wrong"
    assert {k: n for k, n in functions.items() if n > MAX_FUNCTION_LINES} == {}


def test_the_checker_counts_a_long_function_and_class_whole(tmp_path: Path) -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"class C:\n    @staticmethod\n    def f():\n{body}\n")
    assert sizes((ast.FunctionDef, ast.AsyncFunctionDef), tmp_path) == {
        "m.py:f:2": MAX_FUNCTION_LINES + 2}
    assert sizes(ast.ClassDef, tmp_path) == {"m.py:C:1": MAX_FUNCTION_LINES + 3}
