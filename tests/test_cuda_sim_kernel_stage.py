"""A ``cuda`` kernel as a coordinator stage, on numba-cuda's simulator: replies are
matched to items by correlation id, and a record the handler drops ends its item as
filtered (the device loop handles its input in order and says where the outputs of
what it released end), long before the stage's timeout.

The simulator tests run in a child process with ``NUMBA_ENABLE_CUDASIM=1``.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.simulator_child import parent, run_simulator_half, sim


@parent
def test_simulator_suite() -> None:
    out = run_simulator_half(__file__, "not test_simulator_suite", timeout=110)
    assert "skipped" not in out.splitlines()[-1]


def keep_even(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x * 10
    return msg.x % 2 == 0


@sim
async def test_a_filtering_cuda_kernel_stage_ends_dropped_items_filtered() -> None:
    from pydotcompute import RingKernelRuntime, message
    from pydotcompute.coordinator import stage
    from pydotcompute.errors import ItemFilteredError

    @message
    class SimNum:
        x: np.int64

    async with RingKernelRuntime() as rt:
        await rt.launch("even", keep_even, backend="cuda", input_type=SimNum,
                        output_type=SimNum, queue_size=8)  # fmt: skip
        await rt.activate("even")
        # A timeout the drain's own limit is shorter than: items left to it would fail
        # the drain (and, dead-lettered, the status check).
        flow = await rt.deploy(
            stage(lambda i: SimNum(x=i)) >> stage("even", timeout=300) >> stage(lambda m: int(m.x)),
            name="sim",
        )
        values = [0, 1, 2, 3, 4, 5, 7, 9]  # the burst ends with dropped records
        await flow.submit_many(values, keys=[str(i) for i in values])
        await asyncio.wait_for(flow.drain(), 60)
        # Each even item has its own output, whatever the odd ones did.
        assert [await flow.result(str(i)) for i in (0, 2, 4)] == [0, 20, 40]
        assert flow.status() == {"done": 3, "filtered": 5}
        assert flow.items("filtered") == ["1", "3", "5", "7", "9"]
        assert flow.dead_letters() == [] and flow.counters()["retried"] == 0
        with pytest.raises(ItemFilteredError, match="even"):
            await flow.result("9")
        await flow.close()
        await rt.terminate("even")


def plus_one(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x + 1
    return True


@sim
async def test_a_cuda_stage_stays_apart_and_the_cpu_stages_after_it_fuse() -> None:
    from pydotcompute import RingKernelRuntime, message
    from pydotcompute.coordinator import stage

    @message
    class SimNum:
        x: np.int64

    async with RingKernelRuntime() as rt:
        # The simulator runs one cuda kernel at a time: one cuda stage, two cpu stages.
        for kid, backend in (("g1", "cuda"), ("c1", "cpu"), ("c2", "cpu")):
            await rt.launch(kid, plus_one, backend=backend, input_type=SimNum,
                            output_type=SimNum, queue_size=8)  # fmt: skip
            await rt.activate(kid)
        g = stage(lambda i: SimNum(x=i)) >> "g1" >> "c1" >> "c2" >> stage(lambda m: int(m.x))
        flow = await rt.deploy(g, name="sim")
        report = flow.explain()
        assert [s.stages for s in report.fused] == [("c1", "c2")]
        assert report.reason("g1", "c1") == "different backend: 'g1' runs on cuda, 'c1' on cpu"
        await flow.submit_many([1, 5], keys=["one", "five"])
        assert await flow.result("one", timeout=90) == 4
        assert await flow.result("five", timeout=90) == 8
        assert report.counts()["c2"]["processed"] == 2


@sim
async def test_the_device_loop_says_where_the_outputs_of_its_released_input_end() -> None:
    """Once the input ring's released covers what was sent, OUT_RESERVED (stored before
    it) says where the outputs end: taking outputs that far gives every one of them."""
    from pydotcompute import RingKernelRuntime, message

    @message
    class SimNum:
        x: np.int64

    async with RingKernelRuntime() as rt:
        handle = await rt.launch("even", keep_even, backend="cuda", input_type=SimNum,
                                 output_type=SimNum, queue_size=16)  # fmt: skip
        await rt.activate("even")
        values = list(range(11))
        await rt.send_batch("even", [SimNum(x=v) for v in values], 30)
        pos = handle.input_position()
        assert pos == len(values)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while (through := handle.settled_through(pos)) is None:
            assert loop.time() < deadline, "the kernel never released its input"
            await asyncio.sleep(0.005)
        assert through == 6  # the even values' outputs, reserved in order
        got: list[int] = []
        while (handle.outputs_taken() or 0) < through:
            assert loop.time() < deadline, "reserved outputs never sealed"
            batch = await rt.receive_batch("even", 16, 5)
            got.extend(int(x) for x in batch["x"])
        assert got == [v * 10 for v in values if v % 2 == 0]
        await rt.terminate("even")
