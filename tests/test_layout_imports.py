"""The house rule of the layout: `coordinator/` and `client/` never import each other; what both need lives in
`round/`, which imports neither (and the pure optim core knows nothing of either)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "aftermath"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("room, forbidden", [
    ("coordinator", ("aftermath.client",)),
    ("client", ("aftermath.coordinator",)),
    ("round", ("aftermath.client", "aftermath.coordinator")),
    ("optim", ("aftermath.client", "aftermath.coordinator", "aftermath.round")),
])
def test_rooms_do_not_import_their_neighbours(room, forbidden):
    files = sorted((PACKAGE / room).glob("*.py"))
    assert files, f"no modules under {room}/"
    offending = {f"{f.name}: {m}" for f in files for m in imported_modules(f)
                 if any(m == x or m.startswith(x + ".") for x in forbidden)}
    assert not offending


def test_the_import_scan_sees_function_level_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from aftermath.client.loop import TrainingClient\n")
    assert "aftermath.client.loop" in imported_modules(sample)
