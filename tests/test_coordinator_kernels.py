"""Kernel-id stages: the coordinator moves items through launched kernels."""

from __future__ import annotations

import collections

import numpy as np

from pydotcompute import RingKernelRuntime, message
from pydotcompute.coordinator import FanIn, FanOut, stage


async def doubler(ctx):
    while not ctx.should_terminate:
        msg = await ctx.receive()
        await ctx.send(msg * 2)


async def adder(ctx):
    while not ctx.should_terminate:
        msg = await ctx.receive()
        await ctx.send(msg + 1)


async def breaks_on_13(ctx):
    while not ctx.should_terminate:
        msg = await ctx.receive()
        if msg == 13:
            raise RuntimeError("kernel fails on 13")
        await ctx.send(msg)


async def launched(rt, **kernels):
    for kid, fn in kernels.items():
        await rt.launch(kid, fn)
        await rt.activate(kid)


async def test_kernel_stages_mixed_with_functions_and_a_broadcast_join(tmp_path):
    async with RingKernelRuntime() as rt:
        await launched(rt, double=doubler, inc=adder)
        g = stage(lambda x: x + 100) >> FanOut("double", "inc", mode="broadcast") >> FanIn(tuple)
        flow = await rt.deploy(g, name="k")
        keys = await flow.submit_many(range(20))
        await flow.drain(timeout=20)
        assert [await flow.result(k) for k in keys] == [((i + 100) * 2, i + 101) for i in range(20)]
    assert all(t.done() for t in flow._tasks)  # runtime shutdown closed the flow


async def test_durable_kernel_stage(tmp_path):
    async with RingKernelRuntime(journal=str(tmp_path / "k.db")) as rt:
        await launched(rt, double=doubler)
        flow = await rt.deploy(stage("double") >> (lambda x: x - 1), name="k")
        await flow.submit_many(range(50), keys=[str(i) for i in range(50)])
        await flow.drain(timeout=20)
        assert await flow.result("7") == 13
        assert flow.status() == {"done": 50}


async def test_a_kernel_that_fails_an_item_sends_it_to_the_dead_letters():
    async with RingKernelRuntime() as rt:
        await launched(rt, brittle=breaks_on_13)
        flow = await rt.deploy(stage("brittle", retries=2, backoff=0.001, timeout=2), name="k")
        await flow.submit(1, key="a")
        assert await flow.result("a", timeout=5) == 1
        await flow.submit(13, key="b")
        await flow.drain(timeout=10)
        [rec] = flow.dead_letters()
        assert rec.key == "b" and rec.attempts == 2
        assert "KernelFailedError" in rec.error or "brittle" in rec.error
        counts = collections.Counter(flow.status())
        assert counts == {"done": 1, "dead": 1}


@message
class Point:
    x: float
    y: float


@message
class Norm:
    n: float


def norm(msg, out, state):  # type: ignore[no-untyped-def]
    out.n = (msg.x * msg.x + msg.y * msg.y) ** 0.5
    for i in range(16):
        out.correlation_id[i] = msg.message_id[i]
    state[0] += 1
    return True


def to_point(i: int) -> Point:
    return Point(x=3.0 * i, y=4.0 * i)


def norm_value(m: Norm) -> float:
    return m.n


async def test_a_compiled_cpu_kernel_as_a_durable_stage(tmp_path):
    async with RingKernelRuntime(journal=str(tmp_path / "cpu.db")) as rt:
        await rt.launch(
            "norm", norm, backend="cpu", input_type=Point, output_type=Norm, state=np.zeros(1)
        )
        await rt.activate("norm")
        flow = await rt.deploy(stage(to_point) >> "norm" >> norm_value, name="norms")
        await flow.submit_many(range(40), keys=[str(i) for i in range(40)])
        await flow.drain(timeout=30)
        assert [await flow.result(str(i)) for i in range(40)] == [5.0 * i for i in range(40)]
        assert rt.read_state("norm")[0] == 40
        assert rt.get_telemetry("norm").backend == "cpu"


async def answers_in_fours(ctx):
    while not ctx.should_terminate:
        held = [await ctx.receive() for _ in range(4)]
        for msg in held:
            await ctx.send(msg * 10)


async def test_the_workers_of_a_kernel_stage_have_their_requests_in_flight_together():
    # The kernel answers only once it holds four requests: one at a time would hang.
    async with RingKernelRuntime() as rt:
        await launched(rt, fours=answers_in_fours)
        flow = await rt.deploy(stage("fours", workers=4, timeout=5, retries=1), name="k")
        keys = await flow.submit_many(range(16))
        await flow.drain(timeout=20)
        assert [await flow.result(k) for k in keys] == [10 * i for i in range(16)]
        assert flow.dead_letters() == []


async def test_one_worker_of_a_kernel_stage_sends_the_items_it_took_together():
    # One worker, as a pipeline stage on another node usually has: the items it takes
    # travel together, not one request and reply at a time.
    from tests.ray_kernels import groups

    async with RingKernelRuntime() as rt:
        await launched(rt, a=groups, b=groups)
        flow = await rt.deploy(stage("a") >> "b", name="k")
        keys = await flow.submit_many([(i, []) for i in range(64)])
        await flow.drain(timeout=20)
        outs = [await flow.result(k) for k in keys]
        assert [x for x, _ in outs] == [100 * i for i in range(64)]
        for at in (0, 1):  # one at a time, every group would be of one
            assert max(sizes[at] for _, sizes in outs) > 8, outs
