"""The host backend's mailbox: waking getters, cancellation, order."""

from __future__ import annotations

import asyncio
import random

import pytest

from pydotcompute import BackpressureStrategy
from pydotcompute.backends.mailboxes import Mailbox
from pydotcompute.errors import QueueFullError, QueueTimeoutError

BLOCK = BackpressureStrategy.BLOCK


async def test_a_getter_cancelled_after_its_wake_up_leaves_the_items_queued():
    mb = Mailbox(4, BLOCK)
    waiter = asyncio.ensure_future(mb.get())
    await asyncio.sleep(0)
    assert mb.try_put("a")  # wakes the waiter: "a" is promised to it
    assert mb.try_put("b")
    waiter.cancel()  # before the waiter ran
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert [mb.try_get(), mb.try_get(), mb.try_get("none")] == ["a", "b", "none"]


async def test_a_cancelled_wake_up_passes_to_the_next_getter_in_order():
    mb = Mailbox(4, BLOCK)
    first = asyncio.ensure_future(mb.get())
    second = asyncio.ensure_future(mb.get())
    await asyncio.sleep(0)
    mb.try_put("a")  # wakes first
    mb.try_put("b")  # wakes second
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second == "a"  # the oldest item still goes out first
    assert mb.try_get() == "b"


async def test_close_discards_what_a_cancelled_getter_was_promised():
    mb = Mailbox(4, BLOCK)
    waiter = asyncio.ensure_future(mb.get())
    await asyncio.sleep(0)
    mb.try_put("a")
    waiter.cancel()
    assert mb.close(QueueFullError) == 1  # counted by the caller as dropped
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(mb) == 0 and mb.hold == 0


async def test_reopening_delivery_hands_items_over_in_order_and_frees_room():
    mb = Mailbox(2, BLOCK)
    mb.set_deliver(False)
    mb.try_put(1)
    mb.try_put(2)
    getter = asyncio.ensure_future(mb.get())
    putter = asyncio.ensure_future(mb.put(3, timeout=1))
    await asyncio.sleep(0)
    assert not getter.done() and not putter.done()
    mb.set_deliver(True)
    assert await getter == 1
    await putter
    assert [mb.try_get(), mb.try_get()] == [2, 3]


@pytest.mark.parametrize("seed", range(48))
async def test_random_interleavings_lose_nothing_and_keep_each_senders_order(seed):
    rng = random.Random(seed)
    mb = Mailbox(rng.choice([1, 2, 8]), BLOCK)
    sent: dict[int, list[int]] = {p: [] for p in range(3)}
    got: dict[str, list[tuple[int, int]]] = {"waiting": [], "polling": []}

    async def producer(p: int) -> None:
        for i in range(60):
            try:
                await mb.put((p, i), timeout=rng.choice([None, 0.001, 0.01]))
                sent[p].append(i)
            except QueueFullError:
                pass
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    async def waiting_reader() -> None:
        while True:
            task = asyncio.ensure_future(mb.get(timeout=rng.choice([None, 0.002])))
            try:
                if rng.random() < 0.4:  # cancel it, at times just after an item was put aside
                    for _ in range(rng.randrange(3)):
                        await asyncio.sleep(0)
                    task.cancel()
                await asyncio.wait({task})
            except asyncio.CancelledError:  # the test is over: stop, handing back a claim
                task.cancel()
                await asyncio.wait({task})
                if not task.cancelled() and task.exception() is None:
                    got["waiting"].append(task.result())
                raise
            if task.cancelled() or isinstance(task.exception(), QueueTimeoutError):
                continue
            got["waiting"].append(task.result())

    async def polling_reader() -> None:
        while True:
            item = mb.try_get(None)
            if item is not None:
                got["polling"].append(item)
            await asyncio.sleep(0)

    async def switch() -> None:
        while True:
            await asyncio.sleep(rng.random() * 0.003)
            mb.set_deliver(not mb.deliver)

    readers = [asyncio.ensure_future(f()) for f in (waiting_reader, polling_reader, switch)]
    await asyncio.gather(*(producer(p) for p in sent))
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    mb.set_deliver(True)
    rest = []
    while (item := mb.try_get(None)) is not None:
        rest.append(item)

    received = got["waiting"] + got["polling"] + rest
    assert sorted(received) == sorted((p, i) for p, items in sent.items() for i in items)
    for sequence in (got["waiting"], got["polling"], rest):
        for p in sent:
            mine = [i for q, i in sequence if q == p]
            assert mine == sorted(mine)


async def test_getters_with_different_timeouts_each_time_out_at_their_own_deadline():
    mb = Mailbox(4, BLOCK)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    late = asyncio.ensure_future(mb.get(timeout=0.3))  # arms the timer for t0 + 0.3
    await asyncio.sleep(0)
    early = asyncio.ensure_future(mb.get(timeout=0.05))  # earlier: the timer moves up
    for task, limit in ((early, 0.05), (late, 0.3)):
        with pytest.raises(QueueTimeoutError):
            await task
        assert limit <= loop.time() - t0 < limit + 0.2
    assert not mb.deadlines and mb.timer is None  # nothing left armed once all are gone


async def test_a_timer_armed_for_an_earlier_getter_still_serves_later_ones():
    mb = Mailbox(4, BLOCK)
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(mb.get(timeout=0.05))
    await asyncio.sleep(0)
    armed = mb.timer
    assert mb.try_put("a")
    assert await first == "a"  # the timer stays armed for the next waits
    t0 = loop.time()
    with pytest.raises(QueueTimeoutError):
        await mb.get(timeout=0.1)  # later than the armed timer: re-armed when it fires
    assert 0.1 <= loop.time() - t0 < 0.3
    assert armed is not None and armed is not mb.timer


async def test_a_getter_woken_in_time_is_not_timed_out_later():
    mb = Mailbox(4, BLOCK)
    getter = asyncio.ensure_future(mb.get(timeout=0.05))
    await asyncio.sleep(0)
    mb.try_put("a")
    assert await getter == "a"
    await asyncio.sleep(0.1)  # the timer fires with nobody past a deadline
    assert mb.try_put("b") and mb.try_get() == "b" and mb.hold == 0


async def test_closing_disarms_the_getters_timer():
    mb = Mailbox(4, BLOCK)
    getter = asyncio.ensure_future(mb.get(timeout=30))
    await asyncio.sleep(0)
    assert mb.timer is not None
    mb.close(QueueFullError)
    with pytest.raises(QueueFullError):
        await getter
    assert mb.timer is None and not mb.deadlines


def test_a_timer_armed_on_a_closed_loop_does_not_strand_a_getter_on_a_new_one():
    mb = Mailbox(4, BLOCK)

    async def wait_then_take() -> str:
        getter = asyncio.ensure_future(mb.get(timeout=0.2))
        await asyncio.sleep(0)
        mb.try_put("a")
        return await getter

    assert asyncio.run(wait_then_take()) == "a"  # leaves its timer on a closed loop

    async def time_out() -> None:
        # The deadline is later than that timer's, yet it must be armed on this loop.
        with pytest.raises(QueueTimeoutError):  # not wait_for's plain TimeoutError
            await asyncio.wait_for(mb.get(timeout=0.4), 3)

    asyncio.run(time_out())
