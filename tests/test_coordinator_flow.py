"""In-memory flows: stages, fan-out/fan-in, DAGs, routes, retries, dead letters, bounds."""

from __future__ import annotations

import asyncio
import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydotcompute.coordinator import DAG, FanIn, FanOut, Pipeline, deploy, route, stage
from pydotcompute.errors import FlowClosedError, InvalidConfigurationError, ItemFailedError


async def run_all(graph, values, **kw):
    async with await deploy(None, graph, name="t", **kw) as flow:
        keys = [await flow.submit(v, key=f"k{i}") for i, v in enumerate(values)]
        await flow.drain(timeout=30)
        return flow, [await flow.result(k) for k in keys]


async def test_sync_and_async_functions_with_per_worker_state():
    loads = []

    def load_model():
        loads.append(1)
        return {"scale": 10, "seen": 0}

    async def add1(x):
        await asyncio.sleep(0)
        return x + 1

    def scale(x, state):
        state["seen"] += 1
        return x * state["scale"]

    def count(x, state):  # no factory: an empty dict per worker, kept across items
        state["n"] = state.get("n", 0) + 1
        return (x, state["n"])

    g = stage(add1) >> stage(scale, state=load_model, workers=2) >> count
    _, out = await run_all(g, range(20))
    assert [v for v, _ in out] == [(i + 1) * 10 for i in range(20)]
    assert [n for _, n in out] == list(range(1, 21))  # one worker, its state persisted
    assert len(loads) == 2  # once per worker, not per item


async def test_nested_pipeline_as_a_stage():
    inner = Pipeline(lambda x: x + 1, lambda x: x * 3)
    _, out = await run_all(stage(lambda x: x - 1) >> inner >> (lambda x: -x), [1, 2, 3])
    assert out == [-3, -6, -9]


async def test_submit_is_idempotent_per_key_and_status_items_results():
    async with await deploy(None, stage(lambda x: x * 2), name="t") as flow:
        k = await flow.submit(5, key="a")
        assert await flow.submit(99, key="a") == "a"
        auto = await flow.submit(7)
        await flow.drain()
        assert await flow.result("a") == 10 and await flow.result(auto) == 14
        assert flow.status() == {"done": 2}
        assert flow.items(state="done") == [k, auto] and flow.items(state="dead") == []
        assert dict([kv async for kv in flow.results()]) == {"a": 10, auto: 14}
        c = flow.counters()
        assert (c["submitted"], c["completed"], c["in_flight"]) == (2, 2, 0)
        with pytest.raises(KeyError):
            await flow.result("missing")


async def test_failing_async_function_with_three_retries_runs_three_times_then_dead_letter():
    runs = collections.Counter()

    @stage(retries=3, backoff=0.001)
    async def flaky(x):
        runs[x] += 1
        raise RuntimeError(f"boom {x}")

    async with await deploy(None, flaky, name="t") as flow:
        await flow.submit(1, key="one")
        await flow.drain(timeout=10)
        assert runs[1] == 3
        [rec] = flow.dead_letters()
        assert (rec.key, rec.stage, rec.attempts, rec.value) == ("one", "flaky", 3, 1)
        assert "RuntimeError: boom 1" in rec.error and "raise RuntimeError" in rec.traceback
        with pytest.raises(ItemFailedError) as err:
            await flow.result("one")
        assert err.value.record == rec
        c = flow.counters()
        assert (c["retried"], c["dead_lettered"]) == (2, 1)
        assert flow.status() == {"dead": 1}


async def test_sync_function_retries_succeed_and_non_retryable_errors_do_not_retry():
    runs = collections.Counter()

    @stage(retries=5, backoff=0.001, retry_on=(ConnectionError,))
    def picky(x):
        runs[x] += 1
        if x == "transient" and runs[x] < 3:
            raise ConnectionError("try again")
        if x == "fatal":
            raise ValueError("no")
        return x.upper()

    async with await deploy(None, picky, name="t") as flow:
        await flow.submit("transient", key="t")
        await flow.submit("fatal", key="f")
        await flow.drain(timeout=10)
        assert await flow.result("t") == "TRANSIENT" and runs["transient"] == 3
        assert runs["fatal"] == 1
        assert [r.key for r in flow.dead_letters()] == ["f"]


async def test_backoff_waits_between_attempts():
    times = []

    @stage(retries=3, backoff=0.05)
    async def slow_fail(x):
        times.append(asyncio.get_running_loop().time())
        raise RuntimeError

    async with await deploy(None, slow_fail, name="t") as flow:
        await flow.submit(1)
        await flow.drain(timeout=10)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 3 and gaps[0] >= 0.025 and gaps[1] >= 0.05


async def test_dead_letter_retry_replays_the_item():
    fail = {"on": True}

    def gate(x):
        if fail["on"]:
            raise RuntimeError("closed")
        return x + 100

    async with await deploy(None, stage(lambda x: x + 1) >> gate, name="t") as flow:
        await flow.submit(1, key="x")
        await flow.drain()
        assert flow.status() == {"dead": 1}
        fail["on"] = False
        assert await flow.retry("x") is True
        assert await flow.result("x", timeout=5) == 102
        assert flow.dead_letters() == [] and await flow.retry("x") is False


async def test_broadcast_join_by_key_when_branch_b_fails_item_1():
    async def a(x):
        await asyncio.sleep(0.02 if x == 2 else 0)  # arrive out of order
        return ("a", x)

    def b(x):
        if x == 1:
            raise RuntimeError("b fails item 1")
        return ("b", x)

    g = FanOut(a, b, mode="broadcast") >> FanIn(lambda parts: parts)
    async with await deploy(None, g, name="t") as flow:
        for i in (1, 2, 3):
            await flow.submit(i, key=str(i))
        await flow.drain(timeout=10)
        assert await flow.result("2") == [("a", 2), ("b", 2)]
        assert await flow.result("3") == [("a", 3), ("b", 3)]
        with pytest.raises(ItemFailedError):
            await flow.result("1")


async def test_fanout_modes_spread_items():
    seen = collections.defaultdict(list)

    def branch(name):
        def fn(x):
            seen[name].append(x)
            return x

        fn.__name__ = name
        return fn

    for mode in ("round_robin", "key_hash", "least_loaded"):
        seen.clear()
        g = FanOut(branch("p"), branch("q"), branch("r"), mode=mode) >> (lambda x: x * 2)
        _, out = await run_all(g, range(30))
        assert out == [i * 2 for i in range(30)]
        assert sorted(x for v in seen.values() for x in v) == list(range(30))
        if mode == "round_robin":
            assert [len(v) for v in seen.values()] == [10, 10, 10]
        assert len(seen) >= 2


async def test_key_hash_sends_a_key_to_the_same_branch():
    seen = collections.defaultdict(set)

    def p(x):
        seen["p"].add(x)
        return x

    def q(x):
        seen["q"].add(x)
        return x

    async with await deploy(None, FanOut(p, q, mode="key_hash"), name="t") as flow:
        for i in range(20):
            await flow.submit(i, key=f"key-{i}")
        await flow.drain()
    import zlib

    for i in range(20):
        expected = "pq"[zlib.crc32(f"key-{i}".encode()) % 2]
        assert i in seen[expected]


async def test_batching_fan_in_by_count_and_by_timeout():
    sizes = []

    def batch_double(values):
        sizes.append(len(values))
        return [v * 2 for v in values]

    g = stage(lambda x: x) >> FanIn(batch_double, count=4, timeout=0.05)
    _, out = await run_all(g, range(10))
    assert out == [i * 2 for i in range(10)]
    assert max(sizes) <= 4 and sum(sizes) == 10

    # a merge that does not return one output per input fails its items
    async with await deploy(
        None, FanIn(lambda vs: sum(vs), count=2, timeout=0.01), name="t"
    ) as flow:
        await flow.submit(1, key="a")
        await flow.drain(timeout=5)
        assert "one output per input" in flow.dead_letters()[0].error


async def test_dag_joins_by_key_with_named_parts():
    d = (
        DAG()
        .add("parse", lambda s: int(s))
        .add("sq", lambda x: x * x, after="parse")
        .add("neg", lambda x: -x, after="parse")
        .add("both", lambda parts: (parts["sq"], parts["neg"]), after=["sq", "neg"])
        .add("fmt", lambda t: f"{t[0]}/{t[1]}", after="both")
    )
    _, out = await run_all(d, ["1", "2", "3"])
    assert out == ["1/-1", "4/-2", "9/-3"]


async def test_route_branches_on_a_predicate():
    g = stage(lambda x: x) >> route(
        lambda x: x % 2 == 0, lambda x: f"even {x}", lambda x: f"odd {x}"
    )
    _, out = await run_all(g >> (lambda s: s.upper()), range(4))
    assert out == ["EVEN 0", "ODD 1", "EVEN 2", "ODD 3"]
    _, out = await run_all(
        route(lambda x: x > 1, lambda x: x * 10), [1, 2]
    )  # if_false: straight on
    assert out == [1, 20]

    def bad(x):
        raise ValueError("predicate broke")

    async with await deploy(None, route(bad, lambda x: x), name="t") as flow:
        await flow.submit(1, key="r")
        await flow.drain()
        assert flow.dead_letters()[0].stage.startswith("route:")


async def test_four_workers_on_300_items_run_each_item_once():
    runs = collections.Counter()
    concurrent = {"now": 0, "max": 0}

    @stage(workers=4)
    async def work(x):
        runs[x] += 1
        concurrent["now"] += 1
        concurrent["max"] = max(concurrent["max"], concurrent["now"])
        await asyncio.sleep(0.001)
        concurrent["now"] -= 1
        return x

    _, out = await run_all(work, range(300))
    assert out == list(range(300))
    assert set(runs.values()) == {1} and len(runs) == 300
    assert concurrent["max"] == 4


async def test_buffers_bound_what_is_taken_from_the_source():
    release = asyncio.Event()
    taken = 0

    @stage(buffer=4)
    async def first(x):
        nonlocal taken
        taken += 1
        await release.wait()
        return x

    g = first >> stage(lambda x: x, buffer=2)
    async with await deploy(None, g, name="t") as flow:

        async def feed():
            for i in range(100):
                await flow.submit(i)

        feeder = asyncio.create_task(feed())
        await asyncio.sleep(0.1)
        in_system = flow.counters()["in_flight"]
        # buffers 4 + 2, plus what the workers hold (64 and 2 at most per take)
        assert in_system <= 4 + 2 + 64 + 2 and not feeder.done()
        release.set()
        await feeder
        await flow.drain(timeout=10)
        assert flow.status() == {"done": 100}


async def test_cancel_is_bounded_and_marks_unfinished_items_cancelled():
    async def forever(x):
        await asyncio.Event().wait()

    flow = await deploy(None, forever, name="t")
    await flow.submit(1, key="a")
    await asyncio.sleep(0.01)
    t0 = asyncio.get_running_loop().time()
    await flow.cancel("operator stop", timeout=1)
    assert asyncio.get_running_loop().time() - t0 < 2
    assert flow.status() == {"cancelled": 1}
    with pytest.raises(FlowClosedError, match="operator stop"):
        await flow.result("a")
    with pytest.raises(FlowClosedError):
        await flow.submit(2)
    assert all(t.done() for t in flow._tasks)


async def test_kernel_stage_without_runtime_is_rejected():
    with pytest.raises(InvalidConfigurationError, match="runtime"):
        await deploy(None, stage("zscore"), name="t")


@settings(max_examples=15, deadline=None)
@given(
    fails=st.lists(st.sampled_from(["a", "b", None]), min_size=1, max_size=25),
    delays=st.lists(st.integers(0, 3), min_size=25, max_size=25),
)
def test_property_joins_match_by_key_whatever_fails_and_however_late(fails, delays):
    async def branch_a(x):
        await asyncio.sleep(delays[x] / 1000)
        if fails[x] == "a":
            raise RuntimeError("a")
        return ("a", x)

    async def branch_b(x):
        await asyncio.sleep(delays[-1 - x] / 1000)
        if fails[x] == "b":
            raise RuntimeError("b")
        return ("b", x)

    async def run():
        g = FanOut(stage(branch_a, workers=3), stage(branch_b, workers=2), mode="broadcast")
        async with await deploy(None, g >> FanIn(tuple), name="p") as flow:
            await flow.submit_many(range(len(fails)), keys=[str(i) for i in range(len(fails))])
            await flow.drain(timeout=30)
            for i, f in enumerate(fails):
                if f is None:
                    assert await flow.result(str(i)) == (("a", i), ("b", i))
                else:
                    with pytest.raises(ItemFailedError) as err:
                        await flow.result(str(i))
                    assert err.value.record.stage == f"branch_{f}"
            assert flow.status().get("dead", 0) == sum(f is not None for f in fails)

    asyncio.run(run())


async def test_result_times_out_without_leaving_waiters_behind():
    async def forever(x):
        await asyncio.Event().wait()

    async with await deploy(None, forever, name="t") as flow:
        await flow.submit(1, key="a")
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await flow.result("a", timeout=0.02)
        assert flow._ledger.items_by_key["a"].waiters == []


async def test_close_releases_a_submit_waiting_for_room():
    async def forever(x):
        await asyncio.Event().wait()

    flow = await deploy(None, stage(forever, buffer=1), name="t")

    async def fill():
        for i in range(1000):
            await flow.submit(i)

    filler = asyncio.create_task(fill())
    await asyncio.sleep(0.05)
    assert not filler.done()  # the flow is full: submit waits for room
    await flow.close()
    with pytest.raises(FlowClosedError):
        await asyncio.wait_for(filler, 2)
