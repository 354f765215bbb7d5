"""Fused chains: adjacent compiled ``cpu`` kernel stages run as one kernel.

One compiled loop calls the stages' handlers in order; a handler returning False ends
the record there (the item ends filtered); counts are kept per stage; an error names
the stage that raised; ``fuse=False`` opts out; ``flow.explain()`` says why each other
pair runs apart; a durable fused segment is one hop of the journal.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pydotcompute import (
    FusedStageError,
    FusionReport,
    KernelFailedError,
    RingKernelRuntime,
    message,
)
from pydotcompute.coordinator import FanOut, deploy, stage
from pydotcompute.errors import ItemFailedError, ItemFilteredError
from pydotcompute.telemetry.collector import TelemetryCollector


@message
class Num:
    x: np.int64


@message
class Pair:
    x: np.int64
    y: np.int64


def inc(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x + 1
    return True


def double(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x * 2
    return True


def keep_even(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x
    return msg.x % 2 == 0


def fails_on_13(msg, out, state):  # type: ignore[no-untyped-def]
    if msg.x == 13:
        raise ValueError("thirteen")
    out.x = msg.x
    return True


def to_pair(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x
    out.y = msg.x
    return True


def make(i: int) -> Num:
    return Num(x=i)


def unwrap(m: Num) -> int:
    return int(m.x)


async def launch(rt: RingKernelRuntime, kid: str, fn, in_t=Num, out_t=Num) -> None:  # type: ignore[no-untyped-def]
    await rt.launch(kid, fn, backend="cpu", input_type=in_t, output_type=out_t)
    await rt.activate(kid)


def chain(*kids: str, **opts):  # type: ignore[no-untyped-def]
    g = stage(make)
    for kid in kids:
        g = g >> stage(kid, timeout=10, **opts.get(kid, {}))
    return g >> stage(unwrap)


async def test_a_chain_of_three_runs_as_one_kernel_in_order():
    async with RingKernelRuntime() as rt:
        await launch(rt, "a", inc)
        await launch(rt, "b", double)
        await launch(rt, "c", inc)
        flow = await rt.deploy(chain("a", "b", "c"), name="f")
        report = flow.explain()
        assert isinstance(report, FusionReport)
        [seg] = report.fused
        assert seg.stages == ("a", "b", "c") and seg.kernel_id
        assert rt.kernel_handle(seg.kernel_id).backend == "cpu"
        keys = await flow.submit_many(range(500), keys=[str(i) for i in range(500)])
        done = [k async for k, _ in flow.results()]
        assert done == keys  # one worker, one loop: the order is kept
        assert [await flow.result(k) for k in keys] == [(i + 1) * 2 + 1 for i in range(500)]
        counts = report.counts()
        assert counts == {s: {"processed": 500, "emitted": 500, "dropped": 0} for s in "abc"}
        # The unfused kernels saw nothing: the segment's items went through its kernel.
        assert rt.get_telemetry("b").messages_processed == 0


async def test_a_handler_returning_false_mid_chain_ends_that_item_filtered():
    async with RingKernelRuntime() as rt:
        await launch(rt, "a", inc)
        await launch(rt, "even", keep_even)
        await launch(rt, "c", inc)
        flow = await rt.deploy(chain("a", "even", "c"), name="f")
        assert flow.explain().fused[0].stages == ("a", "even", "c")
        await flow.submit_many(range(40), keys=[str(i) for i in range(40)])
        await flow.drain(timeout=30)
        assert flow.status() == {"done": 20, "filtered": 20}
        # x + 1 is even for odd x: those go on, the others end at "even".
        assert sorted(flow.items("filtered"), key=int) == [str(i) for i in range(0, 40, 2)]
        assert [await flow.result(str(i)) for i in range(1, 40, 2)] == [
            i + 2 for i in range(1, 40, 2)
        ]
        with pytest.raises(ItemFilteredError):
            await flow.result("4")
        assert flow.counters()["filtered"] == 20 and flow.dead_letters() == []
        assert flow.stage_counts() == {
            "a": {"processed": 40, "emitted": 40, "dropped": 0},
            "even": {"processed": 40, "emitted": 20, "dropped": 20},
            "c": {"processed": 20, "emitted": 20, "dropped": 0},
        }
        assert rt.kernel_handle(flow.explain().fused[0].kernel_id).stage_counts() == (
            flow.stage_counts()
        )
        registry = CollectorRegistry()
        registry.register(TelemetryCollector(rt))
        samples = {
            (s.name, s.labels["stage"], s.labels["outcome"]): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples
            if s.name == "pydotcompute_flow_fused_stage_records_total"
        }
        name = "pydotcompute_flow_fused_stage_records_total"
        assert samples[(name, "even", "dropped")] == 20
        assert samples[(name, "c", "processed")] == 20


async def test_an_error_in_a_fused_handler_names_the_stage_that_raised():
    async with RingKernelRuntime() as rt:
        await launch(rt, "a", inc)
        await launch(rt, "check", fails_on_13)
        await launch(rt, "c", inc)
        flow = await rt.deploy(chain("a", "check", "c"), name="f")
        [seg] = flow.explain().fused
        await flow.submit(12, key="bad")  # 12 + 1 = 13 raises in "check"
        await flow.drain(timeout=30)
        with pytest.raises(ItemFailedError) as info:
            await flow.result("bad")
        rec = info.value.record
        assert "stage 'check' (handler fails_on_13) raised ValueError: thirteen" in rec.error
        assert rec.stage == "a"  # retried (and dead-lettered) where the segment starts
        err = rt.kernel_handle(seg.kernel_id).error
        assert isinstance(err, FusedStageError) and err.stage == "check"
        assert isinstance(err.__cause__, ValueError)
        assert flow.stage_counts()["check"]["processed"] == 1
        assert flow.stage_counts()["c"]["processed"] == 0
        # Later items fail as they would on a failed one-stage kernel.
        await flow.submit(1, key="after")
        await flow.drain(timeout=30)
        with pytest.raises(ItemFailedError, match="KernelFailedError"):
            await flow.result("after")
        assert KernelFailedError.__name__ in info.value.record.error


async def test_fuse_false_keeps_a_stage_apart():
    async with RingKernelRuntime() as rt:
        await launch(rt, "a", inc)
        await launch(rt, "b", double)
        await launch(rt, "c", inc)
        flow = await rt.deploy(chain("a", "b", "c", b={"fuse": False}), name="f")
        report = flow.explain()
        assert report.fused == ()
        assert report.reason("a", "b") == "fuse=False on 'b'"
        assert report.reason("b", "c") == "fuse=False on 'b'"
        assert report.counts() == {}
        await flow.submit_many(range(30), keys=[str(i) for i in range(30)])
        await flow.drain(timeout=30)
        assert [await flow.result(str(i)) for i in range(30)] == [
            (i + 1) * 2 + 1 for i in range(30)
        ]
        assert rt.get_telemetry("b").messages_processed == 30


async def test_explain_gives_a_reason_for_every_pair_that_runs_apart():
    async def host_inc(ctx):  # type: ignore[no-untyped-def]
        while not ctx.should_terminate:
            m = await ctx.receive()
            await ctx.send(Num(x=m.x + 1, correlation_id=m.message_id))

    async with RingKernelRuntime() as rt:
        await launch(rt, "a", inc)
        await launch(rt, "b", double)
        await launch(rt, "wide", to_pair, Num, Pair)
        await rt.launch("h", host_inc, input_type=Num, output_type=Num)
        await rt.activate("h")
        g = (
            stage(make)
            >> stage("a")
            >> stage("h")
            >> stage("b")
            >> FanOut(stage("wide"), mode="round_robin")
            >> stage(unwrap)
        )
        flow = await rt.deploy(g, name="f")
        r = flow.explain()
        assert r.fused == ()
        assert r.reason("make", "a") == "not a kernel stage: 'make' is a function"
        assert r.reason("a", "h") == "different backend: 'a' runs on cpu, 'h' on host"
        assert r.reason("b", "fanout:round_robin") == "fan-out"
        await flow.close()
        g2 = stage(make) >> stage("a") >> stage("wide") >> stage(unwrap)
        flow2 = await rt.deploy(g2, name="g")
        assert flow2.explain().reason("a", "wide") is None  # Num -> Num: they line up
        await flow2.close()
        g3 = stage(make) >> stage("wide") >> stage("a") >> stage(unwrap)
        flow3 = await rt.deploy(g3, name="h")
        assert flow3.explain().reason("wide", "a") == (
            "record types differ: 'wide' sends Pair, 'a' takes Num"
        )
        await flow3.close()
        g4 = stage(make) >> stage("a") >> stage("b") >> stage("a", name="a-again") >> unwrap
        flow4 = await rt.deploy(g4, name="i")
        r4 = flow4.explain()
        assert r4.reason("a", "b") == "kernel used elsewhere: 'a' runs several stages"
        assert r4.fused == ()
        await flow4.close()


async def test_a_durable_fused_chain_finishes_each_item_exactly_once(tmp_path):
    path = str(tmp_path / "f.db")
    async with RingKernelRuntime() as rt:
        await launch(rt, "a", inc)
        await launch(rt, "even", keep_even)
        await launch(rt, "c", inc)
        g = chain("a", "even", "c")
        async with await deploy(rt, g, name="f", journal=path) as flow:
            assert flow.explain().fused[0].stages == ("a", "even", "c")
            await flow.submit_many(range(200), keys=[str(i) for i in range(200)])
            await flow.drain(timeout=60)
            assert flow.status() == {"done": 100, "filtered": 100}
            assert flow.stage_counts()["a"]["processed"] == 200
        # Deployed again on the same journal: nothing is run again.
        async with await deploy(rt, g, name="f", journal=path) as flow:
            await flow.drain(timeout=30)
            assert flow.status() == {"done": 100, "filtered": 100}
            assert [await flow.result(str(i)) for i in range(1, 200, 2)] == [
                i + 2 for i in range(1, 200, 2)
            ]
            assert flow.stage_counts()["a"]["processed"] == 0
            await flow.submit_many([7, 9], keys=["7", "new"])  # "7" is known: not added
            await flow.drain(timeout=30)
            assert await flow.result("new") == 11
            assert flow.stage_counts()["a"]["processed"] == 1


async def test_items_a_journal_holds_at_an_inner_stage_resume_unfused(tmp_path):
    path = str(tmp_path / "f.db")

    async def stuck(ctx):  # type: ignore[no-untyped-def]
        while not ctx.should_terminate:
            await asyncio.sleep(0.01)

    async with RingKernelRuntime() as rt:
        await launch(rt, "a", inc)
        await launch(rt, "c", inc)
        await rt.launch("b", stuck)
        await rt.activate("b")
        g = chain("a", "b", "c")
        flow = await deploy(rt, g, name="f", journal=path)
        assert flow.explain().fused == ()  # b runs on host: nothing lines up
        await flow.submit_many(range(20), keys=[str(i) for i in range(20)])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while sum(flow.stage_load()["b"].values()) < 20:
            assert loop.time() < deadline, flow.stage_load()
            await asyncio.sleep(0.02)
        await flow.close()  # the items wait at "b" in the journal
        await rt.terminate("b")
        await launch(rt, "b", double)
        async with await deploy(rt, g, name="f", journal=path) as flow:
            [seg] = flow.explain().fused
            assert seg.stages == ("a", "b", "c")
            await flow.drain(timeout=60)
            assert flow.status() == {"done": 20}
            assert [await flow.result(str(i)) for i in range(20)] == [
                (i + 1) * 2 + 1 for i in range(20)
            ]
            # They ran at "b" and "c" unfused, not again from the segment's start.
            assert flow.stage_counts()["a"]["processed"] == 0
            assert rt.get_telemetry("b").messages_processed == 20


async def test_a_restarting_fused_kernel_fails_the_item_that_raised_and_goes_on():
    async with RingKernelRuntime() as rt:
        for kid, fn in (("a", inc), ("check", fails_on_13), ("c", inc)):
            await rt.launch(
                kid, fn, backend="cpu", input_type=Num, output_type=Num, restart="on-failure"
            )
            await rt.activate(kid)
        g = stage(make) >> stage("a", timeout=10, retries=2, backoff=0.01)
        g = g >> stage("check", timeout=10, retries=2, backoff=0.01)
        g = g >> stage("c", timeout=10, retries=2, backoff=0.01) >> stage(unwrap)
        flow = await rt.deploy(g, name="f")
        [seg] = flow.explain().fused
        await flow.submit_many(range(30), keys=[str(i) for i in range(30)])
        await flow.drain(timeout=60)
        assert flow.status() == {"done": 29, "dead": 1}
        [dead] = flow.dead_letters()
        assert dead.key == "12" and dead.attempts == 2
        assert "stage 'check' (handler fails_on_13) raised ValueError" in dead.error
        assert [await flow.result(str(i)) for i in range(30) if i != 12] == [
            i + 2 for i in range(30) if i != 12
        ]
        t = rt.get_telemetry(seg.kernel_id)
        assert t.errors == 2 and "stage 'check' (handler fails_on_13)" in (t.last_error or "")
