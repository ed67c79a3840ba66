"""The package boundary: screening uses training's public surface only, and training knows nothing of screening."""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
PUBLIC = {"training.api", "training.common"}


def _imports(package: str) -> dict[str, set[str]]:
    """Module path -> the absolute names it imports (``from x import y`` gives ``x``)."""
    found: dict[str, set[str]] = {}
    for path in sorted((PROJECT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        found[str(path.relative_to(PROJECT))] = names
    return found


def test_screening_imports_only_the_public_training_api():
    wrong = {f: sorted(n for n in names if n.split(".")[0] == "training" and n not in PUBLIC)
             for f, names in _imports("screening").items()}
    assert {f: n for f, n in wrong.items() if n} == {}, "import these through training.api or training.common"


def test_training_never_imports_screening():
    wrong = {f: sorted(n for n in names if n.split(".")[0] == "screening") for f, names in _imports("training").items()}
    assert {f: n for f, n in wrong.items() if n} == {}


def test_the_scan_sees_imports():
    """Guards the two tests above against passing because they read nothing."""
    imports = _imports("screening")
    assert "training.api" in imports["screening/inference.py"] and "training.common" in imports["screening/report.py"]
