"""A bounded FIFO between asyncio tasks, with the ring backpressure strategies.

This is the queue of the ``host`` backend: one in front of each actor and one behind
it. It is built for the hot path: a put or get that does not wait is a deque
operation plus a length check, and a waiting task is woken through one future.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from pydotcompute.errors import QueueFullError, QueueTimeoutError
from pydotcompute.rings.backpressure import BackpressureStrategy

__all__ = ["Mailbox"]

_BLOCK = BackpressureStrategy.BLOCK
_REJECT = BackpressureStrategy.REJECT
_DROP_OLDEST = BackpressureStrategy.DROP_OLDEST
_DROP_NEWEST = BackpressureStrategy.DROP_NEWEST


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(_TimeoutSignal())


class Mailbox:
    """Bounded FIFO with a backpressure strategy, a delivery switch and a close state.

    ``deliver`` False holds items back from getters (a deactivated kernel) while puts
    still queue. ``close(error)`` wakes every waiter with a fresh exception from
    ``error``; with ``drain=True`` getters still receive what is queued first.
    Counters: ``enqueued``, ``dropped``, ``rejected``, ``high_water``.
    """

    __slots__ = (
        "items",
        "capacity",
        "strategy",
        "getters",
        "putters",
        "deliver",
        "error",
        "put_error",
        "drain",
        "enqueued",
        "dropped",
        "rejected",
        "high_water",
        "name",
    )

    def __init__(self, capacity: int, strategy: BackpressureStrategy, name: str = "") -> None:
        self.items: deque[Any] = deque()
        self.capacity = capacity
        self.strategy = strategy
        self.getters: deque[asyncio.Future[None]] = deque()
        self.putters: deque[asyncio.Future[None]] = deque()
        self.deliver = True
        self.error: Callable[[], BaseException] | None = None
        self.put_error: Callable[[], BaseException] = QueueFullError
        self.drain = False
        self.enqueued = 0
        self.dropped = 0
        self.rejected = 0
        self.high_water = 0
        self.name = name

    def __len__(self) -> int:
        return len(self.items)

    # -- put -------------------------------------------------------------------------

    def try_put(self, item: Any) -> bool:
        """Queue ``item`` without waiting. False means: full under BLOCK, wait for room.

        Raises ``QueueFullError`` under REJECT; DROP strategies always succeed
        (counting the drop). Senders already waiting for room go first: while any
        waits, the queue counts as full to newcomers.
        """
        return self._offer(item, bool(self.putters))

    def _offer(self, item: Any, full: bool) -> bool:
        items = self.items
        if self.error is not None:
            raise self.put_error()
        if not full and len(items) < self.capacity:
            items.append(item)
            self.enqueued += 1
            if self.getters:
                self._wake(self.getters)
            return True
        strategy = self.strategy
        if strategy is _BLOCK:
            return False
        if strategy is _DROP_OLDEST:
            items.popleft()
            items.append(item)
            self.enqueued += 1
            self.dropped += 1
            return True
        if strategy is _DROP_NEWEST:
            self.dropped += 1
            return True
        self.rejected += 1
        raise QueueFullError(f"{self.name or 'queue'} is full ({self.capacity} messages)")

    async def put(self, item: Any, timeout: float | None = None) -> None:
        """Queue ``item``, waiting for room under BLOCK; ``QueueFullError`` on timeout."""
        if self.try_put(item):
            return
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if not await self._wait(self.putters, loop, deadline):
                raise QueueFullError(
                    f"{self.name or 'queue'} stayed full for {timeout} s ({self.capacity} messages)"
                )
            if self._offer(item, False):  # woken: the room is ours, whoever else waits
                if self.putters and len(self.items) < self.capacity:
                    self.wake_putter()
                return

    # -- get -------------------------------------------------------------------------

    def try_get(self, default: Any = None) -> Any:
        """Take the oldest item if one may be delivered now, else return ``default``."""
        if self.items and self.deliver:
            item = self.items.popleft()
            if self.putters:
                self.wake_putter()
            return item
        if self.error is not None and not (self.drain and self.items):
            raise self.error()
        return default

    async def get(self, timeout: float | None = None) -> Any:
        """Take the oldest item, waiting for one; ``QueueTimeoutError`` on timeout."""
        items = self.items
        if items and self.deliver:
            item = items.popleft()
            if self.putters:
                self.wake_putter()
            return item
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self.error is not None and not (self.drain and items):
                raise self.error()
            if not await self._wait(self.getters, loop, deadline):
                raise QueueTimeoutError(
                    f"nothing arrived on {self.name or 'queue'} within {timeout} s"
                )
            if items and self.deliver:
                item = items.popleft()
                if self.putters:
                    self.wake_putter()
                return item

    async def _wait(
        self,
        waiters: deque[asyncio.Future[None]],
        loop: asyncio.AbstractEventLoop,
        deadline: float | None,
    ) -> bool:
        """Park on ``waiters`` until woken (True) or past ``deadline`` (False)."""
        fut: asyncio.Future[None] = loop.create_future()
        handle = None
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            handle = loop.call_later(remaining, _expire, fut)
        waiters.append(fut)
        # A getter's waker pops its future before setting the result; a putter's
        # stays queued (see wake_putter). Timeouts and cancellations leave both queued.
        try:
            await fut
            if waiters is self.putters:
                self._remove(waiters, fut)
            return True
        except _TimeoutSignal:
            self._remove(waiters, fut)
            return False
        except BaseException:
            if fut.cancelled() or not fut.done() or waiters is self.putters:
                self._remove(waiters, fut)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Woken, then cancelled before taking anything: pass the wake-up on
                # so no other waiter starves while items (or room) are available.
                self._pass_wakeup(waiters)
            raise
        finally:
            if handle is not None:
                handle.cancel()

    # -- control ---------------------------------------------------------------------

    def set_deliver(self, deliver: bool) -> None:
        """Open or hold back delivery to getters; opening wakes them."""
        self.deliver = deliver
        if deliver:
            self._wake_all(self.getters)

    def close(
        self,
        error: Callable[[], BaseException],
        *,
        drain: bool = False,
        put_error: Callable[[], BaseException] | None = None,
    ) -> int:
        """Refuse further puts and wake all waiters: getters with ``error()``, putters
        with ``put_error()`` (default: ``error()``).

        With ``drain`` getters first receive what is queued; without it the queued
        items are discarded and their count is returned (callers count them dropped).
        """
        self.error = error
        self.put_error = put_error or error
        self.drain = drain
        discarded = 0
        if not drain:
            discarded = len(self.items)
            self.items.clear()
        self._wake_all(self.getters)
        self._wake_all(self.putters)
        return discarded

    def wake_getter(self) -> None:
        """Wake one waiting getter (after an inline append)."""
        self._wake(self.getters)

    def wake_putter(self) -> None:
        """Wake one waiting putter (after an inline pop).

        A woken putter stays queued until it has taken its room, so newcomers keep
        seeing the queue as full meanwhile and cannot overtake it."""
        for fut in self.putters:
            if not fut.done():
                fut.set_result(None)
                return

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    @staticmethod
    def _wake_all(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    @staticmethod
    def _remove(waiters: deque[asyncio.Future[None]], fut: asyncio.Future[None]) -> None:
        # A waker may already have popped this finished future (and moved on to the
        # next waiter), between the timeout or cancellation and this task resuming.
        try:
            waiters.remove(fut)
        except ValueError:
            pass

    def _pass_wakeup(self, waiters: deque[asyncio.Future[None]]) -> None:
        if waiters is self.getters:
            if self.items and self.deliver:
                self._wake(waiters)
        elif len(self.items) < self.capacity:
            self._wake(waiters)


class _TimeoutSignal(Exception):
    """Set on a waiter's future by its timer; never escapes the mailbox."""
