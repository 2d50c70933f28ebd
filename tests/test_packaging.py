"""What the wheel ships, checked from pyproject.toml without building it (.ci/wheel-check builds, installs and
runs it): every folder of data files is a declared package, and every file in a shipped folder is either Python
or matched by its package's package-data patterns, so nothing is left out or warned about."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
UNSHIPPED = {"bench/results"}  # measurements kept beside the code, not installed
SKIPPED = {"__pycache__"}


def _config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folders() -> dict[str, Path]:
    """Each package the source tree holds (declared or not) -> its folder, under the package-dir mapping."""
    folders = {}
    for package, folder in _config()["package-dir"].items():
        root = REPO / folder
        for sub in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
            rel = sub.relative_to(REPO).as_posix()
            if SKIPPED & set(sub.parts) or any(part.startswith(".") for part in sub.relative_to(root).parts) or \
                    any(rel == u or rel.startswith(u + "/") for u in UNSHIPPED):
                continue
            folders[".".join([package, *sub.relative_to(root).parts])] = sub
    return folders


def test_every_folder_holding_files_is_a_declared_package():
    declared = set(_config()["packages"])
    holding = {name for name, folder in _folders().items() if any(p.is_file() for p in folder.iterdir())}
    assert holding - declared == set(), "add these to [tool.setuptools] packages (else 'would be ignored')"
    assert declared - set(_folders()) == set(), "declared packages without a folder"


def test_every_shipped_file_is_python_or_declared_package_data():
    patterns = _config()["package-data"]
    left_out = [str(path.relative_to(REPO)) for name, folder in _folders().items() for path in folder.iterdir()
                if path.is_file() and path.suffix != ".py"
                and not any(fnmatch.fnmatch(path.name, p) for p in patterns.get(name, []))]
    assert left_out == [], "files the wheel would leave out: add a package-data pattern or move them"


def test_the_shipped_model_and_data_are_declared():
    patterns = _config()["package-data"]
    for name, filename in (("alignsearch.models.pretrained.default", "model.safetensors"),
                           ("alignsearch.models.data", "imagenet_classes.txt"),
                           ("alignsearch.service.static", "app.js"),
                           ("alignsearch.bench.data", "demo_queries.json")):
        assert any(fnmatch.fnmatch(filename, p) for p in patterns[name]), name
