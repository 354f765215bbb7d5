"""Receivers of a ring kernel's output sleep on a descriptor the publisher writes.

The handshake (``rings.wake``) must never lose a wake-up, the ``cpu`` backend's
workers must signal, and nothing on the reply path may poll with an ``asyncio.sleep``
(which sleeps at least a millisecond).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from numba import njit

from pydotcompute.backends.wakeup import OutputWatcher, ReplyWakeup
from pydotcompute.errors import KernelFailedError, KernelStateError
from pydotcompute.rings.host_ops import ring_pop, ring_push
from pydotcompute.rings.host_ring import HostRing
from pydotcompute.rings.wake import ARMED, wake_signal
from pydotcompute.runtime import KernelState, RingKernelRuntime

REC = np.dtype([("a", "<i8"), ("b", "<f8")])


@njit(nogil=True)
def _publish_and_signal(buf, rec, words, base):  # type: ignore[no-untyped-def]
    placed = ring_push(buf, rec, 0, 1)
    wake_signal(words, base)
    return placed


async def test_a_waiter_wakes_when_a_record_is_published_from_another_thread() -> None:
    ring = HostRing(8, REC)
    wakeup = ReplyWakeup()
    try:
        one = np.zeros(1, REC)
        timer = threading.Timer(
            0.05, _publish_and_signal, (ring.buffer, one, wakeup.words, wakeup.base)
        )
        timer.start()
        await asyncio.wait_for(wakeup.wait(ring.buffer, None), 10)
        assert len(ring.pop_batch(4)) == 1
        assert wakeup.words[wakeup.base + ARMED] == 0  # the publisher disarmed it
        # A record already there: no sleep at all.
        _publish_and_signal(ring.buffer, one, wakeup.words, wakeup.base)
        await asyncio.wait_for(wakeup.wait(ring.buffer, None), 1)
        timer.join()
    finally:
        wakeup.close()


async def test_no_wake_up_is_lost_when_publishing_races_with_arming() -> None:
    """A publisher thread posts records at random moments; the receiver takes what is
    there or sleeps without a timeout of its own. A lost wake-up would leave it asleep
    with a record in the ring (caught by the outer 10 s guard)."""
    ring = HostRing(1024, REC)
    wakeup = ReplyWakeup()
    count = 3000
    one = np.zeros(1, REC)

    def publisher() -> None:
        rng = np.random.default_rng(3)
        for _ in range(count):
            for _ in range(int(rng.integers(0, 2000))):
                pass  # a random gap, in Python: sometimes shorter than arming takes
            _publish_and_signal(ring.buffer, one, wakeup.words, wakeup.base)

    got = 0
    out = np.zeros(64, REC)
    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        while got < count:
            n = ring_pop(ring.buffer, out, 0, 64)
            if n:
                got += n
                continue
            await asyncio.wait_for(wakeup.wait(ring.buffer, None), 10)
    finally:
        thread.join()
        wakeup.close()
    assert got == count


async def test_a_watcher_wakes_a_waiter_for_a_publisher_that_cannot_signal() -> None:
    ring = HostRing(8, REC)
    wakeup = ReplyWakeup()
    watcher = OutputWatcher(wakeup, ring.buffer, "test-watcher")
    watcher.start()
    try:
        for delay in (0.0, 0.001, 0.03):  # while spinning, and after it sleeps
            timer = threading.Timer(delay, ring_push, (ring.buffer, np.zeros(1, REC), 0, 1))
            timer.start()
            await asyncio.wait_for(wakeup.wait(ring.buffer, None), 10)
            timer.join()
            while not len(ring.pop_batch(4)):  # a wait may return before the push
                await asyncio.wait_for(wakeup.wait(ring.buffer, None), 10)
    finally:
        watcher.stop()
        wakeup.close()
    assert watcher.error == 0
    assert not any(t.name == "test-watcher" for t in threading.enumerate())


async def test_a_waiter_times_out_and_disarms() -> None:
    ring = HostRing(8, REC)
    wakeup = ReplyWakeup()
    try:
        t0 = time.monotonic()
        await wakeup.wait(ring.buffer, 0.02)
        assert time.monotonic() - t0 >= 0.015
        assert wakeup.words[wakeup.base + ARMED] == 0
    finally:
        wakeup.close()


def echo(msg, out, state):  # type: ignore[no-untyped-def]
    if msg.a < 0:
        raise RuntimeError("negative")
    out.a = msg.a
    out.b = msg.b
    return True


async def test_the_reply_path_never_sleeps_on_the_event_loop_clock(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A reply that is late (the kernel is paused when the receive starts) arrives
    through the wakeup; ``asyncio.sleep`` below a millisecond is never used."""
    short_sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float, *args: object) -> object:
        if delay < 1e-3:
            short_sleeps.append(delay)
        return await real_sleep(delay, *args)

    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo, backend="cpu", input_type=REC, output_type=REC)
        monkeypatch.setattr(asyncio, "sleep", recording_sleep)
        waiting = asyncio.ensure_future(rt.receive_batch("e", 1, timeout=10))
        one = asyncio.ensure_future(rt.receive("e", timeout=10))
        await real_sleep(0.02)
        loop = rt._kernels["e"].kernel_backend
        assert loop.control.words[1 + ARMED] == 1  # both receivers are asleep
        await rt.send_batch("e", np.array([(1, 1.5), (2, 2.5)], REC))
        await rt.activate("e")
        got = await asyncio.wait_for(asyncio.gather(waiting, one), 10)
        assert sorted([int(got[0][0]["a"]), int(got[1]["a"])]) == [1, 2]
        monkeypatch.undo()
    assert short_sleeps == []


async def test_a_sleeping_receiver_hears_that_the_kernel_failed() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo, backend="cpu", input_type=REC, output_type=REC)
        await rt.activate("e")
        waiting = asyncio.ensure_future(rt.receive("e", timeout=None))
        await asyncio.sleep(0.02)
        await rt.send_batch("e", np.array([(-1, 0.0)], REC))
        with pytest.raises(KernelFailedError):
            await asyncio.wait_for(waiting, 10)


async def test_a_sleeping_receiver_hears_that_the_kernel_was_terminated() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo, backend="cpu", input_type=REC, output_type=REC)
        await rt.activate("e")
        waiting = asyncio.ensure_future(rt.receive_batch("e", 4, timeout=None))
        await asyncio.sleep(0.02)
        await rt.terminate("e")
        with pytest.raises(KernelStateError, match="terminated"):
            await asyncio.wait_for(waiting, 10)


async def test_a_sleeping_receiver_waits_through_a_restart_and_is_woken_after_it() -> None:
    """A restart is not a failure: a receiver asleep on the kernel is not woken with an
    error while it is RESTARTING, and the restarted workers still signal it."""
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo, backend="cpu", input_type=REC, output_type=REC,
                        restart="on-failure", restart_backoff=0.2)  # fmt: skip
        await rt.activate("e")
        waiting = asyncio.ensure_future(rt.receive("e", timeout=None))
        await asyncio.sleep(0.02)  # past its native spin: asleep on the descriptor
        await rt.send_batch("e", np.array([(-1, 0.0)], REC))
        for _ in range(500):
            if rt.get_state("e") is KernelState.RESTARTING:
                break
            await asyncio.sleep(0.002)
        assert rt.get_state("e") is KernelState.RESTARTING
        await asyncio.sleep(0.05)
        assert not waiting.done()
        for _ in range(1000):
            if rt.get_state("e") is KernelState.ACTIVE:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)
        assert not waiting.done()
        await rt.send_batch("e", np.array([(7, 1.5)], REC))
        got = await asyncio.wait_for(waiting, 10)
        assert (int(got["a"]), float(got["b"])) == (7, 1.5)


async def test_outputs_queued_by_a_crashing_worker_wake_a_sleeping_receiver() -> None:
    """The outputs a batch produced before its handler raised are pushed by the host
    side of the worker, not by the compiled loop: that push signals receivers too."""
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo, backend="cpu", input_type=REC, output_type=REC,
                        restart="on-failure", restart_backoff=0.0)  # fmt: skip
        await rt.send_batch("e", np.array([(5, 2.5), (-1, 0.0)], REC))  # one batch
        waiting = asyncio.ensure_future(rt.receive("e", timeout=None))
        await asyncio.sleep(0.02)  # asleep before the kernel runs at all
        await rt.activate("e")
        got = await asyncio.wait_for(waiting, 10)
        assert (int(got["a"]), float(got["b"])) == (5, 2.5)


async def test_a_large_receive_finds_outputs_a_device_sealed_before_mirroring_published() -> None:
    """A device producer publishes through tags; the ring's `published` is a counter it
    mirrors about once a millisecond. A receive must find the sealed outputs anyway,
    whatever its max_items."""
    from pydotcompute.backends.config import RingKernelConfig
    from pydotcompute.backends.ring_fed import RingFedBackend
    from pydotcompute.rings.host_ops import ring_seal
    from pydotcompute.rings.layout import HEADER_SIZE, RingSide

    class Loop(RingFedBackend):
        async def start(self) -> None: ...

        def set_active(self, active: bool) -> None: ...

        async def stop(self, timeout: float) -> None: ...

        def telemetry(self, state: str):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    loop = Loop("k", echo, RingKernelConfig(backend="cuda"), REC, REC, print)
    loop.in_dtype = loop.out_dtype = REC
    in_ring = HostRing(8, REC, consumer_side=RingSide.DEVICE)
    out_ring = HostRing(8, REC, producer_side=RingSide.DEVICE)
    wakeup = ReplyWakeup()
    loop._attach_rings(in_ring, out_ring, wakeup)
    try:
        buf = out_ring.buffer
        for pos in range(3):  # what the device writes: record words, then the tag
            slot = HEADER_SIZE + pos * 24
            buf[slot + 8 : slot + 24] = np.array([(pos, pos / 2)], REC).view(np.uint8)
            buf[slot : slot + 8] = np.array([ring_seal(buf, slot + 8, 16, pos)]).view(np.uint8)
        assert out_ring.counters().published == 0  # not mirrored yet
        got = await loop.get_batch(1000, timeout=0.0)
        assert got["a"].tolist() == [0, 1, 2]
    finally:
        wakeup.close()
