"""Test modules share set-up through tests/support, tests/fuzz helpers and conftest.py, never through each other.

Importing a test module runs its tests a second time under another name (pytest collects what a module's
namespace holds) and ties one suite's private helpers to another's; this keeps that from creeping back.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(dotted: str) -> bool:
    """A module of this tree (`tests.…` or relative) whose file pytest collects (`test_*.py`)."""
    return (dotted.startswith(("tests.", ".")) or dotted == "tests") and dotted.split(".")[-1].startswith("test_")


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Every module an import statement may bind: `from a import b` may bind the module `a.b`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    module = "." * node.level + (node.module or "")
    joint = "" if module.endswith(".") else "."
    return [module] + [f"{module}{joint}{alias.name}" for alias in node.names]


def imported_test_modules(source: str) -> list[str]:
    """The test modules `source` imports, in the absolute and the relative forms."""
    tree = ast.parse(source)
    statements = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    return [name for node in statements for name in _names(node) if _is_test_module(name)]


def test_the_check_sees_every_form_of_import() -> None:
    source = (
        "import tests.test_a\nfrom tests.test_b import x\nfrom tests import test_c\nfrom . import test_d\n"
        "from .test_e import y\nfrom tests.support import stack\nfrom aiohttp.test_utils import z\n"
    )
    assert imported_test_modules(source) == ["tests.test_a", "tests.test_b", "tests.test_c", ".test_d", ".test_e"]


def test_no_module_under_tests_imports_a_test_module() -> None:
    offenders = {
        path.relative_to(TESTS).as_posix(): imported
        for path in sorted(TESTS.rglob("*.py"))
        if (imported := imported_test_modules(path.read_text()))
    }
    assert offenders == {}, "move what is shared to tests/support (or a conftest.py fixture)"
