"""Durable workflows: activities, replay, non-determinism, sleep, tasks, admin."""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import time
from typing import Any

import pytest

from pydotcompute import RingKernelRuntime
from pydotcompute.coordinator import RetryPolicy, stage
from pydotcompute.errors import (
    InvalidConfigurationError,
    NonDeterminismError,
    WorkflowFailedError,
    WorkflowNotFoundError,
)
from pydotcompute.messages import message
from pydotcompute.workflows import (
    Activity,
    PendingTask,
    Workflow,
    WorkflowEngine,
    WorkflowStatus,
    activity,
    task,
    workflow,
)

RUNS: collections.Counter[str] = collections.Counter()
GATES: dict[str, asyncio.Event] = {}


@pytest.fixture(autouse=True)
def fresh() -> None:
    RUNS.clear()
    GATES.clear()


@activity
async def inc(x: int) -> int:
    RUNS[f"inc {x}"] += 1
    return x + 1


@activity
async def gate(name: str) -> str:
    """Waits until the test opens the gate ``name``."""
    RUNS[f"gate {name}"] += 1
    await GATES.setdefault(name, asyncio.Event()).wait()
    return name


@workflow(name="chain")
async def chain(x: int, ctx: Any) -> int:
    x = await ctx.call(inc, x)
    x = await ctx.call(inc, x)
    await ctx.call(gate, "chain")
    return await ctx.call(inc, x)


def db(path: str, sql: str, *args: Any) -> list[Any]:
    if path.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(path) as pg:
            return [tuple(r) for r in pg.execute(sql.replace("%", "%%").replace("?", "%s"), args)]
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def test_result_and_status(journal_at: Any) -> None:
    GATES["chain"] = asyncio.Event()
    GATES["chain"].set()
    async with RingKernelRuntime(journal=journal_at("app")) as rt:
        key = await rt.start_workflow(chain, 1, key="c1")
        assert key == "c1"
        assert await rt.workflow_result("c1", timeout=5) == 4
        st = rt.workflow_status("c1")
        assert isinstance(st, WorkflowStatus)
        assert (st.state, st.calls, st.step, st.parent) == ("done", 4, inc.name, None)
    # plain SQL sees the same
    assert db(journal_at("app"), "SELECT pos, kind, state FROM workflow_calls ORDER BY pos") == [
        (0, "activity", "done"),
        (1, "activity", "done"),
        (2, "activity", "done"),
        (3, "activity", "done"),
    ]


async def test_replay_returns_committed_results_without_running_them(journal_at: Any) -> None:
    path = journal_at("app")
    async with RingKernelRuntime(journal=path) as rt:
        await rt.start_workflow(chain, 1, key="c")
        await until(lambda: RUNS["gate chain"] == 1)
        assert rt.workflow_status("c").calls == 2
    # the process stopped mid-workflow; a new one resumes it by replay
    GATES["chain"] = asyncio.Event()
    GATES["chain"].set()
    async with RingKernelRuntime(journal=path) as rt:
        assert await rt.start_workflow(chain, 1, key="c") == "c"
        assert await rt.workflow_result("c", timeout=5) == 4
    assert RUNS == {"inc 1": 1, "inc 2": 1, "gate chain": 2, "inc 3": 1}


async def test_start_is_idempotent_per_key(journal_at: Any) -> None:
    GATES["chain"] = asyncio.Event()
    GATES["chain"].set()
    async with RingKernelRuntime(journal=journal_at("app")) as rt:
        assert await rt.start_workflow(chain, 1, key="k") == "k"
        assert await rt.workflow_result("k") == 4
        assert await rt.start_workflow(chain, 100, key="k") == "k"  # known: not run again
        assert await rt.workflow_result("k") == 4
        assert RUNS["inc 1"] == 1
        with pytest.raises(InvalidConfigurationError, match="already used"):
            await rt.start_workflow(other, 1, key="k")
        generated = await rt.start_workflow(chain, 5)
        assert generated != "k" and await rt.workflow_result(generated) == 8


@workflow(name="other")
async def other(x: int, ctx: Any) -> int:
    return x


@workflow(name="changing")
async def changing_v1(x: int, ctx: Any) -> int:
    await ctx.call(inc, x)
    await ctx.call(gate, "v1")
    return 0


@workflow(name="changing")
async def changing_v2(x: int, ctx: Any) -> int:
    await ctx.call(inc, x + 1)  # a different argument at call #0
    return 1


async def test_changed_replay_raises_non_determinism_naming_both(journal_at: Any) -> None:
    path = journal_at("app")
    async with RingKernelRuntime(journal=path) as rt:
        await rt.start_workflow(changing_v1, 1, key="n")
        await until(lambda: RUNS["gate v1"] == 1)
    async with RingKernelRuntime(journal=path) as rt:
        await rt.start_workflow(changing_v2, 1, key="n")
        with pytest.raises(NonDeterminismError) as err:
            await rt.workflow_result("n", timeout=5)
        assert "inc(2)" in str(err.value) and "inc(1)" in str(err.value)
        assert rt.workflow_status("n").state == "failed"
    assert RUNS["inc 2"] == 0  # the changed call never ran


@workflow(name="shorter")
async def shorter(x: int, ctx: Any) -> int:
    return x


async def test_replay_that_skips_recorded_calls_is_non_deterministic(journal_at: Any) -> None:
    path = journal_at("app")
    async with RingKernelRuntime(journal=path) as rt:
        await rt.start_workflow(changing_v1, 1, key="s")
        await until(lambda: RUNS["gate v1"] == 1)
    async with RingKernelRuntime(journal=path) as rt:
        with pytest.raises(NonDeterminismError, match="without making call #0"):
            await rt.workflows().result(await rt.start_workflow(_rename(shorter), 1, key="s"))


def _rename(wf: Workflow) -> Workflow:
    return Workflow(wf.fn, name="changing")


@activity(retries=3, backoff=0.001)
def flaky(x: int) -> int:
    RUNS["flaky"] += 1
    if RUNS["flaky"] < 3:
        raise OSError("not yet")
    return x * 10


@activity(timeout=0.05)
async def slow(x: int) -> int:
    RUNS["slow"] += 1
    await asyncio.sleep(10)
    return x


@activity(timeout=0.05, retries=RetryPolicy(attempts=2, backoff=0.001))
def slow_sync(x: int) -> int:
    RUNS["slow_sync"] += 1
    time.sleep(0.2)
    return x


@workflow(name="failing")
async def failing(x: int, ctx: Any) -> Any:
    out = [await ctx.call(flaky, x)]
    try:
        await ctx.call(slow, x)
    except TimeoutError as exc:
        out.append(str(exc))
    await ctx.call(gate, "failing")
    await ctx.call(slow_sync, x)  # fails the workflow
    return out


async def test_activity_retries_timeouts_and_recorded_failures(journal_at: Any) -> None:
    path = journal_at("app")
    async with RingKernelRuntime(journal=path) as rt:
        await rt.start_workflow(failing, 2, key="f")
        await until(lambda: RUNS["gate failing"] == 1)
    assert RUNS == {"flaky": 3, "slow": 1, "gate failing": 1}
    rows = db(path, "SELECT pos, state, error FROM workflow_calls ORDER BY pos")
    assert [r[:2] for r in rows] == [(0, "done"), (1, "failed")]
    assert "TimeoutError" in rows[1][2]
    GATES["failing"] = asyncio.Event()
    GATES["failing"].set()
    # the replay gets the recorded failure back (caught as before) without running it
    async with RingKernelRuntime(journal=path) as rt:
        await rt.start_workflow(failing, 2, key="f")
        with pytest.raises(TimeoutError, match="slow_sync ran past"):
            await rt.workflow_result("f", timeout=5)
        assert rt.workflow_status("f").state == "failed"
    assert RUNS == {"flaky": 3, "slow": 1, "gate failing": 2, "slow_sync": 2}
    async with RingKernelRuntime(journal=path) as rt:
        with pytest.raises(TimeoutError):  # the stored outcome, nothing runs
            await rt.workflow_result("f", timeout=5)
        await rt.restart_workflow("f", failing)  # a new process: name the workflow
        with pytest.raises(TimeoutError):
            await rt.workflow_result("f", timeout=5)
    assert RUNS["flaky"] == 4  # restart forgets the history: it ran again


@workflow(name="clocks")
async def clocks(x: int, ctx: Any) -> tuple[float, float]:
    t, r = ctx.now(), ctx.random()
    await ctx.sleep(0.2)
    await ctx.call(gate, "clocks")
    return t, r


async def test_now_random_and_sleep_are_replayed(journal_at: Any) -> None:
    path = journal_at("app")
    async with RingKernelRuntime(journal=path) as rt:
        t0 = time.time()
        await rt.start_workflow(clocks, 0, key="t")
        await until(lambda: rt.workflow_status("t").calls == 3)  # mid-sleep
    recorded = db(path, "SELECT kind, result FROM workflow_calls ORDER BY pos")
    assert [k for k, _ in recorded] == ["now", "random", "sleep"]
    await asyncio.sleep(0.25)  # the wake-up time passes while nothing runs
    GATES["clocks"] = asyncio.Event()
    GATES["clocks"].set()
    async with RingKernelRuntime(journal=path) as rt:
        resumed = time.monotonic()
        await rt.start_workflow(clocks, 0, key="t")
        t, r = await rt.workflow_result("t", timeout=5)
        assert time.monotonic() - resumed < 0.19  # did not sleep 0.2 s again
    assert t0 <= t <= t0 + 1 and 0 <= r < 1
    async with RingKernelRuntime(journal=path) as rt:
        await rt.restart_workflow("t", clocks)
        t2, r2 = await rt.workflow_result("t", timeout=5)
        assert (t2, r2) != (t, r)


@workflow(name="fan")
async def fan(x: int, ctx: Any) -> list[int]:
    return await ctx.all(ctx.call(inc, x), ctx.call(inc, x + 10), ctx.call(inc, x + 20))


async def test_all_returns_results_in_call_order(journal_at: Any) -> None:
    async with RingKernelRuntime(journal=journal_at("app")) as rt:
        await rt.start_workflow(fan, 1, key="a")
        assert await rt.workflow_result("a") == [2, 12, 22]
    rows = db(journal_at("app"), "SELECT pos, args FROM workflow_calls ORDER BY pos")
    assert [r[0] for r in rows] == [0, 1, 2]


async def doubler(ctx: Any) -> None:
    while not ctx.should_terminate:
        msg = await ctx.receive()
        await ctx.send(msg * 2)


@workflow(name="child")
async def child(x: int, ctx: Any) -> int:
    await ctx.call(gate, f"child {x}")
    return await ctx.call(inc, x)


@workflow(name="parent")
async def parent(x: int, ctx: Any) -> int:
    k = await ctx.call("double", x)  # a kernel
    g = await ctx.call(stage(lambda v: v + 100) >> stage(lambda v: v * 2), k)  # a graph
    return await ctx.call(child, g)  # another workflow


async def test_kernel_graph_and_child_steps(journal_at: Any) -> None:
    path = journal_at("app")
    GATES["child 212"] = asyncio.Event()
    GATES["child 212"].set()
    async with RingKernelRuntime(journal=path) as rt:
        await rt.launch("double", doubler)
        await rt.activate("double")
        await rt.start_workflow(parent, 3, key="p")
        assert await rt.workflow_result("p", timeout=10) == 213
        assert rt.workflow_status("p/2").parent == "p"
        assert {s.key for s in rt.list_workflows("done")} == {"p", "p/2"}
    assert db(path, "SELECT key FROM items WHERE key LIKE 'p/%'") == [("p/1",)]


async def test_cancel_restart_delete_remove_child_records(journal_at: Any) -> None:
    path = journal_at("app")
    async with RingKernelRuntime(journal=path) as rt:
        await rt.launch("double", doubler)
        await rt.activate("double")
        await rt.start_workflow(parent, 3, key="p")
        await until(lambda: RUNS["gate child 212"] == 1)
        assert [s.key for s in rt.list_workflows("running")] == ["p", "p/2"]
        assert await rt.cancel_workflow("p", "operator said so")
        assert not await rt.cancel_workflow("p")  # no longer running
        assert {s.state for s in rt.list_workflows()} == {"cancelled"}
        with pytest.raises(WorkflowFailedError, match="operator said so"):
            await rt.workflow_result("p")
        # restart: the child and the graph item go, then it all runs again
        GATES["child 212"].set()
        await rt.restart_workflow("p")
        assert await rt.workflow_result("p", timeout=10) == 213
        assert RUNS["gate child 212"] == 2
        assert await rt.delete_workflow("p")
        assert not await rt.delete_workflow("p")
        assert rt.list_workflows() == []
        with pytest.raises(WorkflowNotFoundError):
            rt.workflow_status("p")
        with pytest.raises(WorkflowNotFoundError):
            await rt.restart_workflow("p")
    for table in ("workflows", "workflow_calls"):
        assert db(path, f"SELECT count(*) FROM {table}") == [(0,)]
    for table in ("items", "tokens", "results", "dead_letters"):
        assert db(path, f"SELECT count(*) FROM {table}") == [(0,)]


@task
def approval(request: dict, answer: str) -> str:
    if answer not in ("yes", "no"):
        raise ValueError(f"answer yes or no, not {answer!r}")
    return f"{request['what']}: {answer}"


plain_task = task("plain")


@workflow(name="approve")
async def approve(what: str, ctx: Any) -> tuple[str, Any]:
    verdict = await ctx.call(approval, {"what": what})
    extra = await ctx.call(plain_task, what)
    return verdict, extra


async def test_tasks_wait_in_the_journal_until_completed(journal_at: Any) -> None:
    path = journal_at("app")
    async with RingKernelRuntime(journal=path) as rt:
        await rt.start_workflow(approve, "laptop", key="a1")
        await until(lambda: rt.pending_tasks(approval) != [])
        [item] = rt.pending_tasks(approval)
        assert isinstance(item, PendingTask)
        assert (item.key, item.workflow, item.request) == ("a1/0", "a1", {"what": "laptop"})
    # the answer may come while no process runs the workflow, or after a restart
    async with RingKernelRuntime(journal=path) as rt:
        with pytest.raises(ValueError, match="yes or no"):
            await rt.complete_task(approval, "a1/0", "maybe")
        assert rt.pending_tasks(approval)[0].key == "a1/0"  # refused: still pending
        assert not await rt.complete_task(approval, "nope", "yes")
        assert await rt.complete_task(approval, "a1/0", "yes")
        assert not await rt.complete_task(approval, "a1/0", "no")  # answered already
        await rt.start_workflow(approve, "laptop", key="a1")  # resumes it
        await until(lambda: rt.pending_tasks(plain_task) != [])
        assert rt.pending_tasks(approval) == []
        assert await rt.complete_task(plain_task, "a1/1", {"n": 1})
        assert await rt.workflow_result("a1", timeout=5) == ("laptop: yes", {"n": 1})


async def test_resume_takes_over_workflows_left_behind(journal_at: Any) -> None:
    path = journal_at("app")
    async with RingKernelRuntime(journal=path) as rt:
        await rt.start_workflow(chain, 1, key="r1")
        await rt.start_workflow(chain, 2, key="r2")
        await until(lambda: RUNS["gate chain"] == 2)
    GATES["chain"] = asyncio.Event()
    GATES["chain"].set()
    async with RingKernelRuntime(journal=path) as rt:
        assert await rt.resume_workflows(chain) == ["r1", "r2"]
        assert await rt.resume_workflows(chain) == []  # already running here
        assert [await rt.workflow_result(k) for k in ("r1", "r2")] == [4, 5]
    assert RUNS["inc 1"] == 1 and RUNS["inc 2"] == 2  # inc 2 is r1's 2nd call and r2's 1st


async def test_engine_on_its_own_and_argument_errors(journal_at: Any) -> None:
    with pytest.raises(InvalidConfigurationError, match="need a journal"):
        WorkflowEngine(None, None)
    async with WorkflowEngine(None, journal_at("app")) as engine:
        await engine.start(fan, 0, key="x")
        assert await engine.result("x") == [1, 11, 21]
        assert engine.status("x").calls == 3
        with pytest.raises(InvalidConfigurationError, match="not a @workflow"):
            await engine.start(inc, 1)  # type: ignore[arg-type]
        with pytest.raises(InvalidConfigurationError, match="state is one of"):
            engine.list("sleeping")
        with pytest.raises(WorkflowNotFoundError):
            await engine.result("missing")
        with pytest.raises(TimeoutError):
            await engine.start(chain, 0, key="blocked")
            await engine.result("blocked", timeout=0.05)


@workflow(name="bad-steps")
async def bad_steps(x: int, ctx: Any) -> Any:
    with pytest.raises(InvalidConfigurationError, match="exactly one value"):
        ctx.call(child, 1, 2)
    with pytest.raises(InvalidConfigurationError, match="not a workflow step"):
        ctx.call(42, 1)
    return await ctx.call(lambda v: v * 7, x)  # a plain function is an activity


async def test_step_checks_and_plain_functions(journal_at: Any) -> None:
    async with RingKernelRuntime(journal=journal_at("app")) as rt:
        await rt.start_workflow(bad_steps, 6, key="b")
        assert await rt.workflow_result("b") == 42


def test_decorators() -> None:
    assert isinstance(inc, Activity) and inc.name.endswith(":inc")
    assert asyncio.run(inc(1)) == 2  # called directly, it is the function
    assert flaky.retry.attempts == 3
    with pytest.raises(InvalidConfigurationError):
        activity(timeout=0)(lambda: None)
    with pytest.raises(InvalidConfigurationError):
        workflow(lambda x, ctx: x)
    with pytest.raises(InvalidConfigurationError):

        @task
        async def nope(request: Any, answer: Any) -> Any:
            return answer

    assert approval.accept({"what": "w"}, "no") == "w: no"
    assert plain_task.accept(1, 2) == 2 and plain_task.name == "plain"


@message
class Order:
    qty: int = 0


@activity
async def count_order(order: Order) -> int:
    RUNS["order"] += 1
    return order.qty


@workflow(name="orders")
async def orders(x: int, ctx: Any) -> int:
    n = await ctx.call(count_order, Order(qty=x))  # a fresh message_id on every run
    await ctx.call(gate, "orders")
    return n


async def test_messages_with_fresh_ids_replay(journal_at: Any) -> None:
    path = journal_at("app")
    async with RingKernelRuntime(journal=path) as rt:
        await rt.start_workflow(orders, 5, key="o")
        await until(lambda: RUNS["gate orders"] == 1)
    GATES["orders"] = asyncio.Event()
    GATES["orders"].set()
    async with RingKernelRuntime(journal=path) as rt:
        await rt.start_workflow(orders, 5, key="o")
        assert await rt.workflow_result("o", timeout=5) == 5
    assert RUNS["order"] == 1


async def test_a_refused_write_does_not_undo_the_rest_of_its_commit(journal_at: Any) -> None:
    GATES["chain"] = asyncio.Event()
    async with WorkflowEngine(None, journal_at("app")) as engine:
        await engine.start(chain, 1, key="c")
        await until(lambda: RUNS["gate chain"] == 1)
        store = engine.store
        # a second record at a recorded position, queued with a good one: one transaction
        dup = store.post(store.op_call, "c", 0, "activity", "x", b"", "done", None, None, None)
        ok = store.post(store.op_call, "c", 5, "activity", "x", b"", "done", None, None, None)
        with pytest.raises(store.dialect.refusals()):
            await dup
        await ok
        assert engine.status("c").calls == 3  # two real calls and the good record


async def test_two_engines_on_one_journal(journal_at: Any) -> None:
    """Like two processes: one runs the workflow, the other answers and waits on it."""
    path = journal_at("app")
    async with WorkflowEngine(None, path) as a, WorkflowEngine(None, path) as b:
        await a.start(approve, "desk", key="d")
        await until(lambda: b.pending(approval) != [])
        assert await b.start(approve, "desk", key="d") == "d"  # held by a: not run twice
        assert await b.complete(approval, "d/0", "no")  # a notices by polling the journal
        await until(lambda: b.pending(plain_task) != [])
        assert await b.complete(plain_task, "d/1", 0)
        assert await b.result("d", timeout=5) == ("desk: no", 0)


async def test_child_workflow_resumes_with_its_parent(journal_at: Any) -> None:
    path = journal_at("app")
    async with RingKernelRuntime(journal=path) as rt:
        await rt.launch("double", doubler)
        await rt.activate("double")
        await rt.start_workflow(parent, 3, key="p")
        await until(lambda: RUNS["gate child 212"] == 1)
        assert rt.workflow_status("p/2").state == "running"
    GATES["child 212"] = asyncio.Event()
    GATES["child 212"].set()
    async with RingKernelRuntime(journal=path) as rt:
        await rt.launch("double", doubler)
        await rt.activate("double")
        await rt.start_workflow(parent, 3, key="p")
        assert await rt.workflow_result("p", timeout=10) == 213
    assert RUNS == {"gate child 212": 2, "inc 212": 1}


@workflow(name="two-graphs")
async def two_graphs(x: int, ctx: Any) -> list[int]:
    # the same shape and stage names ("<lambda>"), different code
    a = await ctx.call(stage(lambda v: v + 1), x)
    b = await ctx.call(stage(lambda v: v * 10), x)
    return [a, b]


async def test_graphs_of_one_shape_with_different_code_stay_apart(journal_at: Any) -> None:
    async with RingKernelRuntime(journal=journal_at("app")) as rt:
        await rt.start_workflow(two_graphs, 4, key="g")
        assert await rt.workflow_result("g", timeout=10) == [5, 40]
        await rt.start_workflow(two_graphs, 5, key="h")  # built again: same flows
        assert await rt.workflow_result("h", timeout=10) == [6, 50]
    flows = db(journal_at("app"), "SELECT count(*) FROM flows")
    assert flows == [(2,)]
