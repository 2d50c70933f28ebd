"""The house's shape: one installed name, and data flowing models -> indexer -> service, never back up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["models", "indexer", "service", "bench"]  # each may import the ones before it, never after
FOLDERS = {name: REPO / name for name in LAYERS} | {"cli": REPO / "alignsearch"}


def _imports(path: Path) -> set[str]:
    """Absolute module names that ``path`` imports (relative imports resolved within its package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(FOLDERS) + ["tests"])
def test_no_bare_top_level_package_names(folder):
    root = REPO / "tests" if folder == "tests" else FOLDERS[folder]
    for path in _sources(root):
        bare = {n for n in _imports(path) if n.split(".")[0] in LAYERS}
        assert not bare, f"{path.relative_to(REPO)} imports {sorted(bare)}: use alignsearch.<layer>"


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_a_higher_one(layer):
    higher = {f"alignsearch.{name}" for name in LAYERS[LAYERS.index(layer) + 1:]} | {"alignsearch.cli"}
    for path in _sources(FOLDERS[layer]):
        upward = {n for n in _imports(path) if any(n == h or n.startswith(h + ".") for h in higher)}
        assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)} from a higher layer"


def test_console_helpers_import_no_layer():
    assert not {n for n in _imports(REPO / "alignsearch" / "console.py") if n.startswith("alignsearch")}

