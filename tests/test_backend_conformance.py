"""One set of behaviours, every backend: host, cpu, cuda (on the numba-cuda simulator,
in a child process) and host and cpu placed on a local Ray cluster.

What is genuinely specific to one backend stays in its own test file.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

import numpy as np
import pytest

from pydotcompute import (
    BackpressureStrategy,
    KernelFailedError,
    KernelState,
    QueueFullError,
    QueueTimeoutError,
    RingKernelRuntime,
)
from tests.conformance_kernels import Num, double, double_actor
from tests.simulator_child import SIM, parent, run_simulator_half

RAY = importlib.util.find_spec("ray") is not None

LOCAL = ["cuda"] if SIM else ["host", "cpu"]
PLACED = [] if SIM or not RAY else ["host@ray", "cpu@ray"]


def _runtime(where: str) -> RingKernelRuntime:
    return RingKernelRuntime(cluster="local" if where.endswith("@ray") else None)


async def _launch(rt: RingKernelRuntime, where: str, kid: str = "k", **options: Any) -> None:
    backend = where.partition("@")[0]
    func = double_actor if backend == "host" else double
    if backend != "host" and where.endswith("@ray"):
        options.setdefault("num_cpus", 0)
    await rt.launch(kid, func, backend=backend, input_type=Num, output_type=Num, **options)


async def _receive_n(rt: RingKernelRuntime, n: int, kid: str = "k") -> list[float]:
    return [(await rt.receive(kid, timeout=20)).x for _ in range(n)]


async def _wait_state(rt: RingKernelRuntime, state: KernelState, kid: str = "k") -> None:
    for _ in range(2000):
        if rt.get_kernel_state(kid) is state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{kid} stayed {rt.get_kernel_state(kid).name}, not {state.name}")


@pytest.mark.parametrize("where", LOCAL + PLACED)
async def test_lifecycle_order_and_deactivation(where: str) -> None:
    async with _runtime(where) as rt:
        await _launch(rt, where)
        assert rt.get_kernel_state("k") is KernelState.LAUNCHED
        await rt.activate("k")
        for i in range(12):
            await rt.send("k", Num(x=float(i)))
        assert await _receive_n(rt, 12) == [2.0 * i for i in range(12)]
        await rt.deactivate("k")
        for i in range(3):
            await rt.send("k", Num(x=float(i)))
        if where in ("host", "cpu"):
            # Held, not handed to the handler (the host actor never looks at
            # is_active: the runtime holds delivery). Placed kernels' input buffers
            # and the device's claimed records make the depth inexact elsewhere.
            await asyncio.sleep(0.05)
            tele = rt.get_telemetry("k")
            assert tele is not None
            assert (tele.queue_depth, tele.messages_processed) == (3, 12)
        early: list[float] = []
        if where == "cuda":
            # The device reads the pause command from mapped memory on its next poll:
            # records it had already claimed may still be answered.
            with pytest.raises(QueueTimeoutError):
                while True:
                    early.append((await rt.receive("k", timeout=0.3)).x)
        else:
            with pytest.raises(QueueTimeoutError, match="DEACTIVATED"):
                await rt.receive("k", timeout=0.3)
        await rt.reactivate("k")
        assert early + await _receive_n(rt, 3 - len(early)) == [0.0, 2.0, 4.0]
        # A device mirrors its counters to the host about once a millisecond.
        for _ in range(2000):
            tele = rt.get_telemetry("k")
            assert tele is not None
            if tele.messages_processed >= 15:
                break
            await asyncio.sleep(0.01)
        assert (tele.backend, tele.messages_processed) == (where.partition("@")[0], 15)
        await rt.terminate("k")
        assert rt.get_kernel_state("k") is KernelState.TERMINATED


@pytest.mark.parametrize("where", LOCAL + PLACED)
async def test_a_failure_surfaces(where: str) -> None:
    async with _runtime(where) as rt:
        await _launch(rt, where)
        await rt.activate("k")
        await rt.send("k", Num(x=1.0))
        assert await _receive_n(rt, 1) == [2.0]
        await rt.send("k", Num(x=-1.0))
        await _wait_state(rt, KernelState.FAILED)
        with pytest.raises(KernelFailedError):
            await rt.send("k", Num(x=2.0))
        assert isinstance(rt.get_error("k"), BaseException)
        tele = rt.get_telemetry("k")
        assert tele is not None and tele.errors >= 1


@pytest.mark.parametrize("where", LOCAL + PLACED)
async def test_batches(where: str) -> None:
    async with _runtime(where) as rt:
        await _launch(rt, where)
        await rt.activate("k")
        if where.startswith("host"):
            assert await rt.send_batch("k", [Num(x=float(i)) for i in range(6)]) == 6
        else:
            records = np.zeros(6, Num.__record_dtype__)
            records["x"] = np.arange(6)
            assert await rt.send_batch("k", records) == 6
        got: list[float] = []
        while len(got) < 6:
            batch = await rt.receive_batch("k", 6, timeout=20)
            got.extend(float(m["x"]) if isinstance(m, np.void) else m.x for m in batch)
        assert got == [2.0 * i for i in range(6)]


def _capacity(rt: RingKernelRuntime) -> int:
    tele = rt.get_telemetry("k")
    assert tele is not None
    return tele.queue_capacity


@pytest.mark.parametrize("where", LOCAL)
async def test_block_waits_then_times_out(where: str) -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, where, queue_size=4, backpressure="block")
        cap = _capacity(rt)
        for i in range(cap):
            await rt.send("k", Num(x=float(i)))
        with pytest.raises(QueueFullError):
            await rt.send("k", Num(x=99.0), timeout=0.2)
        # A sender that waits goes on once the kernel makes room: nothing is lost.
        sender = asyncio.ensure_future(rt.send("k", Num(x=float(cap))))
        await asyncio.sleep(0.05)
        assert not sender.done()
        await rt.activate("k")
        await asyncio.wait_for(sender, 20)
        assert await _receive_n(rt, cap + 1) == [2.0 * i for i in range(cap + 1)]
        tele = rt.get_telemetry("k")
        assert tele is not None and tele.messages_dropped == 0


@pytest.mark.parametrize("where", LOCAL)
async def test_reject_refuses_at_once(where: str) -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, where, queue_size=4, backpressure=BackpressureStrategy.REJECT)
        cap = _capacity(rt)
        for i in range(cap):
            await rt.send("k", Num(x=float(i)))
        for _ in range(3):
            with pytest.raises(QueueFullError):
                await rt.send("k", Num(x=99.0), timeout=10)  # no waiting, whatever the timeout
        tele = rt.get_telemetry("k")
        assert tele is not None and (tele.messages_rejected, tele.queue_depth) == (3, cap)
        await rt.activate("k")
        assert await _receive_n(rt, cap) == [2.0 * i for i in range(cap)]


@pytest.mark.parametrize("where", LOCAL)
async def test_drop_newest_keeps_the_first(where: str) -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, where, queue_size=4, backpressure="drop_newest")
        cap = _capacity(rt)
        for i in range(cap + 2):
            await rt.send("k", Num(x=float(i)))
        await rt.activate("k")
        assert await _receive_n(rt, cap) == [2.0 * i for i in range(cap)]
        tele = rt.get_telemetry("k")
        assert tele is not None and tele.messages_dropped == 2


@pytest.mark.parametrize("where", LOCAL)
async def test_drop_oldest_keeps_the_newest(where: str) -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, where, queue_size=4, backpressure="drop_oldest")
        cap = _capacity(rt)
        n = cap + 2
        for i in range(n):
            await rt.send("k", Num(x=float(i)))
        await rt.activate("k")
        got = []
        while not got or got[-1] != 2.0 * (n - 1):
            got.extend(await _receive_n(rt, 1))
        assert got == sorted(got) and len(got) <= cap  # in order, the oldest dropped
        if where != "cuda":  # the device may take a record before the host drops it
            assert got == [2.0 * i for i in range(n - cap, n)]
        tele = rt.get_telemetry("k")
        assert tele is not None and tele.messages_dropped == n - len(got)  # each once


@pytest.mark.parametrize("where", LOCAL)
async def test_shutdown_with_a_blocked_sender(where: str) -> None:
    rt = RingKernelRuntime()
    await _launch(rt, where, queue_size=4, backpressure="block")
    for i in range(_capacity(rt)):
        await rt.send("k", Num(x=float(i)))
    blocked = asyncio.create_task(rt.send("k", Num(x=99.0)))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    await asyncio.wait_for(rt.shutdown(timeout=5), 30)
    assert rt.get_kernel_state("k") is KernelState.TERMINATED
    done, _ = await asyncio.wait({blocked}, timeout=5)
    assert done and blocked.exception() is not None


@parent
def test_cuda_on_the_simulator() -> None:
    """The cuda rows of this suite, in a child process with the simulator on."""
    run_simulator_half(__file__, "cuda and not test_cuda_on_the_simulator", timeout=300)
