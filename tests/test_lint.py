"""ruff (configured in pyproject.toml) finds nothing in the package, the app, the scripts or the tests."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.fail("ruff is not installed (it is in the dev extras: pip install -e '.[dev]')")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "qwen_mlx", "tui", "scripts", "tests"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
