"""Fused ``cuda`` chains on numba-cuda's simulator: adjacent ``cuda`` kernel stages run
as one resident kernel whose device loop calls their handlers in order; order is kept,
a handler returning False ends the record mid-chain and its item as filtered, long
before the stages' timeout, counts are kept per stage in device memory, and a handler
that raises names its stage.

The simulator tests run in a child process with ``NUMBA_ENABLE_CUDASIM=1``.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.simulator_child import parent, run_simulator_half, sim


@parent
def test_simulator_suite() -> None:
    out = run_simulator_half(__file__, "not test_simulator_suite", timeout=170)
    assert "skipped" not in out.splitlines()[-1]


async def _wait_for(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


def plus_one(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x + 1
    return True


def keep_odd(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x
    return msg.x % 2 == 1


def times_ten(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x * 10
    return True


def fails_on_3(msg, out, state):  # type: ignore[no-untyped-def]
    if msg.x == 3:
        raise ValueError("three")
    out.x = msg.x
    return True


@sim
async def test_a_three_stage_cuda_chain_runs_as_one_kernel() -> None:
    from pydotcompute import RingKernelRuntime, message
    from pydotcompute.backends.cuda_fused import FusedCudaKernelBackend
    from pydotcompute.coordinator import stage
    from pydotcompute.errors import ItemFilteredError

    @message
    class SimNum:
        x: np.int64

    async with RingKernelRuntime() as rt:
        # Launched, never activated: the stages' own kernels stay idle; the flow runs
        # the fused one.
        for kid, fn in (("g1", plus_one), ("g2", keep_odd), ("g3", times_ten)):
            await rt.launch(kid, fn, backend="cuda", input_type=SimNum,
                            output_type=SimNum, queue_size=8)  # fmt: skip
        g = (
            stage(lambda i: SimNum(x=i))
            >> stage("g1", timeout=300)
            >> stage("g2", timeout=300)
            >> stage("g3", timeout=300)
            >> stage(lambda m: int(m.x))
        )
        flow = await rt.deploy(g, name="simfuse")
        report = flow.explain()
        assert [s.stages for s in report.fused] == [("g1", "g2", "g3")]
        (seg,) = report.fused
        assert seg.kernels == ("g1", "g2", "g3") and seg.kernel_id
        backend = rt.kernel_handle(seg.kernel_id)._launch.kernel_backend
        assert isinstance(backend, FusedCudaKernelBackend)
        values = [0, 1, 2, 3, 4, 5, 7]  # the burst ends with a dropped record
        await flow.submit_many(values, keys=[str(i) for i in values])
        # Shorter than the stages' timeout: items left to it would fail the drain.
        await asyncio.wait_for(flow.drain(), 60)
        # i + 1 is odd for even i: those pass on, in order, each with its own output.
        assert [await flow.result(k) for k in ("0", "2", "4")] == [10, 30, 50]
        # The rest were dropped by the middle handler: filtered, at the first stage.
        assert flow.status() == {"done": 3, "filtered": 4}
        assert flow.items("filtered") == ["1", "3", "5", "7"]
        assert flow.dead_letters() == [] and flow.counters()["retried"] == 0
        with pytest.raises(ItemFilteredError, match="g1"):
            await flow.result("7")
        await _wait_for(lambda: report.counts()["g3"]["emitted"] == 3)
        counts = report.counts()
        assert counts["g1"] == {"processed": 7, "emitted": 7, "dropped": 0}
        assert counts["g2"] == {"processed": 7, "emitted": 3, "dropped": 4}
        assert counts["g3"] == {"processed": 3, "emitted": 3, "dropped": 0}
        assert rt.kernel_handle(seg.kernel_id).stage_counts() == counts
        await flow.close()


@sim
async def test_records_keep_their_order_through_the_fused_device_loop() -> None:
    """Straight through the fused kernel's rings: outputs come in input order, each
    with its input's message_id as correlation_id (the chain's inner records carry it
    too), and the handlers' states are each their own."""
    from pydotcompute import RingKernelRuntime, message
    from pydotcompute.backends.cpu_fused import FusedHandlers, FusedStep

    @message
    class SimNum:
        x: np.int64

    dt = SimNum.__record_dtype__
    steps = [
        FusedStep(name, fn, dt, dt, np.zeros(1))
        for name, fn in (("a", plus_one), ("b", keep_odd), ("c", times_ten))
    ]
    async with RingKernelRuntime() as rt:
        await rt.launch("chain", FusedHandlers(steps), backend="cuda", input_type=SimNum,
                        output_type=SimNum, queue_size=16)  # fmt: skip
        await rt.activate("chain")
        sent = [SimNum(x=i) for i in range(10)]
        for m in sent:
            await rt.send("chain", m)
        got = [await rt.receive("chain", timeout=60) for _ in range(5)]
        assert [int(m.x) for m in got] == [10, 30, 50, 70, 90]
        assert [m.correlation_id for m in got] == [sent[i].message_id for i in (0, 2, 4, 6, 8)]
        # The loop adds a round's counts after writing its outputs: wait for them.
        want = {"processed": 10, "emitted": 5, "dropped": 5}
        await _wait_for(lambda: rt.kernel_handle("chain").stage_counts()["b"] == want)
        await rt.terminate("chain")


@sim
async def test_a_handler_that_raises_names_its_stage() -> None:
    from pydotcompute import FusedStageError, RingKernelRuntime, message
    from pydotcompute.backends.cpu_fused import FusedHandlers, FusedStep
    from pydotcompute.errors import KernelFailedError

    @message
    class SimNum:
        x: np.int64

    dt = SimNum.__record_dtype__
    steps = [FusedStep("inc", plus_one, dt, dt, np.zeros(1)),
             FusedStep("check", fails_on_3, dt, dt, np.zeros(1))]  # fmt: skip
    async with RingKernelRuntime() as rt:
        await rt.launch("chain", FusedHandlers(steps), backend="cuda", input_type=SimNum,
                        output_type=SimNum, queue_size=8)  # fmt: skip
        await rt.activate("chain")
        await rt.send("chain", SimNum(x=2))
        with pytest.raises(KernelFailedError) as info:
            await rt.receive("chain", timeout=60)
        failure = info.value.__cause__
        assert isinstance(failure, FusedStageError), repr(failure)
        assert failure.stage == "check" and failure.handler == "fails_on_3"
        assert isinstance(failure.__cause__, ValueError)
        assert "stage 'check' (handler fails_on_3) raised ValueError" in str(info.value)


@sim
async def test_cuda_stages_with_different_options_or_a_cpu_neighbour_stay_apart() -> None:
    from pydotcompute import CudaOptions, RingKernelRuntime, message
    from pydotcompute.coordinator import stage

    @message
    class SimNum:
        x: np.int64

    async with RingKernelRuntime() as rt:
        for kid, backend, opts in (
            ("g1", "cuda", CudaOptions(threads=4)),
            ("g2", "cuda", CudaOptions(threads=8)),
            ("g3", "cuda", CudaOptions(threads=8)),
            ("c1", "cpu", None),
        ):
            more = {} if opts is None else {"options": opts}
            await rt.launch(kid, plus_one, backend=backend, input_type=SimNum,
                            output_type=SimNum, queue_size=8, **more)  # fmt: skip
        g = stage(lambda i: SimNum(x=i)) >> "g1" >> "g2" >> "g3" >> "c1" >> stage(int)
        report = (await rt.deploy(g, name="apart")).explain()
        assert [s.stages for s in report.fused] == [("g2", "g3")]
        assert report.reason("g1", "g2") == "different options: the kernels' cuda options differ"
        assert report.reason("g3", "c1") == "different backend: 'g3' runs on cuda, 'c1' on cpu"
