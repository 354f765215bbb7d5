"""A flow's items kept in this process: admission by the flow's bounds, inline hops."""

from __future__ import annotations

import asyncio
import bisect
import collections
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pydotcompute.coordinator.channel import Channel
from pydotcompute.coordinator.ledger import SplitFailed
from pydotcompute.coordinator.plan import Edge, Node
from pydotcompute.coordinator.records import (
    ACTIVE,
    CANCELLED,
    DEAD,
    DONE,
    FILTERED,
    DeadLetter,
    Token,
)
from pydotcompute.coordinator.retention import Retention

if TYPE_CHECKING:
    from pydotcompute.coordinator.flow import Flow

__all__ = ["Admission", "MemoryLedger"]


class Admission:
    """How many more items may enter an in-memory flow: the sum of its bounds."""

    def __init__(self, limit: int) -> None:
        self.free = limit
        self.closed = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def close(self) -> None:
        """Wake every waiting submit: each then finds the flow closed."""
        self.closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    async def acquire(self) -> None:
        while self.free <= 0 and not self.closed:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                elif self.free > 0 and self._waiters:
                    self._wake()
                raise
        self.free -= 1

    def release(self) -> None:
        self.free += 1
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


class _Item:
    __slots__ = ("dead", "finished", "reason", "state", "value", "waiters")

    def __init__(self) -> None:
        self.state = ACTIVE
        self.finished = 0.0  # time.monotonic() when it stopped being active
        self.value: Any = None
        self.dead: dict[int, DeadLetter] = {}
        self.reason = ""
        self.waiters: list[asyncio.Future[None]] = []


class MemoryLedger:
    """The items of a flow without a journal; unfinished ones are cancelled at close."""

    poll: float | None = None

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.hungry: set[int] = set()  # nothing to claim: stays empty
        self.items_by_key: dict[str, _Item] = {}
        self._parts: dict[tuple[str, int], dict[int, Any]] = {}
        self._done_order: list[str] = []
        self._done_base = 0  # entries of _done_order pruned from its front
        self._active = 0
        self._admission = Admission(0)

    # ---- lifetime -------------------------------------------------------------------
    async def open(self) -> None:
        self._admission = Admission(self.flow._capacity())

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return []

    def stop_admitting(self) -> None:
        self._admission.close()

    async def close(self, reason: str, *, cancel_items: bool) -> None:
        if not cancel_items:
            return
        for item in self.items_by_key.values():
            if item.state == ACTIVE:
                item.state, item.reason = CANCELLED, reason
                item.finished = time.monotonic()
                self._wake(item)
        self._active = 0

    # ---- what the workers hand over ---------------------------------------------------
    async def submit(self, keys: list[str], values: list[Any]) -> None:
        flow = self.flow
        for key, value in zip(keys, values, strict=True):
            if key in self.items_by_key:
                continue
            await self._admission.acquire()
            flow._check_open()
            if key in self.items_by_key:  # submitted by someone else while we waited
                self._admission.release()
                continue
            self.items_by_key[key] = _Item()
            self._active += 1
            flow._counters["submitted"] += 1
            await self._send(key, flow.plan.entry, value)

    def inline_hop(self, node: Node) -> tuple[Channel | None, Callable[[str, Any], None] | None]:
        edge = node.edges[0]
        if edge == (self.flow.plan.sink, 0):
            return None, self.finish
        return self.flow._direct.get(edge), None

    async def forward(self, node: Node, tok: Token, out: Any) -> None:
        await self._send(tok.key, node.edges[0], out)

    async def _send(self, key: str, edge: Edge, value: Any) -> None:
        """Deliver ``value`` along ``edge``."""
        flow = self.flow
        ch = flow._direct.get(edge)
        if ch is not None:
            if not ch.try_put(Token(key, edge[0], value)):
                await ch.put(Token(key, edge[0], value))
            return
        try:
            dests = flow._resolve(key, edge, value)
        except SplitFailed as f:
            self.bury(f.node.index, flow._record(key, f.node, f.value, f.exc, 1))
            return
        plan = flow.plan
        for node, port, v in dests:
            if node == plan.sink:
                self.finish(key, v)
            elif port:
                parts = self._parts.setdefault((key, node), {})
                parts[port] = v
                target = plan.nodes[node]
                if len(parts) == target.parts:
                    del self._parts[(key, node)]
                    await flow._channels[node].put(Token(key, node, plan.join_value(target, parts)))
            else:
                await flow._channels[node].put(Token(key, node, v))

    def retry_later(self, node: Node, tok: Token, attempt: int, delay: float) -> None:
        self.flow._later(delay, self._requeue, tok)

    def wake_claims(self) -> None:
        return None  # never hungry: nothing to claim

    def _requeue(self, tok: Token) -> None:
        item = self.items_by_key.get(tok.key)
        if self.flow._closed or item is None or item.state != ACTIVE:
            return
        # Already admitted, so it does not wait for room: a timer cannot await.
        self.flow._channels[tok.node].put_nowait(tok)

    # ---- item outcomes ----------------------------------------------------------------
    def bury(self, node: int, rec: DeadLetter) -> None:
        item = self.items_by_key[rec.key]
        item.dead[rec.node] = rec
        if self._end(item, DEAD):
            self.flow._counters["dead_lettered"] += 1

    def filter(self, node: Node, tok: Token) -> None:
        item = self.items_by_key[tok.key]
        if item.state != ACTIVE:
            return
        item.reason = node.name
        self.flow._counters["filtered"] += 1
        self._end(item, FILTERED)

    def finish(self, key: str, value: Any) -> None:
        """The item reached the sink with ``value``."""
        item = self.items_by_key[key]
        if item.state != ACTIVE:
            return
        item.value = value
        self.flow._counters["completed"] += 1
        self._done_order.append(key)
        self._end(item, DONE)

    def _end(self, item: _Item, state: str) -> bool:
        """Move an active item to its final ``state``; False if it had one already."""
        if item.state != ACTIVE:
            return False
        item.state = state
        item.finished = time.monotonic()
        self._active -= 1
        self._admission.release()
        self._wake(item)
        return True

    def _wake(self, item: _Item) -> None:
        for fut in item.waiters:
            if not fut.done():
                fut.set_result(None)
        item.waiters.clear()
        self.flow._changed.set()

    # ---- what callers ask -------------------------------------------------------------
    def in_flight(self) -> int:
        return self._active

    def status(self) -> dict[str, int]:
        return dict(Counter(item.state for item in self.items_by_key.values()))

    def items(self, state: str | None) -> list[str]:
        return [k for k, it in self.items_by_key.items() if state is None or it.state == state]

    def dead_letters(self) -> list[DeadLetter]:
        return [rec for it in self.items_by_key.values() for rec in it.dead.values()]

    async def retry(self, key: str) -> bool:
        item = self.items_by_key.get(key)
        if item is None or item.state != DEAD:
            return False
        records = list(item.dead.values())
        item.dead.clear()
        await self._admission.acquire()
        item.state = ACTIVE
        self._active += 1
        for rec in records:
            await self._send(key, (rec.node, 0), rec.value)
        return True

    async def prune(self, rule: Retention) -> int:
        final = {DONE, CANCELLED, FILTERED} | ({DEAD} if rule.dead_letters else set())
        # Finish times are monotonic and _done_order is in finishing order: what goes
        # of it is always a prefix.
        finished = sorted(
            (it.finished, k) for k, it in self.items_by_key.items() if it.state in final | {DEAD}
        )
        last = len(finished) if rule.keep is None else max(0, len(finished) - rule.keep)
        if rule.older_than is not None:
            cutoff = time.monotonic() - rule.older_than
            last = min(last, bisect.bisect_left(finished, (cutoff, "")))
        gone = [k for _, k in finished[:last] if self.items_by_key[k].state in final]
        for k in gone:
            del self.items_by_key[k]
        head = 0
        while head < len(self._done_order) and self._done_order[head] not in self.items_by_key:
            head += 1
        del self._done_order[:head]
        self._done_base += head
        return len(gone)

    async def final(self, key: str) -> tuple[str, Any] | None:
        item = self.items_by_key.get(key)
        if item is None:
            raise KeyError(f"flow {self.flow.name!r} has no item {key!r}")
        if item.state == DONE:
            return DONE, item.value
        if item.state == DEAD:
            return DEAD, next(iter(item.dead.values()))
        if item.state == CANCELLED:
            return CANCELLED, item.reason
        if item.state == FILTERED:
            return FILTERED, item.reason
        return None

    def waiters(self, key: str) -> list[asyncio.Future[None]]:
        return self.items_by_key[key].waiters

    async def pending(self) -> int:
        return self._active

    async def state_counts(self) -> dict[str, int]:
        return self.status()

    async def flush(self) -> None:
        return None

    async def results(self) -> AsyncGenerator[tuple[str, Any], None]:
        changed = self.flow._changed
        i = 0
        while True:
            i = max(i, self._done_base)  # what was pruned meanwhile is skipped
            while i - self._done_base >= len(self._done_order):
                if self._active == 0 or self.flow._closed:
                    return
                changed.clear()
                await changed.wait()
                i = max(i, self._done_base)
            key = self._done_order[i - self._done_base]
            i += 1
            yield key, self.items_by_key[key].value
