"""A PostgreSQL journal whose server restarts, stops, or is not up yet, for real.

Each test runs its own throwaway server (``tests/postgres_server.py``), which it restarts
with ``pg_ctl restart -m fast`` (what an operator's restart does: every session ended,
open transactions rolled back) or stops for longer than the journal's
``reconnect_timeout``. The workers and workflows ride through the first and finish every
item exactly once; the second stops them with an error that says how to resume.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pydotcompute.coordinator import PostgresJournal, deploy, stage
from pydotcompute.errors import JournalError, JournalUnavailableError
from tests import postgres_server as pg
from tests.crash.coordinator_flow import GRAPH, journal
from tests.test_coordinator_crash import check_every_key_once, child

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "tests" / "crash" / "workflow_calls.py"


@pytest.fixture
def server():
    """A server of this test's own, which the test may restart or stop."""
    pytest.importorskip(
        "psycopg", reason='psycopg is not installed: pip install "pydotcompute[postgres]"'
    )
    try:
        with pg.throwaway() as srv:
            yield srv
    except pg.NoServer as exc:
        pytest.skip(str(exc))


def wait_until(predicate, limit: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met within {limit} s"
        time.sleep(0.01)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_a_restart_in_the_middle_of_a_multi_process_flow_is_ridden_through(server, tmp_path):
    n = 1000
    async with await deploy(None, GRAPH, name="crash", journal=journal(server.dsn)) as flow:
        await flow.submit_many(range(n), keys=[str(i) for i in range(n)])
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [child(server.dsn, log, time.time() + 1.5) for log in logs]
    try:
        wait_until(lambda: all(len(lines(log)) > 20 for log in logs), what="both at work")
        for p in procs:
            assert p.poll() is None  # the restart lands while the flow runs
        server.restart()
        at_restart = sum(len(lines(log)) for log in logs)
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0 and "drained" in out  # neither gave up
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert sum(len(lines(log)) for log in logs) > at_restart  # work went on after it
    ran = collections.defaultdict(set)
    for log in logs:
        for line in lines(log):
            name, x, _ = line.split()
            ran[name].add(x)
    assert all(len(xs) == n for xs in ran.values()) and len(ran) == 4
    await check_every_key_once(server.dsn, n)


def test_a_restart_in_the_middle_of_workflows_is_ridden_through(server, tmp_path):
    n, log = 4, tmp_path / "calls.log"
    proc = subprocess.Popen(
        [sys.executable, str(WORKFLOWS), server.dsn, str(log), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_until(lambda: len(lines(log)) >= 3, what="workflows at work")
        assert proc.poll() is None
        server.restart()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    sys.path.insert(0, str(WORKFLOWS.parent))
    from workflow_calls import expected

    assert json.loads(out) == [expected(j) for j in range(n)]
    runs = collections.Counter(lines(log))
    # Every call ran exactly once: none was lost with the server, none ran again.
    assert runs == {f"w{j} {p}": 1 for j in range(n) for p in range(5)}


async def test_a_server_down_longer_than_reconnect_timeout_stops_the_flow_resumably(server):
    secret = server.dsn.replace("postgres@", "postgres:s3cret@")  # trust: any password works
    # The stopped flow cannot give its leases back, and the restarted server cannot
    # tell whether it is still around: a short lease lets the redeploy take them soon.
    cfg = PostgresJournal(secret, reconnect_timeout=1.5, poll=0.02, lease=2.0)
    n = 40

    async def slow(x: int) -> int:
        await asyncio.sleep(0.05)
        return x + 1

    flow = await deploy(None, stage(slow), name="down", journal=cfg)
    try:
        await flow.submit_many(range(n), keys=[str(i) for i in range(n)])
        await asyncio.sleep(0.3)
        await asyncio.to_thread(server.stop)
        t0 = time.monotonic()
        with pytest.raises(JournalError) as err:
            await flow.drain(timeout=60)
        assert time.monotonic() - t0 >= 1.0  # it waited for the server first
        # Raised as is by the op that gave up, or as the cause of "flow ... stopped".
        assert JournalUnavailableError in {type(err.value), type(err.value.__cause__)}
        text = str(err.value)
        assert "could not be reached" in text and "deploy the flow again" in text
        assert "127.0.0.1" in text and "s3cret" not in text
    finally:
        await flow.close()
    await asyncio.to_thread(server.start)
    async with await deploy(None, stage(slow), name="down", journal=cfg) as flow:
        await flow.drain(timeout=60)
        assert flow.status() == {"done": n}
        assert sorted((int(k), v) for k, v in [kv async for kv in flow.results()]) == [
            (i, i + 1) for i in range(n)
        ]


async def test_deploy_waits_for_a_server_that_is_not_up_yet(server):
    await asyncio.to_thread(server.stop)
    cfg = PostgresJournal(server.dsn, reconnect_timeout=60)
    deploying = asyncio.create_task(deploy(None, stage(lambda x: x * 2), name="late", journal=cfg))
    await asyncio.sleep(1.0)
    assert not deploying.done()  # waiting, not failed
    await asyncio.to_thread(server.start)
    async with await asyncio.wait_for(deploying, 60) as flow:
        await flow.submit(21, key="a")
        assert await flow.result("a", timeout=10) == 42
