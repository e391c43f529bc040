"""The README's table of untrusted inputs cites real tests, and every such test is in the table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
_SECTION = "## Untrusted models and your files"
# The files whose tests are the table's rows, all of them.
_TABLE_FILES = (
    "tests/graphopt/test_hostile_inputs.py",
    "tests/graphopt/test_mutation.py",
    "tests/graphopt/test_unsupported_ops.py",
    "tests/passes/test_qdq_nonfinite.py",
    "tests/graphopt/test_no_data_loss.py",
    "tests/graphopt/test_determinism.py",
)


def _section() -> str:
    text = (_REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(_SECTION)
    end = text.find("\n## ", start + len(_SECTION))
    return text[start:end if end >= 0 else None]


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_cited_test_exists() -> None:
    cited = set(re.findall(r"`(test_\w+)`", _section()))
    defined = set().union(*(_test_functions(path) for path in (_REPO / "tests").rglob("test_*.py")))

    assert cited, "the table cites no tests"
    assert sorted(cited - defined) == []


def test_every_test_of_the_table_files_is_cited() -> None:
    cited = set(re.findall(r"`(test_\w+)`", _section()))
    tests = set().union(*(_test_functions(_REPO / name) for name in _TABLE_FILES))

    assert sorted(tests - cited) == []
