"""Failures lose nothing and explain themselves: supervised restarts, outputs kept,
the message that raised named, and waits on idle kernels that say why."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pydotcompute import (
    InvalidConfigurationError,
    KernelFailedError,
    KernelState,
    QueueFullError,
    QueueTimeoutError,
    RingKernelConfig,
    RingKernelRuntime,
    ring_kernel,
)
from pydotcompute.runtime import runtime as runtime_module


async def poisoned(ctx):  # type: ignore[no-untyped-def]
    """Answers m * 10; raises on multiples of 3."""
    while True:
        m = await ctx.receive()
        if m % 3 == 0:
            raise ValueError(f"cannot handle {m}")
        await ctx.send(m * 10)


async def echo(ctx):  # type: ignore[no-untyped-def]
    while True:
        await ctx.send(await ctx.receive())


async def wait_for(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.005)):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def drain(rt: RingKernelRuntime, kid: str) -> list[object]:
    """Outputs until none comes in 0.5 s, or the kernel has failed and none is left."""
    out = []
    while True:
        try:
            out.append(await rt.receive(kid, timeout=0.5))
        except (QueueTimeoutError, KernelFailedError):
            return out


# -- without restart: nothing produced is lost, the message that raised is named -----


async def test_a_failed_actor_keeps_its_outputs_and_names_the_message(caplog) -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("a", poisoned)
        await rt.activate("a")
        for i in (1, 2, 3, 4, 5, 6):
            await rt.send("a", i)
        await wait_for(lambda: rt.get_state("a") is KernelState.FAILED)
        # The two outputs sent before the raise are still there, then the error.
        assert await rt.receive("a", timeout=1) == 10
        assert await rt.receive("a", timeout=1) == 20
        with pytest.raises(KernelFailedError) as info:
            await rt.receive("a", timeout=1)
        err = info.value
        assert err.failed_message == 3 and err.kernel_id == "a"
        assert "on message 3" in str(err) and "cannot handle 3" in str(err)
        assert __file__ in str(err)  # the actor's line, first
        assert isinstance(err.__cause__, ValueError)
        tele = rt.get_telemetry("a")
        assert (tele.errors, tele.messages_processed, tele.messages_sent) == (1, 2, 2)
        assert tele.messages_dropped == 3  # 4, 5, 6: queued behind it, never handled
        assert "cannot handle 3" in (tele.last_error or "")
        assert "3 queued message(s) discarded" in tele.last_error
    # Said once, at the failure; shutdown does not report the same inputs again.
    assert not [r for r in caplog.records if "unprocessed" in r.getMessage()]


async def test_receive_batch_drains_a_failed_actor_then_raises() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("a", poisoned)
        await rt.activate("a")
        for i in (1, 2, 3):
            await rt.send("a", i)
        await wait_for(lambda: rt.get_state("a") is KernelState.FAILED)
        assert await rt.receive_batch("a", 10, timeout=1) == [10, 20]
        with pytest.raises(KernelFailedError):
            await rt.receive_batch("a", 10, timeout=1)


# -- restart="on-failure" ----------------------------------------------------------


async def test_restart_keeps_the_queues_and_skips_the_message_that_raised(caplog) -> None:
    caplog.set_level(logging.INFO, logger="pydotcompute")
    async with RingKernelRuntime() as rt:
        await rt.launch("a", poisoned, restart="on-failure", restart_backoff=0.01)
        await rt.activate("a")
        for i in range(1, 11):
            await rt.send("a", i)
        assert await drain(rt, "a") == [10, 20, 40, 50, 70, 80, 100]
        assert rt.get_state("a") is KernelState.ACTIVE
        tele = rt.get_telemetry("a")
        assert (tele.restarts, tele.errors, tele.messages_dropped) == (3, 3, 0)
        assert "cannot handle 9" in (tele.last_error or "")
        assert rt.get_error("a").args == ("cannot handle 9",)
    by_level = [(r.levelno, r.name) for r in caplog.records if "kernel 'a'" in r.getMessage()]
    assert by_level.count((logging.WARNING, "pydotcompute.runtime")) == 3  # each crash
    restarted = [r for r in caplog.records if "restarted" in r.getMessage()]
    assert [r.levelno for r in restarted] == [logging.INFO] * 3


async def test_restarts_beyond_the_limit_leave_the_kernel_failed(caplog) -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("a", poisoned, restart="on-failure", max_restarts=1, restart_backoff=0.01)
        await rt.activate("a")
        for i in range(1, 8):
            await rt.send("a", i)
        assert await drain(rt, "a") == [10, 20, 40, 50]
        assert rt.get_state("a") is KernelState.FAILED
        with pytest.raises(KernelFailedError, match="gave up restarting") as info:
            await rt.send("a", 1)
        assert info.value.failed_message == 6
        assert rt.get_telemetry("a").restarts == 1
    failed = [r for r in caplog.records if "gave up" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.ERROR]


async def test_error_watchers_hear_each_message_that_raised_restarted_or_not() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("a", poisoned, restart="on-failure", max_restarts=1, restart_backoff=0.0)
        heard: list[tuple[object, KernelFailedError]] = []
        rt.watch_handler_errors("a", lambda m, e: heard.append((m, e)))
        await rt.activate("a")
        for i in range(1, 8):
            await rt.send("a", i)
        assert await drain(rt, "a") == [10, 20, 40, 50]
        assert [m for m, _ in heard] == [3, 6]  # restarted after 3, failed after 6
        assert all(isinstance(e, KernelFailedError) for _, e in heard)
        assert heard[0][1].failed_message == 3 and "gave up" not in str(heard[0][1])
        assert "gave up restarting" in str(heard[1][1])
        # A watcher belongs to its launch: the next kernel under the id starts with none.
        await rt.terminate("a")
        await rt.launch("a", poisoned)
        await rt.activate("a")
        await rt.send("a", 9)
        await wait_for(lambda: rt.get_state("a") is KernelState.FAILED)
        assert len(heard) == 2


async def test_crashes_older_than_the_window_are_forgotten() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "a",
            poisoned,
            restart="on-failure",
            max_restarts=1,
            restart_window=0.2,
            restart_backoff=0.0,
        )
        await rt.activate("a")
        await rt.send("a", 3)
        await wait_for(lambda: rt.get_telemetry("a").restarts == 1)
        await asyncio.sleep(0.25)  # the first restart leaves the window
        await rt.send("a", 6)
        await rt.send("a", 7)
        assert await rt.receive("a", timeout=2) == 70
        assert rt.get_telemetry("a").restarts == 2
        assert rt.get_state("a") is KernelState.ACTIVE


def test_restart_back_off_doubles_up_to_a_cap() -> None:
    cfg = RingKernelConfig(restart="on-failure", restart_backoff=0.5)
    assert [cfg.restart_delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert cfg.restart_delay(50) == runtime_module_cap()


def runtime_module_cap() -> float:
    from pydotcompute.backends.config import MAX_RESTART_BACKOFF_S

    return MAX_RESTART_BACKOFF_S


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"restart": "always"}, "restart must be one of"),
        ({"max_restarts": -2}, "max_restarts"),
        ({"max_restarts": True}, "max_restarts"),
        ({"restart_window": 0}, "restart_window"),
        ({"restart_backoff": -1}, "restart_backoff"),
    ],
)
def test_restart_options_are_checked_at_decoration(option, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidConfigurationError, match=match):

        @ring_kernel(kernel_id="bad_restart", auto_register=False, **option)
        async def bad(ctx):  # type: ignore[no-untyped-def]
            await ctx.receive()


async def test_a_restarting_kernel_takes_sends_and_keeps_state_changes() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("a", poisoned, restart="on-failure", restart_backoff=0.3)
        await rt.activate("a")
        await rt.send("a", 3)
        await wait_for(lambda: rt.get_state("a") is KernelState.RESTARTING)
        await rt.send("a", 4)  # queued for the restarted actor
        await rt.deactivate("a")  # applied when the restart completes
        with pytest.raises(QueueTimeoutError, match="RESTARTING after a crash"):
            await rt.receive("a", timeout=0.05)
        await wait_for(lambda: rt.get_state("a") is KernelState.DEACTIVATED)
        with pytest.raises(QueueTimeoutError):
            await rt.receive("a", timeout=0.05)
        await rt.reactivate("a")
        assert await rt.receive("a", timeout=1) == 40


async def test_terminate_during_the_back_off_ends_it_without_a_restart() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("a", poisoned, restart="on-failure", restart_backoff=5.0)
        await rt.activate("a")
        await rt.send("a", 3)
        await rt.send("a", 4)
        await wait_for(lambda: rt.get_state("a") is KernelState.RESTARTING)
        await rt.terminate("a", timeout=1)
        assert rt.get_state("a") is KernelState.TERMINATED
        assert rt.get_telemetry("a").restarts == 0
        leftover = [t for t in asyncio.all_tasks() if "restart" in t.get_name()]
        assert leftover == []


async def test_send_and_receive_callers_keep_their_replies_across_a_restart() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("a", poisoned, restart="on-failure", restart_backoff=0.01)
        await rt.activate("a")
        # Alone: the caller whose request raised is told, not left waiting.
        with pytest.raises(KernelFailedError, match="on message 3"):
            await rt.send_and_receive("a", 3, timeout=2)
        assert await rt.send_and_receive("a", 4, timeout=2) == 40
        # Many in flight: each gets its own reply, the one that raised its error.
        results = await asyncio.gather(
            *(rt.send_and_receive("a", i, timeout=2) for i in (5, 6, 7, 8)),
            return_exceptions=True,
        )
        assert results[0] == 50 and results[2:] == [70, 80]
        assert isinstance(results[1], KernelFailedError)


# -- waits on a kernel that is not active -------------------------------------------


async def test_a_timeout_on_a_kernel_never_activated_says_so() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo, queue_size=1)
        await rt.send("e", 1)
        with pytest.raises(QueueTimeoutError, match=r"never activated.*rt.activate\('e'\)"):
            await rt.receive("e", timeout=0.05)
        with pytest.raises(QueueFullError, match="never activated"):
            await rt.send("e", 2, timeout=0.05)
        await rt.activate("e")
        await rt.deactivate("e")
        await asyncio.sleep(0.01)
        with pytest.raises(QueueTimeoutError, match=r"DEACTIVATED.*rt.reactivate\('e'\)"):
            await rt.receive("e", timeout=0.05)
        await rt.reactivate("e")
        assert await rt.receive("e", timeout=1) == 1
        with pytest.raises(QueueTimeoutError) as info:  # active: nothing to explain
            await rt.receive("e", timeout=0.05)
        assert "activ" not in str(info.value)


async def test_a_wait_without_timeout_on_an_idle_kernel_warns_once(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(runtime_module, "INACTIVE_WAIT_WARNING_S", 0.05)
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo)
        for _ in range(2):
            waiting = asyncio.ensure_future(rt.receive("e"))
            await asyncio.sleep(0.15)
            assert not waiting.done()
            waiting.cancel()
        warned = [r for r in caplog.records if "no timeout" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING
        assert warned[0].name == "pydotcompute.runtime"
        assert "rt.activate('e')" in warned[0].getMessage()
        # A wait that is answered in time says nothing.
        await rt.activate("e")
        await rt.send("e", 5)
        assert await rt.receive("e") == 5


# -- logging -----------------------------------------------------------------------


def test_the_library_installs_no_log_handlers() -> None:
    import pydotcompute  # noqa: F401

    for name in ("pydotcompute", "pydotcompute.runtime", "pydotcompute.backends"):
        assert logging.getLogger(name).handlers == []


async def test_no_log_line_per_message(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="pydotcompute")
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo)
        await rt.activate("e")
        for i in range(200):
            assert await rt.send_and_receive("e", i, timeout=1) == i
    assert len([r for r in caplog.records if r.name.startswith("pydotcompute")]) < 10
