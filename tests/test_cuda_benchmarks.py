"""The GPU suite rehearses end to end on the numba-cuda simulator (tiny sizes).

``benchmarks/gpu_suite.py --simulate`` runs every GPU benchmark and the ``gpu``-marked
tests in subprocesses, exactly as on a GPU, and writes its JSON and goals table; this
keeps the one command a GPU run depends on working. The numbers mean nothing here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_rehearsal_on_the_simulator(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the suite switches its steps itself
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--simulate", "--out",
         str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "REHEARSAL" in proc.stdout and "Traceback" not in proc.stderr
    report = json.loads(out.read_text())
    assert report["simulate"] and "simulator" in report["device"]
    steps = report["steps"]
    assert list(steps) == ["floor", "roundtrip", "throughput", "idle", "chain", "gpu tests"]
    assert all(s["status"] == "ok" for s in steps.values()), {
        n: (s["status"], s["stderr_tail"][-500:]) for n, s in steps.items()
    }
    floor = steps["floor"]["results"]
    assert floor["pingpong_word_us"][0] > 0 and floor["zero_copy_h2d_GBps"] > 0
    assert "rings_blocks_per_sm_us" in steps["roundtrip"]["results"]
    assert [r["batch"] for r in steps["throughput"]["results"]["matrix"]] == [1, 4]
    chain = steps["chain"]["results"]
    assert chain["linked_x3_rps"] > 0 and chain["linked_x3_us"][0] > 0
    assert chain["flow_fused_ips"] > 0 and chain["flow_linked_us"][0] > 0
    assert steps["gpu tests"]["results"]["skipped"] > 0  # no GPU: they skip, cleanly
    # every goal of the table is computed from the steps (verdicts mean nothing here)
    assert len(report["goals"]) == 18
    for goal in report["goals"]:
        assert goal["goal"] in proc.stdout
