"""The package passes ``mypy --strict`` with the repository's configuration."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is not installed (pip install '.[dev]')",
)
@pytest.mark.timeout(600)
def test_package_passes_mypy_strict() -> None:
    # --cache-dir=os.devnull: no cache written; on a clean checkout (as in CI) that is
    # faster than writing one nobody reads again.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", f"--cache-dir={os.devnull}", "pydotcompute"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"mypy --strict pydotcompute:\n{proc.stdout}{proc.stderr}"
