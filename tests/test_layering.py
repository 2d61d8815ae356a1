"""Imports flow one way: trainer -> registry <- serving; maskbank/ composes them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "registry": {"trainer", "serving", "maskbank"},
    "trainer": {"serving", "maskbank"},
    "serving": {"trainer", "maskbank"},
}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_reverse_imports(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_walker_sees_imports(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import serving.runtime\nfrom trainer import loop\nfrom . import local\n")
    assert imported_packages(sample) == {"serving", "trainer"}
