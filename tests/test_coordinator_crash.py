"""kill -9 at random moments: the durable flow resumes and finishes every item once,
on SQLite and on PostgreSQL (where two workers share the journal and one is killed)."""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pydotcompute.coordinator import deploy
from tests.crash.coordinator_flow import GRAPH, expected, journal

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "crash" / "coordinator_flow.py"
N = 2000


def child(
    path: Path | str, log: Path | None = None, start_at: float = 0.0, prefix: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COORD_START_AT": str(start_at)}
    args = [*prefix, sys.executable, str(SCRIPT), str(path)] + ([str(log)] if log else [])
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)


UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc")
# Run the worker as a child of a first process in its namespace, numbered 30001: a pid
# (or thread id) that the other worker's namespace does not have, where pid 1 exists.
BEHIND_INIT = (
    sys.executable,
    "-c",
    "import subprocess, sys\n"
    "with open('/proc/sys/kernel/ns_last_pid', 'w') as f:\n"
    "    f.write('30000')\n"
    "sys.exit(subprocess.call(sys.argv[1:]))",
)


@functools.lru_cache(maxsize=1)
def pid_namespaces() -> str:
    """Why processes cannot be put into PID namespaces of their own here ('' if they can)."""
    try:
        proc = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    except subprocess.TimeoutExpired:
        return "unshare did not return"
    if proc.returncode != 0:
        return f"unshare --pid is not permitted here: {proc.stderr.strip()}"
    return ""


async def test_sigkill_at_five_random_moments_then_every_key_exactly_once(tmp_path):
    path = tmp_path / "crash.db"
    async with await deploy(None, GRAPH, name="crash", journal=journal(path)) as flow:
        await flow.submit_many(range(N), keys=[str(i) for i in range(N)])

    rng = random.Random(os.environ.get("CRASH_SEED", time.time_ns()))
    kills = 0
    for _ in range(5):
        proc = child(path)
        time.sleep(rng.uniform(0.4, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    proc = child(path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "drained" in out
    assert kills == 5  # every kill landed while the flow still ran

    async with await deploy(None, GRAPH, name="crash", journal=journal(path)) as flow:
        seen = [kv async for kv in flow.results()]
        assert len(seen) == N
        assert sorted(int(k) for k, _ in seen) == list(range(N))  # every key exactly once
        assert all(v == expected(int(k)) for k, v in seen)
        assert flow.dead_letters() == []
        assert flow.status() == {"done": N}
        tokens = flow.journal.read("SELECT count(*) FROM tokens")[0][0]
        assert tokens == 0


async def test_two_processes_share_one_journal_and_run_each_stage_once(tmp_path, journal_at):
    path = journal_at("shared")
    async with await deploy(None, GRAPH, name="crash", journal=journal(path)) as flow:
        await flow.submit_many(range(300), keys=[str(i) for i in range(300)])
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    start_at = time.time() + 2.0  # both are imported and waiting by then
    procs = [child(path, log, start_at) for log in logs]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    runs: dict[tuple[str, str], int] = {}
    pids_per_stage: dict[str, set[str]] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            name, x, pid = line.split()
            runs[(name, x)] = runs.get((name, x), 0) + 1
            pids_per_stage.setdefault(name, set()).add(pid)
    assert len(runs) == 4 * 300
    assert set(runs.values()) == {1}  # no stage ran twice for an item
    assert len(set().union(*pids_per_stage.values())) == 2  # both processes did work
    async with await deploy(None, GRAPH, name="crash", journal=journal(path)) as flow:
        assert flow.status() == {"done": 300}
        assert await flow.result("7") == expected(7)


async def test_workers_in_other_pid_namespaces_on_one_host_never_take_each_other_for_dead(
    tmp_path, journal_at
):
    """Containers share host names and number their processes alike: a worker must not
    judge another by a pid it cannot see. With no crash, no stage runs twice."""
    if pid_namespaces():
        pytest.skip(pid_namespaces())
    n = 600
    path = journal_at("namespaces")
    async with await deploy(None, GRAPH, name="crash", journal=journal(path)) as flow:
        await flow.submit_many(range(n), keys=[str(i) for i in range(n)])
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    start_at = time.time() + 2.0
    procs = [
        child(path, logs[0], start_at, prefix=UNSHARE),  # pid 1 in its namespace
        child(path, logs[1], start_at, prefix=UNSHARE + BEHIND_INIT),  # pid > 1 in its own
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "drained" in out, out
    runs: dict[tuple[str, str], int] = {}
    pids: set[str] = set()
    for log in logs:
        for line in log.read_text().splitlines():
            name, x, pid = line.split()
            runs[(name, x)] = runs.get((name, x), 0) + 1
            pids.add(pid)
    assert len(runs) == 4 * n
    reran = sorted(k for k, v in runs.items() if v > 1)
    assert not reran, f"{len(reran)} stage runs repeated without a crash, e.g. {reran[:5]}"
    assert pids == {"1", "30001"}  # really two namespaces, both at work
    await check_every_key_once(path, n)


async def check_every_key_once(where: str, n: int) -> None:
    async with await deploy(None, GRAPH, name="crash", journal=journal(where)) as flow:
        seen = [kv async for kv in flow.results()]
        assert len(seen) == n
        assert sorted(int(k) for k, _ in seen) == list(range(n))  # every key exactly once
        assert all(v == expected(int(k)) for k, v in seen)
        assert flow.dead_letters() == []
        assert flow.status() == {"done": n}
        assert flow.journal.read("SELECT count(*) FROM tokens")[0][0] == 0


async def test_postgres_two_workers_one_killed_the_other_finishes_every_key_once(
    postgres_dsn, tmp_path
):
    n = N // 2
    async with await deploy(None, GRAPH, name="crash", journal=journal(postgres_dsn)) as flow:
        await flow.submit_many(range(n), keys=[str(i) for i in range(n)])
    rng = random.Random(os.environ.get("CRASH_SEED", time.time_ns()))
    start_at = time.time() + 1.5  # both are imported and waiting by then
    logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
    victim, survivor = (child(postgres_dsn, log, start_at) for log in logs)
    deadline = time.time() + 30
    while not logs[0].exists() or not logs[0].read_text():  # the victim is at work
        assert time.time() < deadline and victim.poll() is None
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    assert victim.poll() is None  # the kill lands while the flow runs
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out, _ = survivor.communicate(timeout=120)
    assert survivor.returncode == 0 and "drained" in out
    ran = {name: set() for name in ("parse", "square", "negate", "combine")}
    for log in logs:
        for line in log.read_text().splitlines():
            name, x, _ = line.split()
            ran[name].add(x)
    assert logs[1].read_text()  # the survivor worked too
    assert all(len(xs) == n for xs in ran.values())
    await check_every_key_once(postgres_dsn, n)
