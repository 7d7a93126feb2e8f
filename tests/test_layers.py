"""The import-linter layers contract of pyproject.toml (DEVELOPING.md "Layers of the package"): the tree
keeps it, and an import planted from the bottom layer to the top one breaks it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
pytestmark = pytest.mark.skipif(not Path(LINT).exists(),
                                reason="import-linter is not installed (pip install '.[test]')")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the kdfast package under ``root`` with ``root/pyproject.toml``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_tree(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "kdfast", tmp_path / "kdfast", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_the_layers():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_breaks_the_contract(tmp_path):
    root = copy_tree(tmp_path)
    io = root / "kdfast" / "runtime" / "io.py"
    io.write_text(io.read_text() + "\n\ndef _planted():\n    from kdfast.apps import compare  # noqa: F401\n")
    result = lint(root)
    assert result.returncode != 0
    assert "kdfast.runtime is not allowed to import kdfast.apps" in result.stdout
