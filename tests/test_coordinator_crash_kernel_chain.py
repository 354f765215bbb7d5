"""kill -9 inside a fused or linked chain of ``cpu`` kernel stages: the segment is one
journal hop, so the restarted flow re-runs it for the items in flight and finishes every
item once, with nothing lost, filtered or emitted twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.crash.kernel_chain_flow import expected, running

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "crash" / "kernel_chain_flow.py"
N = 1500
KILLS = 3


def child(path: Path, variant: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(SCRIPT), str(path), variant]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("variant", ["fused", "linked"])
async def test_sigkill_inside_a_kernel_chain_then_every_key_exactly_once(tmp_path, variant):
    path = tmp_path / "chain.db"
    async with running(str(path), variant) as flow:
        await flow.submit_many(range(N), keys=[str(i) for i in range(N)])

    rng = random.Random(os.environ.get("CRASH_SEED", time.time_ns()))
    kills = 0
    for _ in range(KILLS):
        proc = child(path, variant)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # deployed, and the plan is as the variant says
        assert line.strip() == "running", f"child did not start: {line!r}"
        time.sleep(rng.uniform(0.2, 0.8))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    proc = child(path, variant)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "drained" in out, out
    assert kills == KILLS  # every kill landed while the flow still ran

    async with running(str(path), variant) as flow:
        seen = [kv async for kv in flow.results()]
        assert len(seen) == N
        assert sorted(int(k) for k, _ in seen) == list(range(N))  # every key exactly once
        wrong = [(k, v) for k, v in seen if v != expected(int(k))]
        assert not wrong, wrong[:5]
        assert flow.dead_letters() == []
        assert flow.status() == {"done": N}  # nothing filtered, nothing dead
        assert flow.journal.read("SELECT count(*) FROM tokens")[0][0] == 0
