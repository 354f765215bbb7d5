"""Bounded journals: finished items and workflows pruned by age or count (by a call, by
``prune_journal`` on a path or DSN, or by a retention rule), nothing unfinished touched;
the SQLite write-ahead log kept under its limit and emptied when a journal opens.

Tests taking ``journal_at`` run on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from pydotcompute import RingKernelRuntime
from pydotcompute.coordinator import (
    FanIn,
    FanOut,
    PostgresJournal,
    Pruned,
    Retention,
    SQLiteJournal,
    deploy,
    prune_journal,
    stage,
)
from pydotcompute.errors import InvalidConfigurationError, JournalError
from pydotcompute.workflows import activity, task, workflow
from tests.test_coordinator_journal import journal_of, tamper
from tests.test_workflow import db

ROOT = Path(__file__).resolve().parent.parent


def rows(where: str, sql: str, *args: Any) -> list[Any]:
    return db(where, sql, *args)


def fails_on_bad(x: int) -> int:
    if x < 0:
        raise ValueError("negative")
    return x * 10


async def finished_flow(where: str, gate: asyncio.Event, **options: Any) -> Any:
    """A flow holding 20 done items (k0..k19, the first 10 an hour old), one dead
    item (bad) and one still running (held) in a stage waiting for ``gate``."""

    async def hold(x: int) -> int:
        if x == 99:
            await gate.wait()
        return x

    flow = await deploy(
        None, stage(hold) >> fails_on_bad, name="f", journal=journal_of(where, **options)
    )
    await flow.submit_many(range(20), keys=[f"k{i}" for i in range(20)])
    await flow.submit(-1, key="bad")
    await flow.submit(99, key="held")
    while flow.status().get("done", 0) < 20 or "dead" not in flow.status():
        await asyncio.sleep(0.02)
    old = [f"k{i}" for i in range(10)]
    for k in old:
        tamper(where, "UPDATE items SET finished=finished-3600 WHERE key=?", k)
    return flow


async def test_flow_prune_by_age_then_count_leaves_unfinished_and_dead_items(journal_at):
    where = journal_at()
    gate = asyncio.Event()
    flow = await finished_flow(where, gate)
    try:
        assert await flow.prune(older_than=1800) == 10
        assert flow.status() == {"done": 10, "dead": 1, "active": 1}
        assert sorted(k for k, _ in rows(where, "SELECT key, value FROM results")) == sorted(
            f"k{i}" for i in range(10, 20)
        )
        with pytest.raises(KeyError):
            await flow.result("k3")
        # Newest 4 finished stay (the dead item counts among them but is kept anyway).
        assert await flow.prune(keep=4) == 7
        assert flow.status() == {"done": 3, "dead": 1, "active": 1}
        assert [r.key for r in flow.dead_letters()] == ["bad"]
        assert await flow.prune(older_than=timedelta(0), dead_letters=True) == 4
        assert flow.status() == {"active": 1}
        assert flow.dead_letters() == []
        # the running item was never touched, and finishes normally
        gate.set()
        assert await flow.result("held", timeout=10) == 990
        # a pruned key is forgotten: submitted again, it runs again
        await flow.submit(3, key="k3")
        assert await flow.result("k3", timeout=10) == 30
    finally:
        await flow.close()


async def test_prune_journal_by_path_or_dsn_prunes_every_flow(journal_at):
    where = journal_at()
    gate = asyncio.Event()
    flow = await finished_flow(where, gate)
    async with await deploy(None, stage(abs), name="other", journal=journal_of(where)) as other:
        await other.submit_many(range(5), keys=[f"o{i}" for i in range(5)])
        await other.drain(timeout=10)
        # while both flows run (their writers hold the journal open)
        got = await asyncio.to_thread(prune_journal, where, older_than=1800)
        assert got == Pruned(items=10, workflows=0)
        got = await asyncio.to_thread(prune_journal, where, keep=2, flow="other")
        assert got.items == 3 and other.status() == {"done": 2}
        assert flow.status() == {"done": 10, "dead": 1, "active": 1}
    gate.set()
    await flow.drain(timeout=10)
    await flow.close()
    got = prune_journal(journal_of(where), older_than=0, dead_letters=True)
    assert got.items == 12 + 2
    assert rows(where, "SELECT count(*) FROM items")[0][0] == 0
    assert rows(where, "SELECT count(*) FROM results")[0][0] == 0
    assert rows(where, "SELECT count(*) FROM dead_letters")[0][0] == 0


async def test_items_cancelled_by_an_operator_are_pruned_as_finished(journal_at):
    from pydotcompute import cancel_items

    where = journal_at()
    gate = asyncio.Event()
    flow = await finished_flow(where, gate)
    try:
        [outcome] = await cancel_items(where, "f", ["bad"])  # a dead item, cancelled
        assert outcome.changed
        assert flow.status() == {"done": 20, "cancelled": 1, "active": 1}
        got = await asyncio.to_thread(prune_journal, where, older_than=0)
        assert got == Pruned(items=21, workflows=0)
        assert flow.status() == {"active": 1}  # "held" still runs, untouched
        gate.set()
        assert await flow.result("held", timeout=10) == 990
    finally:
        gate.set()
        await flow.close()


def test_prune_journal_refuses_what_is_not_a_journal(tmp_path, postgres_dsn):
    with pytest.raises(JournalError, match="no journal at"):
        prune_journal(tmp_path / "none.db", older_than=0)
    assert not (tmp_path / "none.db").exists()
    with pytest.raises(JournalError, match="no journal in"):
        prune_journal(postgres_dsn, older_than=0)
    with pytest.raises(InvalidConfigurationError, match="older_than .* or keep"):
        prune_journal(tmp_path / "none.db")
    with pytest.raises(InvalidConfigurationError, match="keep is a count"):
        Retention(keep=-1)
    with pytest.raises(InvalidConfigurationError, match="older_than"):
        Retention(older_than=float("nan"))
    with pytest.raises(InvalidConfigurationError, match="retention is a Retention"):
        SQLiteJournal(str(tmp_path / "j.db"), retention=3600)  # type: ignore[arg-type]


async def test_retention_rule_prunes_a_running_flow(journal_at):
    where = journal_at()
    rule = Retention(keep=5, every=0.05)
    graph = stage(abs) >> FanOut(abs, abs, mode="broadcast") >> FanIn(sum)
    async with await deploy(None, graph, name="r", journal=journal_of(where, retention=rule)) as f:
        await f.submit_many(range(60), keys=[str(i) for i in range(60)])
        await f.drain(timeout=20)
        deadline = time.monotonic() + 10
        while f.status() != {"done": 5} and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert f.status() == {"done": 5}
        kept = dict([kv async for kv in f.results()])
        assert len(kept) == 5 and all(v == 2 * int(k) for k, v in kept.items())


async def test_in_memory_flow_prunes_what_finished():
    async with await deploy(None, stage(fails_on_bad), name="m") as flow:
        await flow.submit_many([1, 2, 3, -1, 4], keys=["a", "b", "c", "bad", "d"])
        await flow.drain(timeout=5)
        reader = flow.results()
        assert await reader.__anext__() == ("a", 10)
        assert await flow.prune(keep=2) == 3  # a, b and c: "bad" and d are the newest
        assert [kv async for kv in reader] == [("d", 40)]  # the pruned one is skipped
        assert flow.status() == {"dead": 1, "done": 1}
        assert await flow.prune(older_than=0) == 1  # d; a dead item stays unless asked
        assert await flow.prune(older_than=0, dead_letters=True) == 1
        assert flow.status() == {}
        await flow.submit(1, key="a")  # forgotten, so it runs again
        assert await flow.result("a", timeout=5) == 10


# ---- workflows -------------------------------------------------------------------------


@activity
async def plus_one(x: int) -> int:
    return x + 1


@task
def answer(request: int, reply: int) -> int:
    return reply


@workflow(name="leaf")
async def leaf(x: int, ctx: Any) -> int:
    return await ctx.call(answer, x) if x < 0 else await ctx.call(plus_one, x)


@workflow(name="root")
async def root(x: int, ctx: Any) -> int:
    g = await ctx.call(stage(plus_one.fn) >> (lambda v: v * 2), x)
    return await ctx.call(leaf, g)


@activity
async def boom(x: int) -> int:
    await asyncio.sleep(0.2)
    raise ValueError("boom")


@workflow(name="parent-of-waiting")
async def parent_of_waiting(x: int, ctx: Any) -> None:
    # boom fails the parent; its child workflow goes on, waiting for its task
    await ctx.all(ctx.call(leaf, -x), ctx.call(boom, x))


async def test_workflows_are_pruned_whole_and_never_while_something_runs(journal_at):
    where = journal_at()
    async with RingKernelRuntime(journal=where) as rt:
        for i in range(6):
            await rt.start_workflow(root, i, key=f"r{i}")
        await rt.start_workflow(leaf, -1, key="waiting")
        await rt.start_workflow(parent_of_waiting, 5, key="p")
        for i in range(6):
            assert await rt.workflow_result(f"r{i}", timeout=10) == (i + 1) * 2 + 1
        with pytest.raises(ValueError, match="boom"):
            await rt.workflow_result("p", timeout=10)
        tamper(where, "UPDATE workflows SET updated=updated-3600 WHERE key IN ('r0','r1','p')")
        engine = rt.workflows()
        assert await engine.prune(older_than=1800) == 2  # r0, r1; p has a child running
        keys = {s.key for s in rt.list_workflows()}
        assert keys == {"r2", "r3", "r4", "r5", "r2/1", "r3/1", "r4/1", "r5/1", "waiting"} | {
            "p",
            "p/0",
        }
        assert rows(where, "SELECT count(*) FROM workflow_calls WHERE workflow LIKE 'r0%'") == [
            (0,)
        ]
        graph_items = rows(where, "SELECT key FROM items WHERE flow LIKE 'workflow-graph-%'")
        assert sorted(k for (k,) in graph_items) == [f"r{i}/0" for i in range(2, 6)]
        # newest 2 finished top-level workflows stay; running ones never count or go
        got = await asyncio.to_thread(prune_journal, where, keep=2, items=False)
        assert got == Pruned(items=0, workflows=2)
        assert {s.key for s in rt.list_workflows() if s.parent is None} == {
            "r4",
            "r5",
            "waiting",
            "p",
        }
        assert [p.key for p in rt.pending_tasks(answer)] == ["waiting/0", "p/0/0"]


async def test_retention_rule_prunes_a_running_engine(journal_at):
    where = journal_at()
    rule = Retention(keep=3, every=0.05)
    async with RingKernelRuntime(journal=journal_of(where, retention=rule)) as rt:
        for i in range(8):
            await rt.start_workflow(leaf, i, key=f"w{i}")
            await rt.workflow_result(f"w{i}", timeout=10)
        deadline = time.monotonic() + 10
        while len(rt.list_workflows()) > 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert [s.key for s in rt.list_workflows()] == ["w5", "w6", "w7"]


# ---- the write-ahead log --------------------------------------------------------------


async def test_the_wal_stays_under_its_limit_under_steady_load(tmp_path):
    path = tmp_path / "wal.db"
    limit = 2**20  # the smallest allowed: reached within a few hundred items
    seen = 0
    done = False

    async def watch() -> None:
        nonlocal seen
        while not done:  # the writer commits on this loop: every commit is seen
            try:
                seen = max(seen, os.stat(f"{path}-wal").st_size)
            except FileNotFoundError:
                pass
            await asyncio.sleep(0)

    graph = stage(abs) >> FanOut(abs, abs, mode="broadcast") >> FanIn(sum)
    watcher = asyncio.create_task(watch())
    journal = SQLiteJournal(path, wal_limit=limit)
    async with await deploy(None, graph, name="w", journal=journal) as flow:
        for i in range(0, 3000, 100):
            await flow.submit_many(range(i, i + 100), keys=[str(k) for k in range(i, i + 100)])
            await asyncio.sleep(0)
        await flow.drain(timeout=60)
        assert flow.status() == {"done": 3000}
        commits = flow.journal.commits
    done = True
    await watcher
    assert commits > 100  # enough commits that the log would have grown past the limit
    assert 0 < seen <= limit, seen


HOLDER = """
import asyncio, sys
from pydotcompute.coordinator import SQLiteJournal, deploy, stage

async def main():
    flow = await deploy(None, stage(abs) >> abs, name="k", journal=SQLiteJournal(sys.argv[1]))
    for i in range(0, 4000, 200):
        await flow.submit_many(range(i, i + 200), keys=[str(k) for k in range(i, i + 200)])
        await asyncio.sleep(0.01)
    await flow.drain()
    print("drained", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_wal_left_by_a_killed_process_is_emptied_when_the_journal_opens(tmp_path):
    path = tmp_path / "killed.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "drained"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wal = Path(f"{path}-wal")
    left = wal.stat().st_size
    assert left > 500_000  # what the dead process left behind
    async with await deploy(None, stage(abs) >> abs, name="k", journal=path) as flow:
        assert wal.stat().st_size < 64 * 1024  # emptied; then the opening wrote a few pages
        assert flow.status() == {"done": 4000}


def test_a_wal_limit_below_one_mebibyte_is_refused(tmp_path):
    with pytest.raises(JournalError, match="wal_limit"):
        SQLiteJournal(str(tmp_path / "j.db"), wal_limit=1000)


def test_retention_is_part_of_the_journal_config(postgres_dsn):
    rule = Retention(older_than=60)
    assert "retention=Retention(older_than=60.0" in repr(
        PostgresJournal(postgres_dsn, retention=rule)
    )
    assert Retention(older_than=timedelta(minutes=1)).older_than == 60.0  # type: ignore[arg-type]
