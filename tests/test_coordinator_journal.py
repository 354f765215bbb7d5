"""Durable flows on a journal: hops, leases, resume, fingerprints, bad files.

Tests taking ``journal_at`` run on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pydotcompute.coordinator import FanIn, FanOut, PostgresJournal, SQLiteJournal, deploy, stage
from pydotcompute.errors import ItemFailedError, JournalError, MessageSerializationError

ROOT = Path(__file__).resolve().parent.parent


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def journal_of(where: str, **options) -> SQLiteJournal | PostgresJournal:
    if where.startswith("postgresql://"):
        return PostgresJournal(where, **options)
    return SQLiteJournal(where, **options)


def tamper(where: str, sql: str, *args) -> None:
    """Change the journal behind the flows' backs (another writer, a dead process)."""
    if where.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(where, autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), args)
    else:
        conn = sqlite3.connect(where)
        conn.execute(sql, args)
        conn.commit()
        conn.close()


async def test_durable_pipeline_keeps_results_and_dedups_keys_across_restarts(journal_at):
    path = journal_at()
    runs = collections.Counter()

    def inc(x):
        runs[x] += 1
        return x + 1

    graph = stage(inc) >> (lambda x: x * 10)
    async with await deploy(None, graph, name="etl", journal=str(path)) as flow:
        keys = await flow.submit_many(range(50), keys=[f"k{i}" for i in range(50)])
        await flow.drain(timeout=20)
        assert await flow.result("k3") == 40
    if not path.startswith("postgresql://"):
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    async with await deploy(None, graph, name="etl", journal=path) as flow:
        assert await flow.submit(3, key="k3") == "k3"  # known key: not run again
        await flow.drain(timeout=5)
        assert flow.status() == {"done": 50}
        assert dict([kv async for kv in flow.results()]) == {
            k: (i + 1) * 10 for i, k in enumerate(keys)
        }
    assert set(runs.values()) == {1}


async def test_runtime_default_journal_and_explicit_none(journal_at):
    from pydotcompute import RingKernelRuntime

    path = journal_at("rt")
    async with RingKernelRuntime(journal=str(path)) as rt:
        flow = await rt.deploy(stage(lambda x: x + 1), name="a")
        assert flow.journal is not None
        await flow.submit(1, key="one")
        assert await flow.result("one", timeout=5) == 2
        mem = await rt.deploy(stage(lambda x: x), name="b", journal=None)
        assert mem.journal is None
    # shutdown closed both flows: no task left running
    assert all(t.done() for t in flow._tasks + mem._tasks)


async def test_durable_retries_dead_letters_and_replay(journal_at):
    path = journal_at()
    runs = collections.Counter()
    broken = {"on": True}

    @stage(retries=3, backoff=0.01)
    async def flaky(x):
        runs[x] += 1
        if broken["on"]:
            raise RuntimeError(f"down for {x}")
        return x * 2

    async with await deploy(None, flaky, name="f", journal=path) as flow:
        await flow.submit(21, key="a")
        await flow.drain(timeout=10)
        assert runs[21] == 3
        [rec] = flow.dead_letters()
        assert (rec.key, rec.stage, rec.attempts, rec.value) == ("a", "flaky", 3, 21)
        assert "RuntimeError: down for 21" in rec.error and "Traceback" in rec.traceback
        c = flow.counters()
        assert (c["retried"], c["dead_lettered"]) == (2, 1)
    async with await deploy(None, flaky, name="f", journal=path) as flow:
        with pytest.raises(ItemFailedError) as err:
            await flow.result("a")  # the dead letter survived the restart
        assert err.value.record.key == "a"
        broken["on"] = False
        assert await flow.retry("a")
        assert await flow.result("a", timeout=10) == 42
        assert flow.dead_letters() == []


async def test_durable_join_by_key_when_one_branch_fails_one_item(journal_at):
    def a(x):
        return ("a", x)

    async def b(x):
        if x == 1:
            raise RuntimeError("b fails item 1")
        await asyncio.sleep(0.01 if x == 2 else 0)
        return ("b", x)

    graph = FanOut(a, b, mode="broadcast") >> FanIn(lambda parts: parts)
    async with await deploy(None, graph, name="j", journal=journal_at()) as flow:
        await flow.submit_many([1, 2, 3], keys=["1", "2", "3"])
        await flow.drain(timeout=10)
        assert await flow.result("2") == [("a", 2), ("b", 2)]
        assert await flow.result("3") == [("a", 3), ("b", 3)]
        assert [r.key for r in flow.dead_letters()] == ["1"]


async def test_different_graph_on_existing_journal_names_the_change(journal_at):
    path = journal_at()

    def parse(x):
        return x

    def enrich(x):
        return x

    def score(x):
        return x

    async with await deploy(None, stage(parse) >> enrich, name="etl", journal=path):
        pass
    sqlite = not path.startswith("postgresql://")
    before = digest(Path(path)) if sqlite else None
    with pytest.raises(JournalError, match=r"added: \['score'\].*removed: \['enrich'\]"):
        await deploy(None, stage(parse) >> score, name="etl", journal=path)
    if sqlite:
        assert digest(Path(path)) == before
    # another flow name on the same journal is fine
    async with await deploy(None, stage(parse) >> score, name="other", journal=path):
        pass


async def test_corrupt_and_truncated_journals_are_refused_and_left_untouched(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    before = digest(garbage)
    with pytest.raises(JournalError, match="not a journal"):
        await deploy(None, stage(lambda x: x), name="t", journal=garbage)
    assert digest(garbage) == before

    good = tmp_path / "good.db"
    async with await deploy(None, stage(lambda x: x), name="t", journal=good) as flow:
        await flow.submit_many(range(3000))
        await flow.drain(timeout=20)
    for wal in (Path(str(good) + "-wal"), Path(str(good) + "-shm")):
        assert not wal.exists() or wal.stat().st_size >= 0
    data = good.read_bytes()
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(data[: len(data) // 2])
    before = digest(truncated)
    with pytest.raises(JournalError, match="truncated"):
        await deploy(None, stage(lambda x: x), name="t", journal=truncated)
    assert digest(truncated) == before

    damaged = tmp_path / "damaged.db"
    middle = len(data) // 2
    damaged.write_bytes(data[:middle] + os.urandom(4096) + data[middle + 4096 :])
    before = digest(damaged)
    with pytest.raises(JournalError, match="corrupt"):
        await deploy(None, stage(lambda x: x), name="t", journal=damaged)
    assert digest(damaged) == before

    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(JournalError, match="truncated"):
        await deploy(None, stage(lambda x: x), name="t", journal=empty)
    assert empty.read_bytes() == b""

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    conn.close()
    with pytest.raises(JournalError, match="not a journal"):
        await deploy(None, stage(lambda x: x), name="t", journal=other)


async def test_claims_are_compare_and_swap_and_a_lost_lease_writes_nothing(journal_at):
    path = journal_at()
    hold = asyncio.Event()

    async def blocker(x):
        await hold.wait()
        return x

    graph = stage(blocker) >> (lambda x: x)
    a = await deploy(None, graph, name="g", journal=journal_of(path, lease=30))
    b = await deploy(None, graph, name="g", journal=journal_of(path, lease=30))
    try:
        await a.submit_many(range(40))
        await asyncio.sleep(0.3)  # both claimers ran
        owners = a.journal.read("SELECT owner, count(*) FROM tokens WHERE port=0 GROUP BY owner")
        assert sum(n for _, n in owners) == 40
        assert all(o in (a.owner, b.owner) for o, _ in owners)  # every token leased once
        # Steal one token as if its lease had expired and another owner claimed it.
        owner, key = a.journal.read("SELECT owner, key FROM tokens WHERE port=0 LIMIT 1")[0]
        victim, other = (a, b) if owner == a.owner else (b, a)
        tamper(path, "UPDATE tokens SET owner='thief' WHERE key=?", key)
        hold.set()
        await asyncio.sleep(0.5)
        # its hop, and the next one it had started before the commit, wrote nothing
        assert victim.counters()["lost_leases"] >= 1 and other.counters()["lost_leases"] == 0
        # The stolen item was not finished by its old owner: its token waits for the thief.
        assert a.journal.read("SELECT owner FROM tokens WHERE key=?", key) == [("thief",)]
        assert a.journal.read("SELECT count(*) FROM results WHERE key=?", key)[0][0] == 0
        assert a.status() == {"done": 39, "active": 1}
    finally:
        await a.close()
        await b.close()


async def test_heartbeat_keeps_long_work_from_being_stolen(journal_at):
    path = journal_at()
    runs = collections.Counter()

    async def slow(x):
        runs[x] += 1
        await asyncio.sleep(1.0)  # far longer than the lease
        return x

    journal = journal_of(path, lease=0.3, poll=0.02)
    a = await deploy(None, stage(slow), name="g", journal=journal)
    await a.submit(1, key="one")
    await asyncio.sleep(0.2)
    b = await deploy(None, stage(slow), name="g", journal=journal)
    try:
        assert await a.result("one", timeout=10) == 1
        await asyncio.sleep(0.2)
        assert runs[1] == 1
    finally:
        await a.close()
        await b.close()


SLOW_CHILD = """
import asyncio, sys
from pydotcompute.coordinator import PostgresJournal, SQLiteJournal, deploy, stage

async def slow(x):
    print("started", flush=True)
    await asyncio.sleep(60)
    return x

async def main():
    lease = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
    kind = PostgresJournal if sys.argv[1].startswith("postgresql://") else SQLiteJournal
    flow = await deploy(None, stage(slow), name="g", journal=kind(sys.argv[1], lease=lease))
    await flow.submit(5, key="five")
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def slow(x):
    return x * 2  # same stage name as the child's, so the graphs match


def start_holder(path: str, lease: float = 0.5) -> subprocess.Popen[str]:
    """A child process that submits item "five" and holds it in a stage forever."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHILD, str(path), str(lease)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "started"
    return proc


def run_and_kill(path: str) -> None:
    proc = start_holder(path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


async def test_dead_owner_item_is_taken_over_after_its_lease_expires(journal_at):
    path = journal_at()
    run_and_kill(path)
    # Leave nothing to tell that the owner died (no owners row to judge its lock by):
    # only lease expiry can free its item.
    tamper(path, "DELETE FROM owners")
    t0 = time.monotonic()
    async with await deploy(
        None, stage(slow), name="g", journal=journal_of(path, lease=0.5, poll=0.02)
    ) as flow:
        assert await flow.result("five", timeout=10) == 10
    assert time.monotonic() - t0 < 5


async def test_dead_owner_on_this_host_is_freed_at_once(journal_at):
    path = journal_at()
    run_and_kill(path)
    tamper(path, "UPDATE tokens SET lease_until=lease_until+3600")  # a lease that never ends
    async with await deploy(
        None, stage(slow), name="g", journal=journal_of(path, poll=0.02)
    ) as flow:
        assert await flow.result("five", timeout=10) == 10


async def test_finished_stage_is_not_rerun_after_restart(journal_at):
    path = journal_at()
    first_runs = collections.Counter()
    gate = asyncio.Event()

    def first(x):
        first_runs[x] += 1
        return x + 1

    async def second(x):
        await gate.wait()
        return x * 2

    graph = stage(first) >> second
    flow = await deploy(None, graph, name="g", journal=path)
    await flow.submit_many(range(10), keys=[str(i) for i in range(10)])
    await asyncio.sleep(0.3)
    await flow.cancel("stop", timeout=1)  # items left in stage two, resumable
    assert sum(first_runs.values()) == 10
    gate.set()
    async with await deploy(None, graph, name="g", journal=path) as flow:
        await flow.drain(timeout=10)
        assert [await flow.result(str(i)) for i in range(10)] == [(i + 1) * 2 for i in range(10)]
    assert set(first_runs.values()) == {1}


async def test_tiny_buffers_do_not_stall_a_durable_flow(journal_at):
    # Room the claimer reserves and then gives back must wake a worker waiting to put.
    graph = (
        stage(lambda x: x + 1, buffer=1)
        >> stage(lambda x: x, buffer=1)
        >> stage(lambda x: x, buffer=2)
    )
    async with await deploy(None, graph, name="tiny", journal=journal_at()) as flow:
        await flow.submit_many(range(300))
        await flow.drain(timeout=30)
        assert flow.status() == {"done": 300}


async def test_an_output_the_journal_cannot_store_fails_only_that_item(journal_at):
    def make(x):
        return (lambda: x) if x == 2 else x  # a lambda cannot be pickled

    async with await deploy(
        None, stage(make) >> (lambda v: v), name="p", journal=journal_at()
    ) as flow:
        await flow.submit_many([1, 2, 3], keys=["1", "2", "3"])
        await flow.drain(timeout=10)
        assert [r.key for r in flow.dead_letters()] == ["2"]
        assert await flow.result("3") == 3
        with pytest.raises(MessageSerializationError):
            await flow.submit(lambda: 0, key="bad")


async def test_durable_flow_takes_from_the_journal_only_what_its_buffers_hold(journal_at):
    release = asyncio.Event()

    async def blocked(x):
        await release.wait()
        return x

    graph = stage(blocked, buffer=4) >> stage(lambda x: x, buffer=2)
    async with await deploy(None, graph, name="b", journal=journal_at()) as flow:
        await flow.submit_many(range(200))
        await asyncio.sleep(0.3)
        held = flow.journal.read("SELECT count(*) FROM tokens WHERE owner=?", flow.owner)[0][0]
        # buffers (4 + 2) plus what the workers hold (one take each: 4 and 2)
        assert 0 < held <= 4 + 2 + 4 + 2
        assert flow.counters()["in_flight"] <= 12
        release.set()
        await flow.drain(timeout=20)
        assert flow.status() == {"done": 200}


async def test_an_interrupted_schema_creation_leaves_a_journal_that_opens(tmp_path, monkeypatch):
    from pydotcompute.coordinator import journal_sqlite

    path = tmp_path / "j.db"
    broken = journal_sqlite.SCHEMA.replace(
        "CREATE TABLE IF NOT EXISTS results(", "CREATE TABLE (", 1
    )
    monkeypatch.setattr(journal_sqlite, "SCHEMA", broken)
    with pytest.raises(JournalError):  # as if the process died half-way through
        await deploy(None, stage(lambda x: x), name="t", journal=path)
    monkeypatch.undo()
    async with await deploy(None, stage(lambda x: x + 1), name="t", journal=path) as flow:
        await flow.submit(1, key="a")
        assert await flow.result("a", timeout=5) == 2


async def test_a_process_dying_while_creating_a_journal_leaves_no_half_made_file(
    tmp_path, monkeypatch
):
    from pydotcompute.coordinator import journal_sqlite

    real_connect = journal_sqlite.connect

    def dies_after_creating_the_file(path):
        sqlite3.connect(path).close()  # SQLite has created the (empty) file...
        raise JournalError("process killed")  # ...and then the process dies

    path = tmp_path / "j.db"
    monkeypatch.setattr(journal_sqlite, "connect", dies_after_creating_the_file)
    with pytest.raises(JournalError, match="killed"):
        await deploy(None, stage(lambda x: x), name="t", journal=path)
    monkeypatch.setattr(journal_sqlite, "connect", real_connect)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    async with await deploy(None, stage(lambda x: x + 1), name="t", journal=path) as flow:
        await flow.submit(1, key="a")
        assert await flow.result("a", timeout=5) == 2


async def test_a_running_flow_frees_the_items_of_a_process_that_dies_beside_it(journal_at):
    path = journal_at()
    holder = start_holder(path, lease=3600)  # its lease alone would never run out here
    journal = journal_of(path, lease=0.6, poll=0.02)  # heartbeat every 0.2 s
    async with await deploy(None, stage(slow), name="g", journal=journal) as flow:
        await asyncio.sleep(0.3)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert await flow.result("five", timeout=10) == 10


async def test_a_read_the_database_refuses_is_a_journal_error(journal_at):
    where = journal_at()
    async with await deploy(None, stage(lambda x: x), name="reads", journal=where) as flow:
        assert flow.dead_letters() == []
        tamper(where, "ALTER TABLE dead_letters RENAME TO dead_letters_away")
        try:
            with pytest.raises(JournalError, match="read failed") as err:
                flow.dead_letters()
            assert err.value.__cause__ is not None  # the driver's own error, kept
        finally:
            tamper(where, "ALTER TABLE dead_letters_away RENAME TO dead_letters")
        assert flow.dead_letters() == []
