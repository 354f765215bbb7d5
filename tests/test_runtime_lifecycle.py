"""Lifecycle of host actors: every transition, legal and illegal."""

from __future__ import annotations

import asyncio

import pytest

from pydotcompute import (
    KernelAlreadyExistsError,
    KernelNotFoundError,
    KernelState,
    KernelStateError,
    RingKernelRuntime,
    ring_kernel,
)


@ring_kernel(kernel_id="lc_echo")
async def lc_echo(ctx):
    while not ctx.should_terminate:
        msg = await ctx.receive()
        await ctx.send(msg)


async def test_full_lifecycle_states():
    async with RingKernelRuntime() as rt:
        await rt.launch("lc_echo")
        assert rt.get_kernel_state("lc_echo") is KernelState.LAUNCHED
        assert not rt.is_kernel_active("lc_echo")
        await rt.activate("lc_echo")
        assert rt.get_kernel_state("lc_echo") is KernelState.ACTIVE
        assert rt.is_kernel_active("lc_echo")
        assert rt.active_kernels == ["lc_echo"]
        await rt.deactivate("lc_echo")
        assert rt.get_kernel_state("lc_echo") is KernelState.DEACTIVATED
        await rt.reactivate("lc_echo")
        assert rt.get_kernel_state("lc_echo") is KernelState.ACTIVE
        await rt.terminate("lc_echo")
        assert rt.get_kernel_state("lc_echo") is KernelState.TERMINATED
        assert "lc_echo" not in rt.kernel_ids
        await rt.terminate("lc_echo")  # idempotent


async def test_terminating_state_is_visible_while_the_actor_winds_down():
    release = asyncio.Event()

    async def slow_exit(ctx):
        try:
            await ctx.receive()
        finally:
            await release.wait()

    async with RingKernelRuntime() as rt:
        await rt.launch("slow", slow_exit)
        await rt.activate("slow")
        task = asyncio.ensure_future(rt.terminate("slow", timeout=5))
        await asyncio.sleep(0.01)
        assert rt.get_kernel_state("slow") is KernelState.TERMINATING
        with pytest.raises(KernelStateError):
            await rt.send("slow", 1)
        release.set()
        await task
        assert rt.get_kernel_state("slow") is KernelState.TERMINATED


@pytest.mark.parametrize(
    "steps, bad",
    [
        ([], "deactivate"),
        ([], "reactivate"),
        (["activate"], "activate"),
        (["activate"], "reactivate"),
        (["activate", "deactivate"], "deactivate"),
        (["activate", "deactivate"], "activate"),
        (["terminate"], "activate"),
        (["terminate"], "deactivate"),
        (["terminate"], "reactivate"),
    ],
)
async def test_illegal_transitions_raise(steps, bad):
    async with RingKernelRuntime() as rt:
        await rt.launch("lc_echo")
        for step in steps:
            await getattr(rt, step)("lc_echo")
        before = rt.get_kernel_state("lc_echo")
        with pytest.raises(KernelStateError):
            await getattr(rt, bad)("lc_echo")
        assert rt.get_kernel_state("lc_echo") is before


async def test_duplicate_and_unknown_ids():
    async with RingKernelRuntime() as rt:
        await rt.launch("lc_echo")
        with pytest.raises(KernelAlreadyExistsError):
            await rt.launch("lc_echo")
        with pytest.raises(KernelNotFoundError) as err:
            await rt.launch("no_such_kernel")
        assert "'lc_echo'" in str(err.value)  # lists the known ids
        for call in (rt.activate, rt.terminate):
            with pytest.raises(KernelNotFoundError):
                await call("nope")
        with pytest.raises(KernelNotFoundError):
            await rt.send("nope", 1)
        with pytest.raises(KernelNotFoundError):
            await rt.receive("nope")
        with pytest.raises(KernelNotFoundError):
            rt.get_kernel_state("nope")


async def test_relaunch_after_terminate_reuses_the_id():
    async with RingKernelRuntime() as rt:
        await rt.launch("lc_echo")
        await rt.terminate("lc_echo")
        await rt.launch("lc_echo")
        await rt.activate("lc_echo")
        assert await rt.send_and_receive("lc_echo", 5, timeout=1) == 5


async def test_launch_with_function_uses_decorator_config_and_overrides():
    @ring_kernel(kernel_id="cfg", queue_size=3, backpressure="reject", auto_register=False)
    async def cfg(ctx):
        await ctx.receive()

    async with RingKernelRuntime() as rt:
        await rt.launch("cfg", cfg)
        assert rt.get_telemetry("cfg").queue_capacity == 3
        await rt.launch("cfg2", cfg, queue_size=7)
        assert rt.get_telemetry("cfg2").queue_capacity == 7
        # an undecorated function gets the runtime's default queue size
        await rt.launch("plain", _plain)
        assert rt.get_telemetry("plain").queue_capacity == 4096


async def _plain(ctx):
    await ctx.receive()


async def test_launched_kernel_gets_nothing_until_activated():
    async with RingKernelRuntime() as rt:
        await rt.launch("lc_echo")
        await rt.send("lc_echo", "queued")
        with pytest.raises(asyncio.TimeoutError):
            await rt.receive("lc_echo", timeout=0.05)
        await rt.activate("lc_echo")
        assert await rt.receive("lc_echo", timeout=1) == "queued"


async def test_actor_that_returns_is_terminated_and_outputs_stay_readable():
    async def one_shot(ctx):
        msg = await ctx.receive()
        await ctx.send(msg * 2)

    async with RingKernelRuntime() as rt:
        await rt.launch("one", one_shot)
        await rt.activate("one")
        await rt.send("one", 21)
        assert await rt.receive("one", timeout=1) == 42
        await asyncio.sleep(0)
        assert rt.get_kernel_state("one") is KernelState.TERMINATED
        with pytest.raises(KernelStateError):
            await rt.send("one", 1)
        with pytest.raises(KernelStateError):
            await rt.receive("one", timeout=0.1)


async def test_wait_active_and_is_active_follow_the_runtime():
    seen = []

    async def watcher(ctx):
        while not ctx.should_terminate:
            if not ctx.is_active:
                seen.append("waiting")
                await ctx.wait_active()
                continue
            seen.append("active")
            try:
                await ctx.receive(timeout=0.01)
            except asyncio.TimeoutError:
                pass

    async with RingKernelRuntime() as rt:
        await rt.launch("w", watcher)
        await asyncio.sleep(0.01)
        assert seen == ["waiting"]
        await rt.activate("w")
        await asyncio.sleep(0.03)
        assert "active" in seen
    assert rt.get_kernel_state("w") is KernelState.TERMINATED


async def test_runtime_refuses_work_after_shutdown():
    rt = RingKernelRuntime()
    await rt.shutdown()
    with pytest.raises(KernelStateError):
        await rt.launch("lc_echo")
