"""A bounded FIFO between asyncio tasks, with the ring backpressure strategies.

This is the queue of the ``host`` backend: one in front of each actor and one behind
it. It is built for the hot path: a put or get that does not wait is a deque
operation plus a length check, and a waiting task is woken through one future.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import InvalidStateError
from collections import deque
from collections.abc import Callable
from typing import Any

from pydotcompute.errors import QueueFullError, QueueTimeoutError
from pydotcompute.rings.backpressure import BackpressureStrategy

__all__ = ["Mailbox"]

_get_running_loop = asyncio.get_running_loop
_perf_ns = time.perf_counter_ns
# Getters' deadlines are kept on the monotonic clock, read directly: loop.time() is a
# Python-level call on asyncio's loops (which read this same clock). The timer is armed
# with a delay, so any loop's own clock works with it.
_monotonic = time.monotonic
_Future = asyncio.Future

_BLOCK = BackpressureStrategy.BLOCK
_REJECT = BackpressureStrategy.REJECT
_DROP_OLDEST = BackpressureStrategy.DROP_OLDEST
_DROP_NEWEST = BackpressureStrategy.DROP_NEWEST


_NEVER = float("inf")

_HELD = 1 << 62
"""Added to ``Mailbox.hold`` while delivery is held back: no queue is ever that long."""


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(_TimeoutSignal())


class Mailbox:
    """Bounded FIFO with a backpressure strategy, a delivery switch and a close state.

    ``deliver`` False holds items back from getters (a deactivated kernel) while puts
    still queue. ``close(error)`` wakes every waiter with a fresh exception from
    ``error``; with ``drain=True`` getters still receive what is queued first.
    Counters: ``enqueued``, ``dropped``, ``rejected``.

    Waiters are served in order. A woken getter has the item that woke it promised
    (``hold`` counts such promises), and a woken putter keeps its place in
    ``putters`` until it has queued its item, so a task that never waited cannot
    overtake either. The no-wait paths therefore test one field each: a put may go
    ahead while ``len(items) < room`` (``room`` is 0 while the mailbox is closed or a
    putter waits), a get while ``items and not hold``.

    A getter with a timeout is expired by one timer per mailbox, not one per wait:
    ``deadlines`` maps each such waiting getter to its deadline, and ``timer`` is armed
    for a moment no later than the earliest of them. A wait whose deadline is later than
    the armed timer adds a dict entry and nothing else; when the timer fires it expires
    the getters past their deadline and re-arms for the earliest one left. (A timer
    per wait, ``call_later`` then ``cancel``, cost about 7 us of a 29 us round trip
    through an actor that waits with a timeout on each side: asyncio keeps cancelled
    timers in its heap and compares them in Python.)
    """

    __slots__ = (
        "items",
        "capacity",
        "strategy",
        "getters",
        "putters",
        "room",
        "hold",
        "deliver",
        "error",
        "put_error",
        "drain",
        "enqueued",
        "dropped",
        "rejected",
        "name",
        "deadlines",
        "timer",
        "timer_at",
        "timer_loop",
        "sample_mask",
        "timed",
    )

    def __init__(self, capacity: int, strategy: BackpressureStrategy, name: str = "") -> None:
        self.items: deque[Any] = deque()
        self.capacity = capacity
        self.strategy = strategy
        self.getters: deque[asyncio.Future[None]] = deque()
        self.putters: deque[asyncio.Future[None]] = deque()
        self.room = capacity
        self.hold = 0
        self.deliver = True
        self.error: Callable[[], BaseException] | None = None
        self.put_error: Callable[[], BaseException] = QueueFullError
        self.drain = False
        self.enqueued = 0
        self.dropped = 0
        self.rejected = 0
        self.name = name
        self.deadlines: dict[asyncio.Future[None], float] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = _NEVER  # when ``timer`` fires
        self.timer_loop: asyncio.AbstractEventLoop | None = None
        self.sample_mask = 63  # see try_put_stamped
        self.timed = True

    def __len__(self) -> int:
        return len(self.items)

    # -- put -------------------------------------------------------------------------

    def try_put(self, item: Any) -> bool:
        """Queue ``item`` without waiting. False means: full under BLOCK, wait for room.

        Raises ``QueueFullError`` under REJECT; DROP strategies always succeed
        (counting the drop). Senders already waiting for room go first: while any
        waits, the queue counts as full to newcomers.
        """
        items = self.items
        if len(items) < self.room:  # the no-wait path: room is 0 while closed or waited on
            items.append(item)
            self.enqueued += 1
            if self.getters:
                self.wake_getter()
            return True
        return self._offer(item, bool(self.putters))

    def try_put_stamped(self, item: Any) -> bool:
        """``try_put((t, item))``: ``t`` is the enqueue time (``perf_counter_ns``) of one
        item in ``sample_mask + 1`` while ``timed``, else 1 ("not timed"). Latency is
        sampled so: enough for stable percentiles, and two clock reads off most items.
        """
        items = self.items
        n = self.enqueued
        if len(items) < self.room:  # the no-wait path, as in try_put
            self.enqueued = n + 1
            items.append((1 if n & self.sample_mask or not self.timed else _perf_ns(), item))
            if self.getters:
                self.wake_getter()
            return True
        stamped = (1 if n & self.sample_mask or not self.timed else _perf_ns(), item)
        return self._offer(stamped, bool(self.putters))

    def _offer(self, item: Any, full: bool) -> bool:
        items = self.items
        if self.error is not None:
            raise self.put_error()
        if not full and len(items) < self.capacity:
            items.append(item)
            self.enqueued += 1
            if self.getters:
                self.wake_getter()
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
        loop = _get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        putters = self.putters
        while True:
            fut = loop.create_future()
            handle = None
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._stayed_full(timeout)
                handle = loop.call_later(remaining, _expire, fut)
            putters.append(fut)
            self.room = 0
            try:
                await fut
            except _TimeoutSignal:
                self._leave(fut)
                raise self._stayed_full(timeout) from None
            except BaseException:
                self._leave(fut)
                if _woken(fut) and len(self.items) < self.capacity:
                    self.wake_putter()  # pass the room on: nobody else may be left waiting
                raise
            finally:
                if handle is not None:
                    handle.cancel()
            self._leave(fut)
            if self._offer(item, False):  # woken: the room is ours, whoever else waits
                if putters and len(self.items) < self.capacity:
                    self.wake_putter()
                return

    def _stayed_full(self, timeout: float | None) -> QueueFullError:
        return QueueFullError(
            f"{self.name or 'queue'} stayed full for {timeout} s ({self.capacity} messages)"
        )

    def _leave(self, fut: asyncio.Future[None]) -> None:
        _discard(self.putters, fut)
        if not self.putters and self.error is None:
            self.room = self.capacity

    # -- get -------------------------------------------------------------------------

    def try_get(self, default: Any = None) -> Any:
        """Take the oldest item if one may be delivered now, else return ``default``."""
        items = self.items
        if len(items) > self.hold:  # more than woken getters were promised
            item = items.popleft()
            if self.putters:
                self.wake_putter()
            return item
        if self.error is not None and not (self.drain and items):
            raise self.error()
        return default

    def take_all(self) -> list[Any]:
        """Take every queued item at once, whether or not delivery is held back
        (what a stopped kernel leaves behind)."""
        taken = list(self.items)
        self.items.clear()
        if self.putters:
            self.wake_putter()  # a woken putter passes the room on (see put)
        return taken

    async def get(self, timeout: float | None = None) -> Any:
        """Take the oldest item, waiting for one; ``QueueTimeoutError`` on timeout."""
        items = self.items
        if len(items) > self.hold:  # more than woken getters were promised
            item = items.popleft()
            if self.putters:
                self.wake_putter()
            return item
        loop = _get_running_loop()
        if timeout is not None:
            now = _monotonic()
            deadline = now + timeout
        # One frame for the whole wait: a helper coroutine per wait cost 0.4 us.
        while True:
            if self.error is not None and not (self.drain and items):
                raise self.error()
            # asyncio.Future works on any loop; loop.create_future() is one call more.
            fut: asyncio.Future[None] = _Future(loop=loop)
            if timeout is None:
                self.getters.append(fut)
                try:
                    await fut
                except BaseException:
                    self._abandon(fut)
                    raise
            else:
                if deadline <= now:
                    raise self._nothing_came(timeout)
                self.deadlines[fut] = deadline
                if deadline < self.timer_at or self.timer_loop is not loop:
                    self._arm(loop, deadline)
                self.getters.append(fut)
                try:
                    await fut
                except _TimeoutSignal:
                    _discard(self.getters, fut)
                    raise self._nothing_came(timeout) from None
                except BaseException:
                    self._abandon(fut)
                    raise
                finally:
                    del self.deadlines[fut]
            # Woken (the waker popped the future): an item, if there is one, is ours.
            hold = self.hold - 1
            self.hold = hold
            if items and hold < _HELD:
                item = items.popleft()
                if self.putters:
                    self.wake_putter()
                return item
            if timeout is not None:
                now = _monotonic()

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """Arm the getters' timer for ``when`` (monotonic) on ``loop``, in place of the
        armed one."""
        if self.timer is not None:
            self.timer.cancel()
        delay = max(0.0, when - _monotonic())
        self.timer = loop.call_later(delay, self._expire_getters, loop)
        self.timer_at = when
        self.timer_loop = loop

    def _expire_getters(self, loop: asyncio.AbstractEventLoop) -> None:
        """The timer fired: time out the getters past their deadline, re-arm for the rest."""
        self.timer = None
        self.timer_at = _NEVER
        now = _monotonic()
        nearest = None
        for fut, deadline in self.deadlines.items():
            if deadline <= now:
                _expire(fut)
            elif nearest is None or deadline < nearest:
                nearest = deadline
        if nearest is not None:
            self._arm(loop, nearest)

    def _abandon(self, fut: asyncio.Future[None]) -> None:
        """A getter leaves without taking anything (cancelled, or failed to resume)."""
        if _woken(fut):
            # Woken, then cancelled before taking its item: pass the promise on so no
            # other getter starves while items are available.
            self.hold -= 1
            if len(self.items) > self.hold:
                self.wake_getter()
        else:
            _discard(self.getters, fut)

    def _nothing_came(self, timeout: float | None) -> QueueTimeoutError:
        return QueueTimeoutError(f"nothing arrived on {self.name or 'queue'} within {timeout} s")

    # -- control ---------------------------------------------------------------------

    def set_deliver(self, deliver: bool) -> None:
        """Open or hold back delivery to getters; opening wakes one per queued item."""
        if deliver is self.deliver:
            return
        self.deliver = deliver
        if not deliver:
            self.hold += _HELD
            return
        self.hold -= _HELD
        while self.getters and len(self.items) > self.hold:
            self.wake_getter()

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
        self.room = 0
        discarded = 0
        if not drain:
            discarded = len(self.items)
            self.items.clear()
        while self.getters:
            self.wake_getter()
        if self.timer is not None:  # nobody waits for a closed mailbox's items any more
            self.timer.cancel()
            self.timer = None
            self.timer_at = _NEVER
        putters = self.putters
        while putters:
            fut = putters.popleft()
            if not fut.done():
                fut.set_result(None)
        return discarded

    def wake_getter(self) -> None:
        """Wake the first waiting getter (after an append), promising it an item."""
        getters = self.getters
        while getters:
            fut = getters.popleft()
            try:
                fut.set_result(None)
            except InvalidStateError:  # timed out or cancelled, not yet gone: skip it
                continue
            self.hold += 1
            return

    def wake_putter(self) -> None:
        """Wake one waiting putter (after an inline pop).

        A woken putter stays queued until it has taken its room, so newcomers keep
        seeing the queue as full meanwhile and cannot overtake it."""
        for fut in self.putters:
            if not fut.done():
                fut.set_result(None)
                return


def _discard(waiters: deque[asyncio.Future[None]], fut: asyncio.Future[None]) -> None:
    # A waker may already have popped this finished future (and moved on to the next
    # waiter), between its timeout, cancellation or close and this task resuming.
    try:
        waiters.remove(fut)
    except ValueError:
        pass


def _woken(fut: asyncio.Future[None]) -> bool:
    """True when ``fut`` was woken by a waker (not cancelled, not timed out)."""
    return fut.done() and not fut.cancelled() and fut.exception() is None


class _TimeoutSignal(Exception):
    """Set on a waiter's future by its timer; never escapes the mailbox."""
