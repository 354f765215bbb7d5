"""processes=True stages: sync functions in child processes, bounded like the rest."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pydotcompute.coordinator import deploy, stage
from pydotcompute.errors import InvalidConfigurationError

ROOT = Path(__file__).resolve().parent.parent


def cpu_bound(x: int) -> tuple[int, int]:
    return sum(i * i for i in range(x)), os.getpid()


def make_state() -> dict:
    return {"pid": os.getpid(), "calls": 0}


def with_state(x: int, state: dict) -> tuple[int, int]:
    state["calls"] += 1
    return state["pid"], state["calls"]


def fails_on_three(x: int) -> int:
    if x == 3:
        raise KeyError("three")
    return x


async def test_process_workers_run_in_other_processes_with_state():
    g = stage(cpu_bound, workers=2, processes=True) >> stage(
        with_state, processes=True, state=make_state
    )
    async with await deploy(None, g, name="p") as flow:
        keys = await flow.submit_many(range(1, 41))
        await flow.drain(timeout=60)
        out = [await flow.result(k) for k in keys]
    pids = {pid for pid, _ in out}
    assert len(pids) == 1 and os.getpid() not in pids
    assert sorted(calls for _, calls in out) == list(range(1, 41))  # state kept in the child


async def test_process_failures_keep_their_exception_type_for_retry_filters():
    g = stage(fails_on_three, processes=True, retries=2, backoff=0.001, retry_on=(KeyError,))
    async with await deploy(None, g, name="p") as flow:
        await flow.submit_many(range(5), keys=[str(i) for i in range(5)])
        await flow.drain(timeout=60)
        [rec] = flow.dead_letters()
        assert rec.key == "3" and rec.attempts == 2 and rec.error.startswith("KeyError")
        assert "in worker process" in rec.traceback
        assert await flow.result("4") == 4


async def test_processes_need_module_level_functions():
    with pytest.raises(InvalidConfigurationError, match="module-level"):
        await deploy(None, stage(lambda x: x, processes=True), name="p")


async def test_close_stops_the_worker_processes():
    flow = await deploy(None, stage(cpu_bound, workers=2, processes=True), name="p")
    procs = [r._proc for r in flow._runners]
    assert all(p.is_alive() for p in procs)
    await flow.close()
    assert not any(p.is_alive() for p in procs)


def dies_on_two(x: int) -> int:
    if x == 2:
        os._exit(1)  # the worker process dies holding the item
    return x * 10


async def test_a_dead_worker_process_fails_its_item_and_is_replaced():
    g = stage(dies_on_two, processes=True, retries=2, backoff=0.001)
    async with await deploy(None, g, name="p") as flow:
        await flow.submit_many([1, 2, 3], keys=["1", "2", "3"])
        await flow.drain(timeout=60)
        [rec] = flow.dead_letters()
        assert rec.key == "2" and rec.attempts == 2 and "died" in rec.error
        assert await flow.result("1") == 10 and await flow.result("3") == 30


UNGUARDED = """
import asyncio
from pydotcompute.coordinator import deploy, stage

def double(x):
    return 2 * x

async def main():
    async with await deploy(None, stage(double, processes=True), name="t", journal=JOURNAL) as f:
        await f.submit(3, key="a")
        print(await f.result("a", timeout=30))

{run}
"""


def run_script(tmp_path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "app.py"
    script.write_text(body)
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_a_main_module_without_guard_is_named_as_the_cause(tmp_path):
    journal = tmp_path / "j.db"
    body = UNGUARDED.replace("JOURNAL", repr(str(journal)))
    out = run_script(tmp_path, body.format(run="asyncio.run(main())"))
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pydotcompute.errors.InvalidConfigurationError: stage 'double': ")
    assert f'{tmp_path / "app.py"} has no `if __name__ == "__main__":` guard' in last
    assert "ChildProcessDied" not in out.stderr  # not the old "worker process ... died"
    assert "bootstrapping phase" not in out.stderr  # nor multiprocessing's own riddle
    # The worker process never deployed: the journal holds the parent's flow only.
    assert sqlite3.connect(journal).execute("SELECT count(*) FROM owners").fetchone()[0] == 0
    # With the guard, the same program works.
    out = run_script(
        tmp_path, body.format(run='if __name__ == "__main__":\n    asyncio.run(main())')
    )
    assert out.returncode == 0 and out.stdout.strip() == "6", out.stderr


def test_a_worker_dying_while_importing_the_main_module_says_so(tmp_path):
    body = UNGUARDED.replace("JOURNAL", "None").format(
        run='if __name__ != "__main__":\n    raise RuntimeError("not importable")\n'
        'if __name__ == "__main__":\n    asyncio.run(main())'
    )
    out = run_script(tmp_path, body)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "exited (status 1) while starting, before it ran any item" in last
    assert f"the main module {tmp_path / 'app.py'}" in last
    assert "RuntimeError: not importable" in out.stderr  # the child's own traceback


def broken_state() -> dict:
    raise OSError("model file missing")


async def test_a_worker_that_cannot_load_its_stage_fails_the_deploy():
    with pytest.raises(InvalidConfigurationError, match="cannot load the stage: OSError"):
        await deploy(None, stage(with_state, processes=True, state=broken_state), name="p")
