"""The simulator half of a test module, run in a child process.

numba-cuda chooses between a GPU and its simulator at its first import, so a module's
simulator tests run in a child started with ``NUMBA_ENABLE_CUDASIM=1``: the parent's
test (marked ``parent``) starts it, the child runs the tests marked ``sim``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim = pytest.mark.skipif(not SIM, reason="runs in the simulator child process")
parent = pytest.mark.skipif(SIM, reason="this is the parent of the simulator run")


def run_simulator_half(test_file: str, select: str, timeout: float) -> str:
    """Run the tests of ``test_file`` that ``select`` (a ``-k`` expression) picks, with
    the simulator on; fails with the child's output unless they all pass. Returns that
    output."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    cmd += ["-k", select]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
    return proc.stdout
