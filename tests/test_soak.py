"""The soak benchmark, shortened: a durable flow and durable workflows on SQLite whose
worker is SIGKILLed and restarted, then checked for every key exactly once with the right
value, no dead letters, flat peak RSS and a WAL under its limit (``benchmarks/soak.py``
runs the full sizes: a million items and 100 000 workflows)."""

from __future__ import annotations

import re

from tests.test_benchmarks import run_benchmark


def test_short_soak_survives_kills_and_passes_every_check(tmp_path):
    out = run_benchmark(
        "soak.py",
        "--items", "20000",
        "--workflows", "8000",
        "--kill-every", "0.8:1.5",
        "--max-kills", "2",
        "--backlog", "2000",
        "--dir", str(tmp_path),
        timeout=300,
    )  # fmt: skip
    assert "soak: all checks OK" in out, out[-3000:]
    kills = [int(k) for k in re.findall(r"(\d+) kills, \d+ worker starts", out)]
    assert len(kills) == 2 and kills[0] >= 1, out[-3000:]  # the item run was interrupted
    for check in (
        "every key exactly once, right value",
        "no dead letters",
        "every workflow once, right result",
        "no failed workflow",
        "peak RSS flat after warm-up",
        "WAL under its limit",
    ):
        assert f"OK   {check}:" in out, out[-3000:]
    assert "FAIL" not in out, out[-3000:]
