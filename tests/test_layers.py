"""Imports run one way: tools -> cloud, edge -> export -> protocol (docs/design.md). A lazy import
inside a function counts too: it is the same dependency, only paid later."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the pqsu packages it may import
ALLOWED = {"protocol": {"protocol"}, "export": {"export", "protocol"}, "edge": {"edge", "export", "protocol"},
           "cloud": {"cloud", "export", "protocol"}}


def _imported_packages(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "pqsu" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package):
    wrong = [f"{path.relative_to(ROOT)}:{line} imports pqsu.{dep}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for dep, line in sorted(_imported_packages(path)) if dep not in ALLOWED[package]]
    assert not wrong, "\n".join(wrong)
