"""Every entry point asks for eager CUDA module loading before it can touch CUDA.

With lazy loading (CUDA's default since 12.2) the first launch of any other kernel
may wait for the device to go idle, which it never does beside a resident ring
kernel. The driver reads ``CUDA_MODULE_LOADING`` once, when CUDA initialises, so the
variable must be set before that; these run in fresh processes without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_CLI = """
import os
from pydotcompute.cli.main import main
try:
    main(["--help"])
except SystemExit:
    pass
print("LOADING", os.environ.get("CUDA_MODULE_LOADING"))
"""

_BENCHMARKS = """
import os, sys
sys.argv = ["gpu_roundtrip.py"]  # not --simulator: the GPU path
import gpu_common
print("LOADING", os.environ.get("CUDA_MODULE_LOADING"))
"""

_CUPY = """
import os
from pydotcompute.errors import BackendNotAvailableError
from pydotcompute.memory.cuda_guard import import_cupy
try:
    import_cupy()
except BackendNotAvailableError:
    pass  # no CuPy or no GPU here: what matters is what was set before trying
print("LOADING", os.environ.get("CUDA_MODULE_LOADING"))
"""


def _run(code: str, cwd: Path, **env: str) -> str:
    child = {k: v for k, v in os.environ.items() if k not in ("CUDA_MODULE_LOADING",
                                                              "NUMBA_ENABLE_CUDASIM")}  # fmt: skip
    child["PYTHONPATH"] = str(ROOT)
    child.update(env)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=child,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize(
    ("code", "cwd"),
    [(_CLI, ROOT), (_BENCHMARKS, ROOT / "benchmarks"), (_CUPY, ROOT)],
    ids=["cli", "benchmarks", "cupy"],
)
def test_entry_point_asks_for_eager_loading(code: str, cwd: Path) -> None:
    assert "LOADING EAGER" in _run(code, cwd)


def test_the_users_own_setting_wins() -> None:
    assert "LOADING LAZY" in _run(_CLI, ROOT, CUDA_MODULE_LOADING="LAZY")
