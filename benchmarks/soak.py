"""Soak: a durable flow and durable workflows on SQLite, their worker killed over and over.

Phase one pushes ``--items`` items through a 3-stage fan-out/fan-in flow (parse, then
square and negate side by side, then a join); phase two runs ``--workflows`` workflows
of three activity calls each. A worker process does the work (it submits or starts what
is missing, at most ``--backlog`` unfinished at a time, and resumes what its predecessor
left); this process SIGKILLs it every ``--kill-every`` seconds (a random time in the
range) and starts a new one, until a worker finishes. Meanwhile it samples the worker's
resident memory, the write-ahead log's size and the progress.

At the end it checks, through the public API: every key exactly once with the right
value, no dead letters (no failed workflow), the WAL never above its limit, and peak RSS
flat once warmed up (the peak of every later tenth of the run within 20 % of the peak
of the tenth starting at the 10 % point). It prints throughput (including the time lost
to kills and restarts) and exits 1 if a check failed.

    python benchmarks/soak.py [--items 1000000] [--workflows 100000] [--kill-every 2:5]
                              [--wal-limit BYTES] [--dir DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydotcompute.coordinator import FanIn, FanOut, SQLiteJournal, deploy, stage  # noqa: E402
from pydotcompute.workflows import WorkflowEngine, activity, workflow  # noqa: E402

# ---- what the worker runs -----------------------------------------------------------


def parse(x: int) -> int:
    return x


def square(x: int) -> int:
    return x * x


def negate(x: int) -> int:
    return -x


def combine(parts: list[int]) -> int:
    return parts[0] + parts[1]


GRAPH = stage(parse) >> FanOut(square, negate, mode="broadcast") >> FanIn(combine)


def item_value(i: int) -> int:
    return i * i - i


@activity
def double(x: int) -> int:
    return 2 * x


@activity
async def inc(x: int) -> int:
    return x + 1


@workflow(name="soak")
async def soak_wf(x: int, ctx: Any) -> int:
    a = await ctx.call(double, x)
    b, c = await ctx.all(ctx.call(inc, a), ctx.call(inc, x))
    return int(b + c)


def workflow_value(i: int) -> int:
    return 3 * i + 2


def journal(path: str, wal_limit: int) -> SQLiteJournal:
    return SQLiteJournal(path, lease=5.0, poll=0.02, wal_limit=wal_limit)


def count(path: str, sql: str) -> int:
    """A count read straight from the journal file (the worker's own progress)."""
    conn = sqlite3.connect(path, timeout=60.0)
    try:
        return int(conn.execute(sql).fetchone()[0] or 0)
    finally:
        conn.close()


async def items_worker(path: str, n: int, backlog: int, wal_limit: int) -> None:
    flow = await deploy(None, GRAPH, name="soak", journal=journal(path, wal_limit))
    async with flow:
        status = flow.status()
        submitted = sum(status.values())  # keys go in in order, one batch per commit
        done_before = status.get("done", 0)
        while submitted < n:
            unfinished = submitted - done_before - flow.counters()["completed"]
            if unfinished >= backlog:
                await asyncio.sleep(0.005)
                continue
            top = min(n, submitted + 1000)
            await flow.submit_many(
                range(submitted, top), keys=[str(i) for i in range(submitted, top)]
            )
            submitted = top
        await flow.drain()
    print("drained", flush=True)


async def workflows_worker(path: str, n: int, backlog: int, wal_limit: int) -> None:
    async with WorkflowEngine(None, journal(path, wal_limit)) as engine:
        await engine.resume(soak_wf)  # what the killed worker was running
        started = count(path, "SELECT count(*) FROM workflows")
        while started < n:
            running = count(path, "SELECT count(*) FROM workflows WHERE state='running'")
            room = min(backlog - running, n - started, 500)
            if room <= 0:
                await asyncio.sleep(0.005)
                continue
            await asyncio.gather(
                *(engine.start(soak_wf, i, key=f"w{i}") for i in range(started, started + room))
            )
            started += room
        while count(path, "SELECT count(*) FROM workflows WHERE state='running'"):
            await asyncio.sleep(0.02)
    print("drained", flush=True)


# ---- the parent: kill, restart, sample, check -------------------------------------------


@dataclass
class Phase:
    name: str
    n: int
    progress_sql: str
    samples: list[tuple[float, int]] = field(default_factory=list)  # (progress, rss kB)
    wal_max: int = 0
    kills: int = 0
    starts: int = 0
    seconds: float = 0.0
    checks: list[tuple[str, bool, str]] = field(default_factory=list)


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def wal_size(path: str) -> int:
    try:
        return os.stat(path + "-wal").st_size
    except OSError:
        return 0


def run_phase(phase: Phase, path: str, args: argparse.Namespace, rng: random.Random) -> None:
    lo, hi = args.kill_lo, args.kill_hi
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        phase.name,
        "--journal",
        path,
        "--n",
        str(phase.n),
        "--backlog",
        str(args.backlog),
        "--wal-limit",
        str(args.wal_limit),
    ]
    t0 = time.monotonic()
    last_report = t0
    while True:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        phase.starts += 1
        kill_at = time.monotonic() + rng.uniform(lo, hi)
        killed = False
        while proc.poll() is None:
            now = time.monotonic()
            if args.max_kills is not None and phase.kills >= args.max_kills:
                kill_at = float("inf")
            if now >= kill_at:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            phase.wal_max = max(phase.wal_max, wal_size(path))
            rss = rss_kb(proc.pid)
            if rss and os.path.exists(path):
                try:
                    done = count(path, phase.progress_sql)
                except sqlite3.Error:
                    done = -1
                if done >= 0:
                    phase.samples.append((done / phase.n, rss))
            if now - last_report >= 10:
                last_report = now
                done = phase.samples[-1][0] if phase.samples else 0.0
                rate = done * phase.n / (now - t0)
                print(
                    f"  {phase.name}: {done:6.1%} after {now - t0:5.0f} s, {rate:8,.0f}/s, "
                    f"{phase.kills} kills, WAL max {phase.wal_max / 2**20:.1f} MiB",
                    flush=True,
                )
            time.sleep(0.05)
        out, _ = proc.communicate()
        phase.wal_max = max(phase.wal_max, wal_size(path))
        if killed:
            phase.kills += 1
            continue
        if proc.returncode != 0 or "drained" not in out:
            raise SystemExit(f"error: {phase.name} worker failed (exit {proc.returncode})")
        break
    phase.seconds = time.monotonic() - t0


def rss_check(phase: Phase) -> tuple[bool, str]:
    """Peak RSS of each tenth of the run from the 10 % point on, against the first."""
    tenths: dict[int, int] = {}
    for progress, rss in phase.samples:
        if progress >= 0.1:
            t = min(9, int(progress * 10))
            tenths[t] = max(tenths.get(t, 0), rss)
    if not tenths:
        return False, "no samples after the 10 % point"
    ref = tenths[min(tenths)]
    peaks = [tenths[t] for t in sorted(tenths)]
    worst = max(peaks) / ref
    text = (
        "peak RSS per tenth (MiB): "
        + " ".join(f"{p / 1024:.0f}" for p in peaks)
        + f"; max / first = {worst:.2f} (goal <= 1.20)"
    )
    return worst <= 1.2, text


async def verify_items(path: str, n: int, phase: Phase, wal_limit: int) -> None:
    async with await deploy(None, GRAPH, name="soak", journal=journal(path, wal_limit)) as flow:
        seen: set[int] = set()
        twice = wrong = 0
        async for key, value in flow.results():
            i = int(key)
            twice += i in seen
            seen.add(i)
            wrong += value != item_value(i)
        missing = n - len(seen & set(range(n)))
        dead = flow.dead_letters()
        status = flow.status()
    phase.checks += [
        (
            "every key exactly once, right value",
            not missing and not twice and not wrong and len(seen) == n,
            f"{len(seen):,} keys, {missing} missing, {twice} twice, {wrong} wrong",
        ),
        ("no dead letters", not dead, f"{len(dead)} dead letters; status {status}"),
    ]


async def verify_workflows(path: str, n: int, phase: Phase, wal_limit: int) -> None:
    async with WorkflowEngine(None, journal(path, wal_limit)) as engine:
        statuses = engine.list()
        wrong = 0
        for i in range(n):
            if await engine.result(f"w{i}") != workflow_value(i):
                wrong += 1
        states: dict[str, int] = {}
        for s in statuses:
            states[s.state] = states.get(s.state, 0) + 1
    calls = count(path, "SELECT count(*) FROM workflow_calls")
    phase.checks += [
        (
            "every workflow once, right result",
            len(statuses) == n and not wrong and calls == 3 * n,
            f"{len(statuses):,} workflows, {wrong} wrong, {calls:,} calls recorded (want {3 * n:,})",
        ),
        ("no failed workflow", states == {"done": n}, f"states {states}"),
    ]


def report(phase: Phase, wal_limit: int) -> bool:
    ok_rss, rss_text = rss_check(phase)
    phase.checks += [
        ("peak RSS flat after warm-up", ok_rss, rss_text),
        (
            "WAL under its limit",
            phase.wal_max <= wal_limit,
            f"max {phase.wal_max / 2**20:.1f} MiB, limit {wal_limit / 2**20:.0f} MiB",
        ),
    ]
    rate = phase.n / phase.seconds
    print(
        f"{phase.name}: {phase.n:,} in {phase.seconds:.1f} s = {rate:,.0f}/s "
        f"(kills and restarts included), {phase.kills} kills, {phase.starts} worker starts"
    )
    good = True
    for what, ok, text in phase.checks:
        print(f"  {'OK  ' if ok else 'FAIL'} {what}: {text}")
        good &= ok
    return good


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--workflows", type=int, default=100_000)
    ap.add_argument("--kill-every", default="2:5", help="seconds between kills, LOW:HIGH")
    ap.add_argument("--max-kills", type=int, default=None, help="stop killing after this many")
    ap.add_argument("--backlog", type=int, default=5000, help="most unfinished at a time")
    ap.add_argument("--wal-limit", type=int, default=64 * 2**20)
    ap.add_argument("--dir", default=None, help="where the journals go (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--worker", choices=("items", "workflows"), help=argparse.SUPPRESS)
    ap.add_argument("--journal", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run = items_worker if args.worker == "items" else workflows_worker
        asyncio.run(run(args.journal, args.n, args.backlog, args.wal_limit))
        return
    try:
        lo, hi = (float(x) for x in args.kill_every.split(":"))
    except ValueError:
        ap.error("--kill-every is LOW:HIGH in seconds, e.g. 2:5")
    if not 0 < lo <= hi or args.items < 10 or args.workflows < 10 or args.backlog < 1:
        ap.error("need 0 < LOW <= HIGH, --items and --workflows >= 10, --backlog >= 1")
    args.kill_lo, args.kill_hi = lo, hi
    seed = args.seed if args.seed is not None else time.time_ns() % 2**32
    rng = random.Random(seed)
    kills = "no kills" if args.max_kills == 0 else f"a kill every {lo}-{hi} s"
    if args.max_kills:
        kills += f" (at most {args.max_kills})"
    print(
        f"soak: {args.items:,} items, {args.workflows:,} workflows, {kills}, "
        f"WAL limit {args.wal_limit / 2**20:.0f} MiB, seed {seed}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        good = True
        items = Phase("items", args.items, "SELECT max(seq) FROM results")
        path = os.path.join(tmp, "items.db")
        run_phase(items, path, args, rng)
        asyncio.run(verify_items(path, args.items, items, args.wal_limit))
        good &= report(items, args.wal_limit)
        flows = Phase(
            "workflows",
            args.workflows,
            "SELECT count(*) FROM workflows INDEXED BY workflows_state WHERE state='done'",
        )
        path = os.path.join(tmp, "workflows.db")
        run_phase(flows, path, args, rng)
        asyncio.run(verify_workflows(path, args.workflows, flows, args.wal_limit))
        good &= report(flows, args.wal_limit)
    print("soak: all checks OK" if good else "soak: FAILED")
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
