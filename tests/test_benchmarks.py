"""The host benchmarks run end to end at tiny sizes, so none of them rots unnoticed.

Only that they finish and print their verdict lines is checked: the numbers at these
sizes mean nothing (speed goals are read off full runs, never asserted in tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout: float = 240) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        (
            "actor_roundtrip.py",
            ("--messages", "2048", "--repeats", "1"),
            ("addressed floor", "goal >= 0.85", "goal <= 1.2"),
        ),
        (
            "coordinator.py",
            ("--items", "2000", "--durable-items", "500"),
            ("durable goal >= 5000 items/s",),
        ),
        ("workflows.py", ("--workflows", "100"), ("goal >= 1 000 workflows/s",)),
        ("messages_codec.py", (), ("records_from_messages",)),
        (
            "ring_throughput.py",
            ("--seconds", "0.05", "--repeats", "1"),
            ("async def host actor", "goal p50 <= 5"),
        ),
        ("dashboard_history.py", ("--repeats", "2"), ("goal sample/scrape <= 5x",)),
        (
            "telemetry_overhead.py",
            ("--seconds", "0.05", "--rounds", "1"),
            ("host", "scraped"),
        ),
    ],
)
def test_host_benchmark_runs(script: str, args: tuple[str, ...], expect: tuple[str, ...]) -> None:
    out = run_benchmark(script, *args)
    for line in expect:
        assert line in out, out[-3000:]


def test_journal_benchmark_runs_on_both_engines(postgres_server: str) -> None:
    out = run_benchmark("journal.py", "--items", "300", "--dsn", postgres_server)
    assert "sqlite" in out and "postgresql / sqlite" in out, out[-3000:]


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("actor_roundtrip.py", ("--messages", "10")),
        ("telemetry_overhead.py", ("--rounds", "0")),
    ],
)
def test_benchmark_refuses_sizes_it_cannot_measure(script: str, args: tuple[str, ...]) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr, proc.stderr[-2000:]
