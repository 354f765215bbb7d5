"""A bounded FIFO between stages that hands items out in batches.

Taking many items per wake-up is what keeps the per-item cost of the in-memory path
low; the bound is what gives backpressure. Room can be reserved before an await (the
journal claimer does that) so a bounded channel never overfills.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

__all__ = ["Channel"]


class Channel:
    """Bounded FIFO for one event loop: ``put`` waits for room, ``take`` for items."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.reserved = 0
        self._items: deque[Any] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def free(self) -> int:
        return self.capacity - len(self._items) - self.reserved

    def reserve(self, n: int) -> None:
        """Hold ``n`` places for items that ``put_nowait`` will add after an await."""
        self.reserved += n

    def unreserve(self, n: int) -> None:
        self.reserved -= n
        for _ in range(n):
            if not self._putters:
                break
            self._wake(self._putters)

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def _wait(
        self, waiters: deque[asyncio.Future[None]], timeout: float | None = None
    ) -> None:
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            if timeout is None:
                await fut
            else:
                await asyncio.wait_for(fut, timeout)
        except BaseException:
            fut.cancel()
            # A wake-up meant for us must go to the next waiter, or it is lost.
            if fut in waiters:
                waiters.remove(fut)
            elif fut.done() and not fut.cancelled():
                self._wake(waiters)
            raise

    async def put(self, item: Any) -> None:
        while len(self._items) + self.reserved >= self.capacity:
            await self._wait(self._putters)
        self._items.append(item)
        self._wake(self._getters)

    def try_put(self, item: Any) -> bool:
        """Add ``item`` if there is room now; False otherwise."""
        if len(self._items) + self.reserved >= self.capacity:
            return False
        self._items.append(item)
        if self._getters:
            self._wake(self._getters)
        return True

    def put_nowait(self, item: Any) -> None:
        """Add without waiting: for room reserved earlier or for items already counted."""
        self._items.append(item)
        self._wake(self._getters)

    async def take(self, max_items: int, timeout: float | None = None) -> list[Any]:
        """Up to ``max_items`` items; waits for the first, then (with ``timeout``) until
        ``max_items`` are there or ``timeout`` seconds have passed."""
        while not self._items:
            await self._wait(self._getters)
        if timeout is not None and len(self._items) < max_items:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while len(self._items) < max_items:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    await self._wait(self._getters, left)
                except asyncio.TimeoutError:
                    break
        n = min(max_items, len(self._items))
        out = [self._items.popleft() for _ in range(n)]
        for _ in range(n):
            if not self._putters:
                break
            self._wake(self._putters)
        if self._items:
            self._wake(self._getters)
        return out

    def clear(self) -> list[Any]:
        out = list(self._items)
        self._items.clear()
        return out
