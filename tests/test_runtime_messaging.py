"""Messaging through host actors: failure, shutdown, telemetry, routing.

Backpressure and deactivation, the same on every backend, are in
test_backend_conformance.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from pydotcompute import (
    InvalidConfigurationError,
    KernelFailedError,
    KernelState,
    QueueTimeoutError,
    RingKernelRuntime,
    ring_kernel,
)
from pydotcompute.backends.host import LATENCY_SAMPLE_EVERY


async def echo(ctx):
    while not ctx.should_terminate:
        await ctx.send(await ctx.receive())


async def never_reads(ctx):
    # Waits on the runtime's own signal, so shutdown ends it at once (an actor waiting
    # on something else is given shutdown's whole timeout before it is cancelled).
    while not ctx.should_terminate:
        await ctx.wait_active()


@pytest.mark.parametrize("bad", [dict(backpressure="sometimes"), dict(queue_size=0)])
def test_bad_configuration_fails_at_decoration_time(bad):
    with pytest.raises(InvalidConfigurationError):

        @ring_kernel(kernel_id="bad", auto_register=False, **bad)
        async def k(ctx):
            pass


async def test_receive_timeout_is_catchable_as_asyncio_and_builtin_timeout():
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo)
        await rt.activate("e")
        for exc_type in (QueueTimeoutError, asyncio.TimeoutError, TimeoutError):
            with pytest.raises(exc_type):
                await rt.receive("e", timeout=0.01)


async def test_ctx_receive_timeout_raises_queue_timeout():
    caught = asyncio.get_running_loop().create_future()

    async def waiter(ctx):
        try:
            await ctx.receive(timeout=0.01)
        except asyncio.TimeoutError as exc:
            caught.set_result(exc)

    async with RingKernelRuntime() as rt:
        await rt.launch("w", waiter)
        await rt.activate("w")
        assert isinstance(await asyncio.wait_for(caught, 1), QueueTimeoutError)


async def test_crash_goes_failed_and_is_chained_into_later_calls():
    class Boom(RuntimeError):
        pass

    async def crasher(ctx):
        msg = await ctx.receive()
        raise Boom(f"bad message {msg}")

    async with RingKernelRuntime() as rt:
        await rt.launch("c", crasher)
        await rt.activate("c")
        waiting = asyncio.ensure_future(rt.receive("c"))  # must not hang
        await rt.send("c", 7)
        with pytest.raises(KernelFailedError) as err:
            await asyncio.wait_for(waiting, 1)
        assert isinstance(err.value.__cause__, Boom)
        assert rt.get_kernel_state("c") is KernelState.FAILED
        assert isinstance(rt.get_error("c"), Boom)
        for call in (rt.send("c", 1), rt.receive("c"), rt.activate("c")):
            with pytest.raises(KernelFailedError) as err:
                await call
            assert "bad message 7" in str(err.value.__cause__)
        assert rt.get_telemetry("c").errors == 1
        # relaunching a failed kernel counts as a restart
        await rt.launch("c", echo)
        assert rt.get_telemetry("c").restarts == 1


async def test_blocked_sender_is_released_when_kernel_fails():
    async def crash_later(ctx):
        await asyncio.sleep(0.02)
        raise ValueError("late crash")

    async with RingKernelRuntime() as rt:
        await rt.launch("c", crash_later, queue_size=1)
        await rt.send("c", 1)
        with pytest.raises(KernelFailedError):
            await asyncio.wait_for(rt.send("c", 2), 1)


async def test_shutdown_with_actors_blocked_in_receive_finishes_in_time():
    cleaned = []

    async def stuck(ctx):
        try:
            await ctx.receive()  # no timeout, nothing ever arrives
        finally:
            cleaned.append(ctx.kernel_id)

    rt = RingKernelRuntime()
    for i in range(5):
        await rt.launch(f"s{i}", stuck)
        if i % 2:
            await rt.activate(f"s{i}")
    t0 = time.monotonic()
    await rt.shutdown(timeout=2)
    assert time.monotonic() - t0 < 1.0
    assert sorted(cleaned) == [f"s{i}" for i in range(5)]
    leftover = [t for t in asyncio.all_tasks() if t.get_name().startswith("pydotcompute")]
    assert leftover == []


async def test_shutdown_cancels_an_actor_that_ignores_termination():
    async def busy(ctx):
        while True:  # never checks should_terminate, never receives
            await asyncio.sleep(0.01)

    rt = RingKernelRuntime()
    await rt.launch("busy", busy)
    await rt.activate("busy")
    t0 = time.monotonic()
    await rt.shutdown(timeout=0.2)
    assert time.monotonic() - t0 < 1.5
    assert rt.get_kernel_state("busy") is KernelState.TERMINATED


async def test_send_to_routes_kernel_to_kernel():
    async def forward(ctx):
        while True:
            await ctx.send_to("sink", (await ctx.receive()) + 1)

    async with RingKernelRuntime() as rt:
        await rt.launch("fwd", forward)
        await rt.launch("sink", echo)
        await rt.activate("fwd")
        await rt.activate("sink")
        await rt.send("fwd", 1)
        assert await rt.receive("sink", timeout=1) == 2


async def test_typed_kernels_check_message_types():
    @ring_kernel(kernel_id="typed", input_type=int, output_type=str, auto_register=False)
    async def typed(ctx):
        while True:
            msg = await ctx.receive()
            await ctx.send(msg if msg < 0 else str(msg))

    async with RingKernelRuntime() as rt:
        await rt.launch("typed", typed)
        await rt.activate("typed")
        with pytest.raises(TypeError, match="takes int, got str"):
            await rt.send("typed", "x")
        assert await rt.send_and_receive("typed", 3, timeout=1) == "3"
        await rt.send("typed", -1)  # the actor sends an int: its own TypeError fails it
        with pytest.raises(KernelFailedError):
            await rt.receive("typed", timeout=1)


async def test_telemetry_counts_are_exact():
    async with RingKernelRuntime(enable_telemetry=True) as rt:
        await rt.launch("e", echo, queue_size=64)
        await rt.activate("e")
        for i in range(320):
            assert await rt.send_and_receive("e", i, timeout=1) == i
        t = rt.get_telemetry("e")
        assert t.messages_processed >= 319  # the last one completes at the next receive
        assert t.messages_sent == 320
        assert (t.messages_dropped, t.messages_rejected, t.errors, t.queue_depth) == (0, 0, 0, 0)
        assert t.throughput > 0
        assert t.latency_p50_us is not None and 0 < t.latency_p50_us <= t.latency_p99_us
        assert sum(t.latency_buckets) == 320 // LATENCY_SAMPLE_EVERY  # sampled
        assert t.backend == "host" and t.state == "ACTIVE"
        assert set(rt.get_all_telemetry()) == {"e"}


async def test_telemetry_off_gives_no_snapshots_but_still_counts():
    async with RingKernelRuntime(enable_telemetry=False) as rt:
        await rt.launch("e", echo, queue_size=4, backpressure="drop_newest")
        for i in range(6):
            await rt.send("e", i)  # 2 dropped while not active: counted all the same
        await rt.activate("e")
        assert [await rt.receive("e", timeout=1) for _ in range(4)] == [0, 1, 2, 3]
        for i in range(50):
            await rt.send_and_receive("e", i, timeout=1)
        assert rt.get_telemetry("e") is None and rt.get_all_telemetry() == {}
        summary = rt.get_summary()
        assert summary["total_messages_dropped"] == summary["messages_dropped"] == 2
        assert summary["total_messages_processed"] >= 53  # the last completes later
        assert summary["kernel_count"] == 1 and summary["total_errors"] == 0


async def test_two_runtimes_share_nothing():
    async with RingKernelRuntime() as a, RingKernelRuntime() as b:
        await a.launch("x", echo)
        await b.launch("x", echo)  # same id, separate runtime: no conflict
        await a.activate("x")
        await a.send("x", "for a")
        assert b.get_telemetry("x").queue_depth == 0
        assert await a.receive("x", timeout=1) == "for a"
        await b.terminate("x")
        assert a.get_kernel_state("x") is KernelState.ACTIVE


def test_import_has_no_side_effects():
    code = (
        "import asyncio, threading, sys\n"
        "policy = asyncio.get_event_loop_policy()\n"
        "n = threading.active_count()\n"
        "import pydotcompute\n"
        "assert asyncio.get_event_loop_policy() is policy\n"
        "assert threading.active_count() == n, threading.enumerate()\n"
        "assert 'cupy' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=".")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


async def test_outputs_dropped_as_newest_still_count_as_sent():
    async def three(ctx):
        await ctx.receive()
        for i in range(3):
            await ctx.send(i)

    async with RingKernelRuntime() as rt:
        await rt.launch("t", three, output_queue_size=1, backpressure="drop_newest")
        await rt.activate("t")
        await rt.send("t", "go")
        await asyncio.sleep(0.02)  # nobody reads meanwhile: 0 fills the output queue
        t = rt.get_telemetry("t")
        assert (t.messages_sent, t.messages_dropped, t.messages_processed) == (3, 2, 1)
        assert await rt.receive("t", timeout=1) == 0
