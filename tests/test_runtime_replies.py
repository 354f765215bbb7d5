"""``send_and_receive`` with many requests in flight on one kernel."""

from __future__ import annotations

import asyncio

import pytest

from pydotcompute import RingKernelRuntime
from pydotcompute.errors import KernelFailedError, KernelStateError, QueueTimeoutError


async def answers_in_fours(ctx):
    """Replies only once it holds four requests: needs four callers in flight."""
    while not ctx.should_terminate:
        held = [await ctx.receive() for _ in range(4)]
        for msg in held:
            await ctx.send(("reply-to", msg))


async def slow_for_slow(ctx):
    while not ctx.should_terminate:
        msg = await ctx.receive()
        if msg == "slow":
            await asyncio.sleep(0.2)
        await ctx.send(("reply-to", msg))


async def fails_on_the_third(ctx):
    for _ in range(2):
        await ctx.receive()
    await ctx.receive()
    raise RuntimeError("third request")


async def never_answers(ctx):
    while not ctx.should_terminate:
        await ctx.receive()


async def test_concurrent_callers_are_all_in_flight_and_each_gets_its_own_reply():
    async with RingKernelRuntime() as rt:
        await rt.launch("fours", answers_in_fours)
        await rt.activate("fours")
        got = await asyncio.gather(*(rt.send_and_receive("fours", i, timeout=5) for i in range(12)))
        assert got == [("reply-to", i) for i in range(12)]


async def test_a_caller_that_gives_up_does_not_shift_the_replies_of_the_others():
    async with RingKernelRuntime() as rt:
        await rt.launch("p", slow_for_slow)
        await rt.activate("p")
        slow = asyncio.ensure_future(rt.send_and_receive("p", "slow", timeout=0.05))
        await asyncio.sleep(0)  # "slow" goes first
        others = [asyncio.ensure_future(rt.send_and_receive("p", m, timeout=5)) for m in "ab"]
        with pytest.raises(QueueTimeoutError, match="no reply from kernel 'p' within 0.05 s"):
            await slow
        assert await asyncio.gather(*others) == [("reply-to", "a"), ("reply-to", "b")]
        assert await rt.send_and_receive("p", "c", timeout=5) == ("reply-to", "c")


async def test_a_cancelled_caller_keeps_its_place():
    async with RingKernelRuntime() as rt:
        await rt.launch("p", slow_for_slow)
        await rt.activate("p")
        slow = asyncio.ensure_future(rt.send_and_receive("p", "slow", timeout=5))
        await asyncio.sleep(0.05)
        slow.cancel()
        assert await rt.send_and_receive("p", "next", timeout=5) == ("reply-to", "next")


async def test_every_waiting_caller_hears_that_the_kernel_failed():
    async with RingKernelRuntime() as rt:
        await rt.launch("f", fails_on_the_third)
        await rt.activate("f")
        calls = [rt.send_and_receive("f", i, timeout=5) for i in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, KernelFailedError) for r in results), results
        assert isinstance(results[0].__cause__, RuntimeError)


@pytest.mark.parametrize("callers", [1, 3])  # one reads its own reply; three share a reader
async def test_terminate_releases_waiting_callers_and_leaves_no_task(callers):
    async with RingKernelRuntime() as rt:
        await rt.launch("n", never_answers)
        await rt.activate("n")
        waiting = [asyncio.ensure_future(rt.send_and_receive("n", i)) for i in range(callers)]
        await asyncio.sleep(0.02)
        await rt.terminate("n", timeout=2)
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, KernelStateError) for r in results), results
        names = [t.get_name() for t in asyncio.all_tasks()]
        assert not [n for n in names if n.startswith("pydotcompute-replies")]
