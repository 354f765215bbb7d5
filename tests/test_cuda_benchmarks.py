"""The GPU benchmarks run end to end on the numba-cuda simulator (tiny sizes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "expect"),
    [
        ("gpu_roundtrip.py", "persistent, runtime"),
        ("gpu_throughput.py", "baseline msg/s"),
        ("gpu_idle.py", "beside idle kernel, 1 block"),
    ],
)
def test_benchmark_smoke_on_the_simulator(script: str, expect: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the script switches itself with --simulator
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--simulator"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "numba-cuda simulator" in proc.stdout and expect in proc.stdout
    assert "Traceback" not in proc.stderr
