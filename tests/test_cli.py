"""The pydotcompute command line."""

from __future__ import annotations

import os
import pathlib
import re
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
    text = " ".join(out.stdout.split())
    m = re.search(r"([\d,]+) readings in .*?(\d+) anomalies planted, (\d+) alerts raised", text)
    assert m, text
    sent, planted, raised = (int(g.replace(",", "")) for g in m.groups())
    assert sent > 1000
    assert abs(raised - planted) <= 1, text  # every planted spike found, noise not flagged


def test_doctor_reports_backends():
    out = _cli("doctor")
    assert out.returncode == 0, out.stderr
    assert "numba" in out.stdout
    assert "cuda" in out.stdout and ("usable" in out.stdout)
    # the optional pieces, each with what it is for or how to get it
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    for piece in ("ray", "psycopg", "NVML", "chromium"):
        assert piece in lines, out.stdout
        assert "(" in lines[piece] or "not" in lines[piece]
    assert "CUDA module loading: " in out.stdout


def test_doctor_warns_of_lazy_cuda_module_loading():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_MODULE_LOADING": "LAZY"}
    out = subprocess.run(
        [sys.executable, "-m", "pydotcompute", "doctor"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert "CUDA module loading: LAZY (set in the environment)" in out.stdout
    assert "warning: CUDA loads modules lazily" in out.stdout


def test_unknown_command_fails_with_usage():
    out = _cli("nonsense")
    assert out.returncode == 2
    assert "usage" in out.stderr


def test_output_piped_into_a_reader_that_stops_early_is_not_an_error():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # `pydotcompute doctor | head -1`: the reader closes the pipe after one line
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydotcompute", "doctor"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
        bufsize=0,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err, err


def test_version():
    from pydotcompute import __version__

    out = _cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"pydotcompute {__version__}"


def test_demo_serve_prints_both_urls_and_serves_while_it_runs():
    import urllib.request

    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydotcompute", "demo", "--seconds", "4", "--serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = []
        while not any(line.startswith("dashboard:") for line in lines):
            line = proc.stdout.readline()
            assert line, (lines, proc.poll())
            lines.append(line)
        metrics = next(line for line in lines if line.startswith("metrics:")).split()[1]
        dashboard = next(line for line in lines if line.startswith("dashboard:")).split()[1]
        assert metrics == dashboard + "metrics"
        with urllib.request.urlopen(metrics, timeout=10) as r:
            assert b'kernel="zscore"' in r.read()
        with urllib.request.urlopen(dashboard, timeout=10) as r:
            assert b'<main id="view">' in r.read()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "summary" in out
