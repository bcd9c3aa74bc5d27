"""House rule (DESIGN.md): a function is about one screen. No function in `src/` or `examples/` has more than
`MAX_LINES` lines of code, its docstring aside."""

import ast
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 40
FOLDERS = [ROOT / "src", ROOT / "examples"]


def code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef, blank: set[int]) -> int:
    """Non-blank lines of the function's body (signature and decorators excluded), its docstring aside."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:] if isinstance(body[0].value.value, str) else body
    lines = set()
    for statement in body:
        lines.update(range(statement.lineno, statement.end_lineno + 1))
    return len(lines - blank)


def long_functions(path: Path) -> list[str]:
    source = path.read_text()
    blank = {number for number, line in enumerate(source.splitlines(), 1) if not line.strip()}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            count = code_lines(node, blank)
            if count > MAX_LINES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({count} lines)")
    return found


FILES = sorted(path for folder in FOLDERS if folder.exists() for path in folder.rglob("*.py"))


@pytest.mark.skipif(not FILES, reason="needs the source tree")
def test_no_function_is_longer_than_a_screen():
    found = [entry for path in FILES for entry in long_functions(path)]
    assert not found, "\n".join(found)
