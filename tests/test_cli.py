"""The pydotcompute command line."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "pydotcompute", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def test_demo_streams_and_prints_table_and_summary():
    out = _cli("demo", "--seconds", "1")
    assert out.returncode == 0, out.stderr
    for kid in ("zscore", "detect", "alerts"):
        assert kid in out.stdout
    assert "summary" in out.stdout
    assert "errors 0" in out.stdout
    # the summary reports what flowed: readings streamed and alerts raised for planted spikes
    line = next(ln for ln in out.stdout.splitlines() if "readings in" in ln)
    sent = int(line.split("summary:")[1].split("readings")[0].replace(",", ""))
    assert sent > 1000


def test_doctor_reports_backends():
    out = _cli("doctor")
    assert out.returncode == 0, out.stderr
    assert "numba" in out.stdout
    assert "cuda" in out.stdout and ("usable" in out.stdout)


def test_unknown_command_fails_with_usage():
    out = _cli("nonsense")
    assert out.returncode == 2
    assert "usage" in out.stderr
