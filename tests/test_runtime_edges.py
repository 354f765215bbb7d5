"""Races and edge cases of host actors, the mailbox and the runtime's lifecycle."""

from __future__ import annotations

import asyncio

import pytest

from pydotcompute import (
    BackpressureStrategy,
    KernelFailedError,
    KernelState,
    KernelStateError,
    RingKernelRuntime,
)
from pydotcompute.backends.mailboxes import Mailbox


async def echo(ctx):
    while not ctx.should_terminate:
        await ctx.send(await ctx.receive())


async def test_a_getter_cancelled_as_an_item_arrives_raises_cancelled():
    mb = Mailbox(4, BackpressureStrategy.BLOCK)
    waiter = asyncio.ensure_future(mb.get())
    await asyncio.sleep(0)
    waiter.cancel()
    mb.try_put(1)  # wakes the future the cancellation already finished
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert mb.try_get() == 1  # nothing was lost


async def test_an_actor_cancelled_from_elsewhere_fails_and_wakes_its_callers():
    async def victim(ctx):
        await ctx.receive()
        f = asyncio.get_running_loop().create_future()
        f.cancel()
        await f  # an awaited operation was cancelled: the actor unwinds with CancelledError

    async with RingKernelRuntime() as rt:
        await rt.launch("v", victim)
        await rt.activate("v")
        waiting = asyncio.ensure_future(rt.receive("v"))  # no timeout: must not hang
        await rt.send("v", 1)
        with pytest.raises(KernelFailedError):
            await asyncio.wait_for(waiting, 2)
        assert rt.get_kernel_state("v") is KernelState.FAILED


async def test_terminate_mid_message_lets_the_actor_finish_and_keeps_its_output():
    async def slow_upper(ctx):
        while not ctx.should_terminate:
            text = await ctx.receive()
            await asyncio.sleep(0.05)
            await ctx.send(text.upper())

    async with RingKernelRuntime() as rt:
        await rt.launch("u", slow_upper)
        await rt.activate("u")
        await rt.send("u", "a")
        await asyncio.sleep(0.01)  # the actor holds "a"
        await rt.terminate("u", timeout=2)
        assert rt.get_kernel_state("u") is KernelState.TERMINATED
        assert await rt.receive("u", timeout=1) == "A"


async def test_outputs_sent_before_a_failure_are_kept():
    async def send_then_crash(ctx):
        await ctx.send(1)
        await ctx.send(2)
        raise ValueError("boom")

    async with RingKernelRuntime() as rt:
        await rt.launch("c", send_then_crash)
        await rt.activate("c")
        await asyncio.sleep(0.01)
        assert rt.get_kernel_state("c") is KernelState.FAILED
        tele = rt.get_telemetry("c")
        assert (tele.messages_dropped, tele.output_queue_depth) == (0, 2)
        assert await rt.receive_batch("c", 5, timeout=1) == [1, 2]
        with pytest.raises(KernelFailedError, match="boom"):
            await rt.receive("c", timeout=1)


async def test_receive_batch_returns_what_it_took_before_the_queue_closed():
    async def three(ctx):
        for i in range(3):
            await ctx.send(i)

    async with RingKernelRuntime() as rt:
        await rt.launch("t", three)
        await rt.activate("t")
        await asyncio.sleep(0.01)
        assert rt.get_kernel_state("t") is KernelState.TERMINATED
        assert await rt.receive_batch("t", 10, timeout=1) == [0, 1, 2]
        with pytest.raises(KernelStateError):
            await rt.receive_batch("t", 10, timeout=1)


async def test_cancelling_a_terminate_call_does_not_fail_the_kernel():
    release = asyncio.Event()

    async def slow_exit(ctx):
        try:
            await ctx.receive()
        finally:
            await release.wait()

    async with RingKernelRuntime() as rt:
        await rt.launch("s", slow_exit)
        await rt.activate("s")
        call = asyncio.ensure_future(rt.terminate("s", timeout=5))
        await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert rt.get_kernel_state("s") is KernelState.TERMINATING
        release.set()
        await rt.terminate("s")  # waits for the stop already under way
        assert rt.get_kernel_state("s") is KernelState.TERMINATED


async def test_shutdown_waits_for_a_terminate_already_under_way():
    release = asyncio.Event()
    finished = []

    async def slow_exit(ctx):
        try:
            await ctx.receive()
        finally:
            await release.wait()
            finished.append(True)

    rt = RingKernelRuntime()
    await rt.launch("s", slow_exit)
    await rt.activate("s")
    first = asyncio.ensure_future(rt.terminate("s", timeout=5))
    await asyncio.sleep(0.01)
    asyncio.get_running_loop().call_later(0.05, release.set)
    await rt.shutdown(timeout=5)
    assert finished == [True] and rt.get_kernel_state("s") is KernelState.TERMINATED
    await first


async def test_relaunch_is_refused_while_the_failed_kernels_task_still_runs():
    released = asyncio.Event()

    async def stubborn(ctx):
        # ignores cancellation until released (bounded, so a failing test cannot hang)
        for _ in range(500):
            if released.is_set():
                return
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    async with RingKernelRuntime() as rt:
        await rt.launch("x", stubborn)
        await rt.activate("x")
        with pytest.raises(KernelStateError, match="ignored cancellation"):
            await rt.terminate("x", timeout=0.05)
        assert rt.get_kernel_state("x") is KernelState.FAILED
        with pytest.raises(KernelStateError, match="still running"):
            await rt.launch("x", echo)  # its old task has not gone away
        released.set()
        await rt.launch("x", echo)  # once it has, relaunching works
        await rt.activate("x")
        assert await rt.send_and_receive("x", 5, timeout=1) == 5
        assert rt.get_telemetry("x").restarts == 1


async def test_a_reply_that_comes_after_its_caller_gave_up_goes_to_nobody():
    async def slow_for_slow(ctx):
        while True:
            msg = await ctx.receive()
            if msg == "slow":
                await asyncio.sleep(0.1)
            await ctx.send(("reply-to", msg))

    async with RingKernelRuntime() as rt:
        await rt.launch("p", slow_for_slow)
        await rt.activate("p")
        with pytest.raises(asyncio.TimeoutError):
            await rt.send_and_receive("p", "slow", timeout=0.02)
        assert await rt.send_and_receive("p", "fast", timeout=1) == ("reply-to", "fast")


async def test_a_blocked_sender_is_not_overtaken_by_later_ones():
    mb = Mailbox(1, BackpressureStrategy.BLOCK)
    mb.try_put("x")
    early = asyncio.ensure_future(mb.put("early", timeout=0.5))
    await asyncio.sleep(0)
    taken = [mb.try_get()]
    assert mb.try_put("late") is False  # the queue belongs to the waiting sender first
    await asyncio.sleep(0)
    await early
    taken.append(mb.try_get())
    assert taken == ["x", "early"]


async def test_runtime_send_does_not_overtake_a_blocked_sender():
    async with RingKernelRuntime() as rt:
        await rt.launch("b", echo, queue_size=1)
        await rt.send("b", 0)
        early = asyncio.ensure_future(rt.send("b", "early", timeout=1))
        await asyncio.sleep(0)
        await rt.activate("b")
        late = asyncio.ensure_future(rt.send("b", "late", timeout=1))
        await asyncio.gather(early, late)
        got = [await rt.receive("b", timeout=1) for _ in range(3)]
        assert got == [0, "early", "late"]


async def test_a_waiting_receive_is_not_overtaken_by_a_reader_that_never_waited():
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo)
        await rt.activate("e")
        waiting = asyncio.ensure_future(rt.receive("e", timeout=0.5))
        await asyncio.sleep(0)  # parked on the empty output queue
        await rt.send("e", "x")  # wakes the actor; this task runs again right after it
        await asyncio.sleep(0)  # the actor echoes "x", waking the parked receive
        # This task runs before the woken receive resumes: "x" is promised to it.
        with pytest.raises(asyncio.TimeoutError):
            await rt.receive("e", timeout=0.05)
        assert await waiting == "x"


async def test_a_woken_getter_keeps_its_item_against_try_get():
    mb = Mailbox(4, BackpressureStrategy.BLOCK)
    waiter = asyncio.ensure_future(mb.get(timeout=0.5))
    await asyncio.sleep(0)
    mb.try_put(1)
    assert mb.try_get("none") == "none"
    assert await waiter == 1


async def test_a_message_counts_as_processed_only_once_its_output_is_queued():
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo, output_queue_size=1)
        await rt.activate("e")
        await rt.send("e", 1)
        await rt.send("e", 2)
        await asyncio.sleep(0.05)  # 1 fills the output queue; the echo of 2 waits for room
        assert rt.get_telemetry("e").messages_processed == 1
        assert await rt.receive("e", timeout=1) == 1
        assert await rt.receive("e", timeout=1) == 2
        await asyncio.sleep(0.01)
        assert rt.get_telemetry("e").messages_processed == 2


async def test_a_message_whose_output_was_cut_off_by_terminate_is_not_processed():
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo, output_queue_size=1)
        await rt.activate("e")
        await rt.send("e", 1)
        await rt.send("e", 2)
        await asyncio.sleep(0.05)  # nobody reads: the echo of 2 waits for room
        await rt.terminate("e", timeout=0.05)  # ... until it is cancelled
        assert rt.get_telemetry("e").messages_processed == 1
        assert await rt.receive("e", timeout=1) == 1
