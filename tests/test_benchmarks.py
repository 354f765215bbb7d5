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
            ("pydotcompute / addressed floor", "goal >= 0.8", "goal <= 1.2"),
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
        (
            "cpu_roundtrip.py",
            ("--messages", "200", "--repeats", "1"),
            ("raw ring calls", "rt.send / rt.receive, @message", "goal: rt.send"),
        ),
        (
            "pydotcompute_echo.py",
            ("--ours-only", "--messages", "1024", "--repeats", "1"),
            ("msg/s, window of 256", "latency p50"),
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
        ("cpu_roundtrip.py", ("--messages", "10")),
        ("pydotcompute_echo.py", ("--ours-only", "--messages", "10")),
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


def _echo_benchmark(*args: str, reference: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYDOTCOMPUTE_REFERENCE", None)
    if reference is not None:
        env["PYDOTCOMPUTE_REFERENCE"] = reference
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pydotcompute_echo.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.parametrize(
    ("args", "reference", "says"),
    [
        ((), None, "was not given"),
        (("--reference", "/nonexistent/pydotcompute-0.2.0"), None, "does not hold"),
        ((), str(ROOT), "other than 0.2.0"),  # this package is not PyDotCompute 0.2.0
    ],
)
def test_echo_benchmark_says_what_is_missing_and_how_to_get_it(
    args: tuple[str, ...], reference: str | None, says: str
) -> None:
    proc = _echo_benchmark(*args, reference=reference)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert says in proc.stderr and "pip download --no-deps --no-binary :all:" in proc.stderr
    assert "--ours-only" in proc.stderr


def test_echo_benchmark_against_pydotcompute_where_its_source_is_given() -> None:
    """Runs only where $PYDOTCOMPUTE_REFERENCE names PyDotCompute 0.2.0's extracted
    sdist and uvloop is installed: a cross-check, never a requirement."""
    reference = os.environ.get("PYDOTCOMPUTE_REFERENCE")
    if not reference:
        pytest.skip("PYDOTCOMPUTE_REFERENCE is not set")
    pytest.importorskip("uvloop")
    proc = _echo_benchmark("--messages", "2048", "--repeats", "1", reference=reference)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "goal >= 2.2" in proc.stdout and "goal <= 0.3" in proc.stdout
    assert "on uvloop.Loop" in proc.stdout
