"""What flows and workflows say in the log: retries with attempt and delay, dead letters,
resumes with their counts, lease takeovers; never one line per item, and no handler of
the library's own (the application decides where records go)."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from typing import Any

import pytest

from pydotcompute import RingKernelRuntime
from pydotcompute.coordinator import deploy, stage
from pydotcompute.coordinator.log_throttle import LogThrottle
from pydotcompute.coordinator.records import encode
from pydotcompute.workflows import activity, workflow
from tests.test_coordinator_journal import journal_of, run_and_kill, slow, start_holder, tamper

HELD = re.compile(r"and (\d+) more like it|the last of (\d+) like it")


def lines(caplog: pytest.LogCaptureFixture, logger: str, words: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and words in r.getMessage()]


def counted(records: list[logging.LogRecord]) -> int:
    """Events a set of throttled lines stands for: each line, plus what it says it held."""
    total = 0
    for r in records:
        m = HELD.search(r.getMessage())
        if m is None:
            total += 1
        elif m.group(1):
            total += 1 + int(m.group(1))  # this line and the ones held before it
        else:
            total += int(m.group(2))  # a flushed line: the last of those held
    return total


def always_fails(x: int) -> int:
    raise ValueError(f"no {x}")


async def test_retries_and_dead_letters_of_many_items_make_a_few_lines_and_lose_no_count(
    caplog, journal_at
):
    caplog.set_level(logging.DEBUG, logger="pydotcompute")
    failing = stage(always_fails, retries=2, backoff=0.001)
    graph = stage(abs) >> failing
    for journal in (None, journal_of(journal_at())):
        caplog.clear()
        async with await deploy(None, graph, name="noisy", journal=journal) as flow:
            await flow.submit_many(range(300), keys=[str(i) for i in range(300)])
            await flow.drain(timeout=30)
            assert len(flow.dead_letters()) == 300
        retries = lines(caplog, "pydotcompute.coordinator", "retrying in")
        dead = lines(caplog, "pydotcompute.coordinator", "dead letters")
        assert 1 <= len(retries) <= 4 and 1 <= len(dead) <= 4, [
            r.getMessage() for r in caplog.records
        ]
        assert counted(retries) == 300 and counted(dead) == 300  # every one accounted for
        first = retries[0].getMessage()
        assert "stage 'always_fails'" in first and "attempt 1 of 2" in first
        assert re.search(r"retrying in 0\.00\d s", first) and "ValueError: no" in first
        assert retries[0].levelno == logging.WARNING and dead[0].levelno == logging.ERROR
        assert "after 2 attempt(s)" in dead[0].getMessage()


async def test_a_flow_that_works_logs_nothing_per_item(caplog, journal_at):
    caplog.set_level(logging.DEBUG, logger="pydotcompute")
    async with await deploy(None, stage(abs) >> abs, name="quiet", journal=journal_at()) as f:
        await f.submit_many(range(500))
        await f.drain(timeout=30)
    assert len([r for r in caplog.records if r.name.startswith("pydotcompute")]) <= 2


async def test_a_resumed_flow_says_how_many_items_it_found(caplog, journal_at):
    caplog.set_level(logging.INFO, logger="pydotcompute")
    path = journal_at()
    gate = asyncio.Event()

    async def waits(x: int) -> int:
        await gate.wait()
        return x

    flow = await deploy(None, stage(waits), name="r", journal=path)
    await flow.submit_many(range(7), keys=[str(i) for i in range(7)])
    await flow.cancel("stop", timeout=1)
    gate.set()
    caplog.clear()
    async with await deploy(None, stage(waits), name="r", journal=path) as flow:
        await flow.drain(timeout=10)
    [line] = lines(caplog, "pydotcompute.coordinator", "unfinished items found")
    assert "flow 'r'" in line.getMessage() and ": 7 unfinished" in line.getMessage()


async def test_a_dead_owner_on_this_host_is_taken_over_and_said_so(caplog, journal_at):
    caplog.set_level(logging.INFO, logger="pydotcompute")
    path = journal_at()
    run_and_kill(path)  # a process on this host died holding item "five"
    async with await deploy(None, stage(slow), name="g", journal=journal_of(path, poll=0.02)) as f:
        assert await f.result("five", timeout=10) == 10
    [line] = lines(caplog, "pydotcompute.coordinator", "taken over")
    assert (
        "items held by owner" in line.getMessage()
        and "is gone (1 items freed)" in line.getMessage()
    )
    assert line.levelno == logging.WARNING


async def test_a_stalled_owner_on_another_host_is_taken_over_when_its_lease_runs_out(
    caplog, journal_at
):
    caplog.set_level(logging.INFO, logger="pydotcompute")
    path = journal_at()
    holder = start_holder(path, lease=0.5)
    holder.send_signal(signal.SIGSTOP)  # alive but stalled: only its lease can run out
    try:
        tamper(path, "UPDATE owners SET host='elsewhere'")
        journal = journal_of(path, lease=0.5, poll=0.02)
        async with await deploy(None, stage(slow), name="g", journal=journal) as f:
            await f.submit(6, key="six")
            assert await f.result("six", timeout=10) == 12
            for _ in range(100):
                if lines(caplog, "pydotcompute.coordinator", "leases ran out"):
                    break
                await asyncio.sleep(0.05)
    finally:
        holder.kill()
        holder.wait()
    [line] = lines(caplog, "pydotcompute.coordinator", "leases ran out")
    assert "items held by owner" in line.getMessage() and "renewed no lease" in line.getMessage()


async def test_an_owner_that_stalls_then_dies_is_said_taken_over_once(caplog, journal_at):
    """Its lease runs out first (said), then, holding an item again, it dies and its
    liveness lock comes free: that item is freed at once, but the takeover is not said a
    second time."""
    caplog.set_level(logging.INFO, logger="pydotcompute")
    path = journal_at()
    holder = start_holder(path, lease=0.5)
    holder.send_signal(signal.SIGSTOP)
    try:
        journal = journal_of(path, lease=0.5, poll=0.02)
        async with await deploy(None, stage(slow), name="g", journal=journal) as f:
            assert await f.result("five", timeout=10) == 10
            for _ in range(100):
                if lines(caplog, "pydotcompute.coordinator", "leases ran out"):
                    break
                await asyncio.sleep(0.05)
            [(owner,)] = await f.journal.aread(
                "SELECT owner FROM owners WHERE flow='g' AND pid=?", holder.pid
            )
            node = next(n.index for n in f.plan.nodes if n.name == "slow")
            holder.kill()
            holder.wait()
            # The dead owner holds item "six" on a lease that would last an hour.
            tamper(
                path,
                "INSERT INTO items(flow, key, state, submitted) VALUES('g', 'six', 'active', ?)",
                time.time(),
            )
            tamper(
                path,
                "INSERT INTO tokens(flow, key, node, port, value, owner, lease_until) "
                "VALUES('g', 'six', ?, 0, ?, ?, ?)",
                node,
                encode(6),
                owner,
                time.time() + 3600,
            )
            assert await f.result("six", timeout=10) == 12  # freed by its lock, not lease
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    taken = lines(caplog, "pydotcompute.coordinator", "taken over")
    assert len(taken) == 1 and "leases ran out" in taken[0].getMessage(), [
        r.getMessage() for r in taken
    ]


RUNS: dict[str, int] = {}


@activity(retries=3, backoff=0.001)
async def flaky(x: int) -> int:
    RUNS[str(x)] = RUNS.get(str(x), 0) + 1
    if RUNS[str(x)] < 3:
        raise ConnectionError("try again")
    return x


@activity
async def wait_forever(x: int) -> int:
    await asyncio.Event().wait()
    return x


@workflow(name="log-flaky")
async def uses_flaky(x: int, ctx: Any) -> int:
    return await ctx.call(flaky, x)


@workflow(name="log-hangs")
async def hangs(x: int, ctx: Any) -> int:
    return await ctx.call(wait_forever, x)


@workflow(name="log-fails")
async def fails(x: int, ctx: Any) -> int:
    raise KeyError(x)


async def test_workflows_log_retries_failures_and_resumes(caplog, journal_at):
    caplog.set_level(logging.INFO, logger="pydotcompute")
    RUNS.clear()
    path = journal_at()
    async with RingKernelRuntime(journal=path) as rt:
        await rt.start_workflow(uses_flaky, 1, key="f1")
        assert await rt.workflow_result("f1", timeout=10) == 1
        await rt.start_workflow(fails, 2, key="bad")
        with pytest.raises(KeyError):
            await rt.workflow_result("bad", timeout=10)
        for i in range(3):
            await rt.start_workflow(hangs, i, key=f"h{i}")
    # shut down while three workflows run: a new process finds them nobody's
    retries = lines(caplog, "pydotcompute.workflows", "retrying in")
    assert counted(retries) == 2  # two failed attempts of three; the last one held back
    assert "activity" in retries[0].getMessage() and "attempt 1 of 3" in retries[0].getMessage()
    [failed] = lines(caplog, "pydotcompute.workflows", "failed, KeyError")
    assert "workflow 'bad'" in failed.getMessage()
    caplog.clear()
    async with RingKernelRuntime(journal=path) as rt:
        assert sorted(await rt.resume_workflows(hangs)) == ["h0", "h1", "h2"]
        await rt.cancel_workflow("h0")
        await rt.cancel_workflow("h1")
        await rt.cancel_workflow("h2")
    [resumed] = lines(caplog, "pydotcompute.workflows", "resumed 3 running workflows")
    assert "'h0'" in resumed.getMessage()


def test_the_library_installs_no_handler_and_logs_under_one_name():
    import pydotcompute  # noqa: F401
    import pydotcompute.coordinator.flow
    import pydotcompute.coordinator.journal
    import pydotcompute.workflows.engine  # noqa: F401

    names = [n for n in logging.root.manager.loggerDict if n.startswith("pydotcompute")]
    assert {"pydotcompute.coordinator", "pydotcompute.workflows"} <= set(names)
    for name in [*names, "pydotcompute"]:
        logger = logging.getLogger(name)
        assert logger.handlers == [] and logger.propagate, name


def test_throttled_lines_count_what_they_held(caplog):
    caplog.set_level(logging.INFO, logger="t")
    throttle = LogThrottle(logging.getLogger("t"), interval=3600)
    for i in range(5):
        throttle.log(logging.WARNING, "a", "event %d", i)
    throttle.log(logging.WARNING, "b", "other")
    throttle.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "event 0",
        "other",
        "event 4 (the last of 4 like it in the 0 s before)",
    ]
    caplog.clear()
    logging.getLogger("t").setLevel(logging.ERROR)
    try:
        throttle.log(logging.WARNING, "a", "filtered")  # below the level: nothing kept
        throttle.flush()
        assert caplog.records == []
    finally:
        logging.getLogger("t").setLevel(logging.NOTSET)
