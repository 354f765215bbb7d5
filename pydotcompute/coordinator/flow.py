"""Running a compiled graph: workers per stage, bounded channels, retries, dead letters.

Without a journal everything lives in this process. With one, every hop is also written
to the journal (behind the work, group-committed, in order) and idle capacity is filled
by claiming tokens from it: fresh submissions, items another process left behind, joins
completed by the writer and retries whose back-off has passed.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import logging
import pickle
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from datetime import timedelta
from typing import Any

from pydotcompute.coordinator.channel import Channel
from pydotcompute.coordinator.journal import (
    Dest,
    Events,
    JournalConfig,
    JournalSession,
    unreadable,
)
from pydotcompute.coordinator.kernel_replies import FILTERED_OUT
from pydotcompute.coordinator.log_throttle import LogThrottle
from pydotcompute.coordinator.plan import Edge, Node, Plan
from pydotcompute.coordinator.progress import ItemProgress
from pydotcompute.coordinator.progress import stderr_is_terminal as _progress_shown
from pydotcompute.coordinator.records import (
    ACTIVE,
    CANCELLED,
    DEAD,
    DONE,
    FILTERED,
    DeadLetter,
    Token,
    decode,
    encode,
)
from pydotcompute.coordinator.retention import BATCH, Retention, seconds
from pydotcompute.coordinator.retry import RetryPolicy
from pydotcompute.coordinator.runners import Runner, make_runner, refuse_deploy_while_spawning
from pydotcompute.errors import (
    FlowClosedError,
    ItemFailedError,
    ItemFilteredError,
    JournalError,
    MessageSerializationError,
)

__all__ = ["Flow"]

log = logging.getLogger("pydotcompute.coordinator")

TAKE = 64  # items a single-worker stage takes per wake-up
NO_RETRY = RetryPolicy()


class _SplitFailed(Exception):
    def __init__(self, node: Node, value: Any, exc: Exception) -> None:
        self.node, self.value, self.exc = node, value, exc


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


def check_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    raise TypeError(f"an item key is a str (or an int, stored as str), got {type(key).__name__}")


class Flow:
    """A deployed graph. Create it with ``deploy``; close it with ``close()`` or ``async with``."""

    def __init__(
        self,
        plan: Plan,
        *,
        name: str,
        runtime: Any = None,
        journal: JournalConfig | None = None,
    ) -> None:
        self.plan = plan
        self.name = name
        self.runtime = runtime
        self.owner = uuid.uuid4().hex
        self._journal_cfg = journal
        self.journal: JournalSession | None = None
        self._channels: dict[int, Channel] = {}
        self._busy: Counter[int] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self._runners: list[Runner] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._counters = dict.fromkeys(
            ("submitted", "completed", "filtered", "retried", "dead_lettered", "lost_leases"), 0
        )
        self._closed = False
        self._error: BaseException | None = None
        self._log = LogThrottle(log)  # retries, dead letters, lost leases: not per item
        self._changed = asyncio.Event()  # something finished: drain/results/result look again
        self._claim_wake = asyncio.Event()
        self._hungry: set[int] = set()
        # in-memory state
        self._items: dict[str, _Item] = {}
        self._parts: dict[tuple[str, int], dict[int, Any]] = {}
        self._done_order: list[str] = []
        self._done_base = 0  # entries of _done_order pruned from its front
        self._active = 0
        self._admission = Admission(0)
        self._local_waiters: dict[str, list[asyncio.Future[None]]] = {}

    # ---- lifetime -------------------------------------------------------------------
    async def start(self) -> Flow:
        for node in self.plan.calls:
            st = node.stage
            capacity = st.buffer if st is not None else 64
            if node.batch_count:
                capacity = max(capacity, node.batch_count)
            self._channels[node.index] = Channel(capacity)
        limit = sum(ch.capacity for ch in self._channels.values()) + sum(
            self._take_size(n) * self._workers(n) for n in self.plan.calls
        )
        self._admission = Admission(limit)
        # Edges that lead straight to a call node's input: the common hop, sent without
        # looking at the plan again.
        self._direct = {
            (n.index, 0): self._channels[n.index]
            for n in self.plan.calls
            if n.index in self._channels
        }
        refuse_deploy_while_spawning()
        self._key_prefix = uuid.uuid4().hex[:16]
        self._key_count = itertools.count()
        try:
            if self._journal_cfg is not None:
                self.journal = JournalSession(self._journal_cfg, self.name, self.plan, self.owner)
                self.journal.on_events = self._on_events
                self.journal.on_error = self._on_journal_error
                await self.journal.open()
                if self.journal.resumed:
                    log.info(
                        "flow %r on journal %s: %d unfinished items found; resuming them",
                        self.name,
                        self.journal.journal.where,
                        self.journal.resumed,
                    )
            for node in self.plan.calls:
                for _ in range(self._workers(node)):
                    runner = make_runner(node.stage, self.runtime)
                    self._runners.append(runner)
                    await runner.start()
                    self._spawn(self._work(node, runner))
            # Worker processes have started side by side; a deploy fails here if one
            # cannot load its stage. (One by one: runners with nothing to wait for do not
            # yield to the loop, so the flow's first ops go to the writer as before.)
            for runner in self._runners:
                await runner.ready()
            if self.journal is not None:
                self._spawn(self._claim_loop())
                rule = self.journal.journal.retention
                if rule is not None:
                    self._spawn(self._retention_loop(rule))
        except BaseException:
            await self._shutdown("deploy failed", cancel_items=False)
            raise
        return self

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # A worker never ends on its own; if one raised, the flow must stop loudly.
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            log.error("flow %r stopped: %s", self.name, exc, exc_info=exc)
            self._error = exc
            for t in self._tasks:
                t.cancel()
            self._changed.set()

    async def __aenter__(self) -> Flow:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop all workers and processes. A durable flow's unfinished items stay in the
        journal, resumable; an in-memory flow's unfinished items become ``cancelled``."""
        await self._shutdown("flow closed", timeout=timeout)

    async def cancel(self, reason: str = "cancelled", timeout: float = 5.0) -> None:
        """Like :meth:`close`, recording ``reason`` on the in-memory items it cancels.

        Returns within about ``timeout`` seconds: running calls are cancelled (their items
        were not committed, so a durable flow resumes them from their last hop)."""
        await self._shutdown(reason, timeout=timeout)

    async def _shutdown(
        self, reason: str, *, timeout: float = 5.0, cancel_items: bool = True
    ) -> None:
        if self._closed:
            return
        self._closed = True
        self._admission.close()
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        for r in self._runners:
            await r.close()
        if self.journal is not None:
            await self.journal.close()
        self._log.flush()
        if cancel_items:
            for key, item in self._items.items():
                if item.state == ACTIVE:
                    item.state, item.reason = CANCELLED, reason
                    item.finished = time.monotonic()
                    self._wake(key, item)
            self._active = 0
        self._changed.set()

    # ---- submitting -----------------------------------------------------------------
    def _check_open(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, JournalError):
                raise JournalError(f"flow {self.name!r} stopped: {err}") from err
            raise FlowClosedError(f"flow {self.name!r} stopped: {err!r}") from err
        if self._closed:
            raise FlowClosedError(f"flow {self.name!r} is closed")

    async def submit(self, value: Any, key: Any = None) -> str:
        """Add an item; returns its key. A key already known to the flow is not added again."""
        return (await self.submit_many([value], None if key is None else [key]))[0]

    async def submit_many(
        self, values: Iterable[Any], keys: Iterable[Any] | None = None
    ) -> list[str]:
        """Add many items at once (one journal commit for all of them); returns their keys."""
        self._check_open()
        values = list(values)
        if keys is None:
            # Random per flow instance, then counted: unique across processes and restarts.
            p = self._key_prefix
            ks = [f"{p}-{next(self._key_count)}" for _ in values]
        else:
            ks = [check_key(k) for k in keys]
        if len(ks) != len(values):
            raise ValueError("submit_many got a different number of keys and values")
        if self.journal is None:
            for key, value in zip(ks, values, strict=True):
                await self._submit_memory(key, value)
            return ks
        batch: list[tuple[str, list[Dest] | DeadLetter]] = []
        for key, value in zip(ks, values, strict=True):
            try:
                dests = self._resolve(key, self.plan.entry, value)
                batch.append((key, [(n, p, encode(v)) for n, p, v in dests]))
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                raise MessageSerializationError(
                    f"item {key!r} cannot be stored in the journal: {exc}"
                ) from exc
            except _SplitFailed as f:
                batch.append((key, self._record(key, f.node, f.value, f.exc, 1)))
        fresh = await self.journal.call(self.journal.op_submit, batch)
        self._counters["submitted"] += sum(fresh)
        self._claim_wake.set()
        return ks

    async def _submit_memory(self, key: str, value: Any) -> None:
        if key in self._items:
            return
        await self._admission.acquire()
        self._check_open()
        if key in self._items:  # submitted by someone else while we waited
            self._admission.release()
            return
        self._items[key] = _Item()
        self._active += 1
        self._counters["submitted"] += 1
        await self._send(key, self.plan.entry, value)

    # ---- moving items -----------------------------------------------------------------
    def _load(self, edge: Edge) -> int:
        node = self.plan.nodes[edge[0]]
        if node.kind != "call":
            return 0
        return len(self._channels[node.index]) + self._busy[node.index]

    def _resolve(self, key: str, edge: Edge, value: Any) -> list[tuple[int, int, Any]]:
        """Follow split nodes from ``edge``: where ``value`` ends up (node, port, value)."""
        node = self.plan.nodes[edge[0]]
        if node.kind != "split":
            return [(edge[0], edge[1], value)]
        try:
            edges = self.plan.pick(node, key, value, self._load)
        except Exception as exc:
            raise _SplitFailed(node, value, exc) from exc
        out: list[tuple[int, int, Any]] = []
        for e in edges:
            out.extend(self._resolve(key, e, value))
        return out

    async def _send(self, key: str, edge: Edge, value: Any) -> None:
        """In memory: deliver ``value`` along ``edge``."""
        ch = self._direct.get(edge)
        if ch is not None:
            if not ch.try_put(Token(key, edge[0], value)):
                await ch.put(Token(key, edge[0], value))
            return
        try:
            dests = self._resolve(key, edge, value)
        except _SplitFailed as f:
            self._bury_memory(self._record(key, f.node, f.value, f.exc, 1))
            return
        for node, port, v in dests:
            if node == self.plan.sink:
                self._finish_memory(key, v)
            elif port:
                parts = self._parts.setdefault((key, node), {})
                parts[port] = v
                target = self.plan.nodes[node]
                if len(parts) == target.parts:
                    del self._parts[(key, node)]
                    await self._channels[node].put(
                        Token(key, node, self.plan.join_value(target, parts))
                    )
            else:
                await self._channels[node].put(Token(key, node, v))

    async def _forward(self, node: Node, tok: Token, out: Any) -> None:
        """A stage produced ``out`` for ``tok``: record the hop and pass the output on."""
        if self.journal is None:
            await self._send(tok.key, node.edges[0], out)
            return
        try:
            dests = self._resolve(tok.key, node.edges[0], out)
        except _SplitFailed as f:
            rec = self._record(tok.key, f.node, f.value, f.exc, 1)
            await self.journal.room()
            self.journal.post(self.journal.op_dead, node.index, rec)
            return
        try:
            encoded = [(n, p, encode(v)) for n, p, v in dests]
        except Exception as exc:  # an output the journal cannot store fails the item
            self._failed(node, tok, exc)
            return
        await self.journal.room()
        self.journal.post(self.journal.op_hop, tok.key, node.index, encoded)
        # Write-behind: the next stage may start before the commit. The writer commits in
        # order, so the next hop can never be durable without this one.
        for n, p, v in dests:
            if n != self.plan.sink and not p:
                await self._channels[n].put(Token(tok.key, n, v))

    def _take_size(self, node: Node) -> int:
        if node.is_batch:
            return node.batch_count or self._channels[node.index].capacity
        # Several workers each take one item, so a slow call never holds back a batch.
        return 1 if self._workers(node) > 1 else min(TAKE, self._channels[node.index].capacity)

    @staticmethod
    def _workers(node: Node) -> int:
        return node.stage.workers if node.stage is not None else 1

    async def _work(self, node: Node, runner: Runner) -> None:
        ch = self._channels[node.index]
        take = self._take_size(node)
        busy = self._busy
        i = node.index
        call = runner.call
        # In memory, the usual hop (to the next stage's input, or out of the flow) is
        # done inline: this loop is the whole per-item cost of a stage.
        nxt = self._direct.get(node.edges[0]) if self.journal is None else None
        nxt_node = node.edges[0][0]
        to_sink = self.journal is None and node.edges[0] == (self.plan.sink, 0)
        many = getattr(runner, "call_many", None)  # kernels: the items taken go together
        # Kernels: the next items go while earlier ones are in the kernel, a few batches
        # at a time, so a stage never waits for a round trip with items ready.
        ahead = getattr(runner, "batches_in_flight", 1) if many is not None else 1
        slots = asyncio.Semaphore(ahead) if ahead > 1 else None
        while True:
            toks = await ch.take(take, node.batch_timeout)
            if i in self._hungry:
                self._claim_wake.set()
            busy[i] += len(toks)
            if node.is_batch:
                try:
                    await self._run_batch(node, runner, toks)
                finally:
                    busy[i] -= len(toks)
                continue
            if slots is not None:
                await slots.acquire()
                self._spawn_many(node, many, toks, nxt, nxt_node, to_sink, slots)
                continue
            if many is not None and len(toks) > 1:
                try:
                    await self._run_many(node, many, toks, nxt, nxt_node, to_sink)
                finally:
                    busy[i] -= len(toks)
                continue
            left = len(toks)
            try:
                for tok in toks:
                    try:
                        out = await call(tok.value)
                    except Exception as exc:
                        self._failed(node, tok, exc)
                    else:
                        if out is FILTERED_OUT:
                            self._filtered(node, tok)
                        elif nxt is not None:
                            nt = Token(tok.key, nxt_node, out)
                            if not nxt.try_put(nt):
                                await nxt.put(nt)
                        elif to_sink:
                            self._finish_memory(tok.key, out)
                        else:
                            await self._forward(node, tok, out)
                    busy[i] -= 1
                    left -= 1
            finally:
                busy[i] -= left

    def _spawn_many(
        self,
        node: Node,
        many: Any,
        toks: list[Token],
        nxt: Channel | None,
        nxt_node: int,
        to_sink: bool,
        slots: asyncio.Semaphore,
    ) -> None:
        """``_run_many`` as a task of its own, holding one of the stage's ``slots``."""
        task = asyncio.create_task(self._run_many(node, many, toks, nxt, nxt_node, to_sink))
        self._tasks.append(task)

        def done(t: asyncio.Task[None]) -> None:
            slots.release()
            self._busy[node.index] -= len(toks)
            if t in self._tasks:
                self._tasks.remove(t)
            self._task_done(t)

        task.add_done_callback(done)

    async def _run_many(
        self,
        node: Node,
        many: Any,
        toks: list[Token],
        nxt: Channel | None,
        nxt_node: int,
        to_sink: bool,
    ) -> None:
        """The items a worker took, sent to its kernel together (``call_many``), then
        each passed on (or failed) as a single call would have."""
        outs = await many([t.value for t in toks])
        for tok, out in zip(toks, outs, strict=True):
            if isinstance(out, Exception):
                self._failed(node, tok, out)
            elif out is FILTERED_OUT:
                self._filtered(node, tok)
            elif nxt is not None:
                nt = Token(tok.key, nxt_node, out)
                if not nxt.try_put(nt):
                    await nxt.put(nt)
            elif to_sink:
                self._finish_memory(tok.key, out)
            else:
                await self._forward(node, tok, out)

    async def _run_batch(self, node: Node, runner: Runner, toks: list[Token]) -> None:
        try:
            outs = await runner.call([t.value for t in toks])
            if not isinstance(outs, (list, tuple)) or len(outs) != len(toks):
                raise TypeError(
                    f"batch stage {node.name!r} must return a list with one output per input "
                    f"({len(toks)}), got {type(outs).__name__}"
                )
        except Exception as exc:
            for t in toks:
                self._failed(node, t, exc)
            return
        for t, out in zip(toks, outs, strict=True):
            await self._forward(node, t, out)

    # ---- failures -------------------------------------------------------------------
    def _record(
        self, key: str, node: Node, value: Any, exc: BaseException, attempts: int
    ) -> DeadLetter:
        """The dead letter of ``key`` (said in the log: every caller buries it)."""
        self._log.log(
            logging.ERROR,
            ("dead", node.name),
            "flow %r, stage %r: item %r failed after %d attempt(s), %s: %s; it is in the "
            "dead letters",
            self.name,
            node.name,
            key,
            attempts,
            type(exc).__name__,
            exc,
        )
        return DeadLetter(
            key=key,
            stage=node.name,
            node=node.index,
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            + "".join(f"{n}\n" for n in getattr(exc, "__notes__", [])),
            attempts=attempts,
            failed_at=time.time(),
            value=value,
        )

    def _failed(self, node: Node, tok: Token, exc: Exception) -> None:
        attempt = tok.failures + 1
        policy = node.stage.retry if node.stage is not None else NO_RETRY
        if policy.should_retry(attempt, exc):
            self._counters["retried"] += 1
            delay = policy.delay(attempt)
            self._log.log(
                logging.WARNING,
                ("retry", node.name),
                "flow %r, stage %r: item %r failed (attempt %d of %d), %s: %s; retrying in %.3f s",
                self.name,
                node.name,
                tok.key,
                attempt,
                policy.attempts,
                type(exc).__name__,
                exc,
                delay,
            )
            tok.failures = attempt
            if self.journal is not None:
                self.journal.post(
                    self.journal.op_release, tok.key, node.index, attempt, time.time() + delay
                )
                self._later(delay, self._claim_wake.set)
            else:
                self._later(delay, self._requeue, tok)
            return
        rec = self._record(tok.key, node, tok.value, exc, attempt)
        if self.journal is not None:
            self.journal.post(self.journal.op_dead, node.index, rec)
        else:
            self._bury_memory(rec)

    def _filtered(self, node: Node, tok: Token) -> None:
        """The stage consumed the item without output: it ends here, neither failed nor
        retried."""
        if self.journal is not None:
            self.journal.post(self.journal.op_filter, tok.key, node.index)
            return
        item = self._items[tok.key]
        if item.state == ACTIVE:
            item.state, item.reason = FILTERED, node.name
            item.finished = time.monotonic()
            self._counters["filtered"] += 1
            self._settle(tok.key, item)

    def _later(self, delay: float, fn: Any, *args: Any) -> None:
        def fire() -> None:
            self._timers.discard(handle)
            fn(*args)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    def _requeue(self, tok: Token) -> None:
        item = self._items.get(tok.key)
        if self._closed or item is None or item.state != ACTIVE:
            return
        # Already admitted, so it does not wait for room: a timer cannot await.
        self._channels[tok.node].put_nowait(tok)

    def _bury_memory(self, rec: DeadLetter) -> None:
        item = self._items[rec.key]
        item.dead[rec.node] = rec
        if item.state == ACTIVE:
            item.state = DEAD
            item.finished = time.monotonic()
            self._counters["dead_lettered"] += 1
            self._settle(rec.key, item)

    def _finish_memory(self, key: str, value: Any) -> None:
        item = self._items[key]
        if item.state != ACTIVE:
            return
        item.state, item.value = DONE, value
        item.finished = time.monotonic()
        self._counters["completed"] += 1
        self._done_order.append(key)
        self._settle(key, item)

    def _settle(self, key: str, item: _Item) -> None:
        self._active -= 1
        self._admission.release()
        self._wake(key, item)

    def _wake(self, key: str, item: _Item) -> None:
        for fut in item.waiters:
            if not fut.done():
                fut.set_result(None)
        item.waiters.clear()
        self._changed.set()

    # ---- journal callbacks and claiming ---------------------------------------------
    def _on_events(self, events: Events) -> None:
        for kind, key in events:
            if kind == "done":
                self._counters["completed"] += 1
            elif kind == FILTERED:
                self._counters["filtered"] += 1
            elif kind == "dead":
                self._counters["dead_lettered"] += 1
            elif kind == "lost":
                self._counters["lost_leases"] += 1
                self._log.log(
                    logging.WARNING,
                    "lost",
                    "flow %r: item %r was taken over by another process while this one ran "
                    "it (its lease ran out: is the lease shorter than a stage's run?); this "
                    "process's result for it was dropped",
                    self.name,
                    key,
                )
            elif kind == "joined":
                self._claim_wake.set()
            for fut in self._local_waiters.pop(key, ()):
                if not fut.done():
                    fut.set_result(None)
        self._changed.set()

    def _on_journal_error(self, exc: BaseException) -> None:
        self._fail(exc)

    async def _claim_loop(self) -> None:
        journal = self.journal
        assert journal is not None
        poll = journal.journal.poll
        while True:
            wants: list[tuple[int, int]] = []
            for i, ch in self._channels.items():
                free = ch.free()
                if free > 0:
                    wants.append((i, free))
                    ch.reserve(free)
            got: Counter[int] = Counter()
            asked = dict(wants)
            # Nodes where the journal may hold more: a worker taking from one wakes us.
            self._hungry = {i for i in self._channels if i not in asked}
            if wants:
                try:
                    rows = await journal.call(journal.op_claim, wants)
                finally:
                    for i, n in wants:
                        self._channels[i].unreserve(n)
                for key, node, blob, failures in rows:
                    got[node] += 1
                    try:
                        value = decode(blob)
                    except JournalError as exc:  # a damaged row fails its item only
                        rec = unreadable(key, self.plan.nodes[node], blob, exc)
                        self._log.log(
                            logging.ERROR,
                            ("dead", rec.stage),
                            "flow %r, stage %r: item %r went to the dead letters: %s",
                            self.name,
                            rec.stage,
                            key,
                            rec.error,
                        )
                        journal.post(journal.op_dead, node, rec)
                        continue
                    self._channels[node].put_nowait(Token(key, node, value, failures))
            self._hungry.update(i for i, n in wants if got[i] == n)
            if any(got[i] == n for i, n in wants) or any(
                self._channels[i].free() > 0 for i in self._channels if i not in asked
            ):
                continue
            self._claim_wake.clear()
            try:
                await asyncio.wait_for(self._claim_wake.wait(), poll)
            except asyncio.TimeoutError:
                pass

    # ---- looking at items -------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """submitted, completed, filtered, retried, dead_lettered (by this process), in_flight
        (items this process holds or, in memory, has not finished) and lost_leases."""
        # Also read from the metrics server's thread: take each container in one
        # C-level copy, never iterate one the event loop may change meanwhile.
        out = dict(self._counters)
        if self.journal is None:
            out["in_flight"] = self._active
        else:
            channels = list(self._channels.values())
            out["in_flight"] = sum(len(c) for c in channels) + sum(list(self._busy.values()))
        return out

    def stage_load(self) -> dict[str, dict[str, int]]:
        """Per stage, the items this process has waiting at it (``queued``) and being run
        by it (``running``). Safe to call from another thread."""
        channels = list(self._channels.items())
        busy = dict(self._busy)
        return {
            self.plan.nodes[i].name: {"queued": len(ch), "running": max(0, busy.get(i, 0))}
            for i, ch in channels
        }

    def __repr__(self) -> str:
        c = self.counters()
        where = "in memory" if self._journal_cfg is None else f"journal {self._journal_cfg.where}"
        state = "closed" if self._closed else "failed" if self._error is not None else "running"
        return (
            f"<Flow {self.name!r} {state}, {where}: submitted {c['submitted']}, "
            f"completed {c['completed']}, dead {c['dead_lettered']}, in flight {c['in_flight']}>"
        )

    def status(self) -> dict[str, int]:
        """Number of items per state (``active``, ``done``, ``dead``, ``cancelled``,
        ``filtered``)."""
        if self.journal is None:
            return dict(Counter(item.state for item in self._items.values()))
        rows = self.journal.read(
            "SELECT state, count(*) FROM items WHERE flow=? GROUP BY state", self.name
        )
        return dict(rows)

    def items(self, state: str | None = None) -> list[str]:
        """Keys of the items in ``state`` (all items when None), in submission order."""
        if self.journal is None:
            return [k for k, it in self._items.items() if state is None or it.state == state]
        if state is None:
            rows = self.journal.read(
                "SELECT key FROM items WHERE flow=? ORDER BY submitted, key", self.name
            )
        else:
            rows = self.journal.read(
                "SELECT key FROM items WHERE flow=? AND state=? ORDER BY submitted, key",
                self.name,
                state,
            )
        return [r[0] for r in rows]

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead-letter record: key, stage, error text, traceback, attempts, input."""
        if self.journal is None:
            return [rec for it in self._items.values() for rec in it.dead.values()]
        return self.journal.dead_letters()

    async def retry(self, key: Any) -> bool:
        """Send a dead-lettered item back to the stage(s) where it failed, with fresh
        attempts. Returns False if the item has no dead letters."""
        self._check_open()
        key = check_key(key)
        if self.journal is None:
            item = self._items.get(key)
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
        reinject: list[tuple[int, list[Dest]]] = []
        for rec in self.journal.dead_letters(key):
            try:
                dests = self._resolve(key, (rec.node, 0), rec.value)
            except _SplitFailed:
                dests = [(rec.node, 0, rec.value)]  # cannot route yet: leave it dead
                continue
            reinject.append((rec.node, [(n, p, encode(v)) for n, p, v in dests]))
        ok = bool(await self.journal.call(self.journal.op_retry, key, reinject))
        self._claim_wake.set()
        return ok

    async def prune(
        self,
        older_than: float | timedelta | None = None,
        keep: int | None = None,
        *,
        dead_letters: bool = False,
    ) -> int:
        """Forget finished items: done and cancelled ones (and dead-lettered ones with
        ``dead_letters=True``) that finished more than ``older_than`` seconds ago (or a
        ``timedelta``), and beyond the newest ``keep``; give one or both. Each goes with
        its result and dead letters; an unfinished item is never touched. A pruned key is
        forgotten: submitting it again runs it again. Returns how many went."""
        self._check_open()
        rule = Retention(seconds(older_than, "older_than"), keep, dead_letters)
        if self.journal is None:
            return self._prune_memory(rule)
        total = 0
        while True:  # a few hundred per transaction: the writer goes on in between
            n: int = await self.journal.call(self.journal.op_prune, rule)
            total += n
            if n < BATCH:
                return total

    def _prune_memory(self, rule: Retention) -> int:
        final = {DONE, CANCELLED, FILTERED} | ({DEAD} if rule.dead_letters else set())
        # Finish times are monotonic and _done_order is in finishing order: what goes
        # of it is always a prefix.
        finished = sorted(
            (it.finished, k) for k, it in self._items.items() if it.state in final | {DEAD}
        )
        last = len(finished) if rule.keep is None else max(0, len(finished) - rule.keep)
        if rule.older_than is not None:
            cutoff = time.monotonic() - rule.older_than
            last = min(last, bisect.bisect_left(finished, (cutoff, "")))
        gone = [k for _, k in finished[:last] if self._items[k].state in final]
        for k in gone:
            del self._items[k]
        head = 0
        while head < len(self._done_order) and self._done_order[head] not in self._items:
            head += 1
        del self._done_order[:head]
        self._done_base += head
        return len(gone)

    async def _retention_loop(self, rule: Retention) -> None:
        """Prune by the journal's retention rule now and every ``rule.every`` seconds."""
        while True:
            n = await self.prune(rule.older_than, rule.keep, dead_letters=rule.dead_letters)
            if n:
                log.info("flow %r: pruned %d finished items (%s)", self.name, n, rule)
            await asyncio.sleep(rule.every)

    async def _final(self, key: str) -> tuple[str, Any] | None:
        """(state, value or record) once the item finished; None while active."""
        if self.journal is None:
            item = self._items.get(key)
            if item is None:
                raise KeyError(f"flow {self.name!r} has no item {key!r}")
            if item.state == DONE:
                return DONE, item.value
            if item.state == DEAD:
                return DEAD, next(iter(item.dead.values()))
            if item.state == CANCELLED:
                return CANCELLED, item.reason
            if item.state == FILTERED:
                return FILTERED, item.reason
            return None
        rows = await self.journal.aread(
            "SELECT state FROM items WHERE flow=? AND key=?", self.name, key
        )
        if not rows:
            raise KeyError(f"flow {self.name!r} has no item {key!r}")
        if rows[0][0] == DONE:
            blob = await self.journal.aread(
                "SELECT value FROM results WHERE flow=? AND key=?", self.name, key
            )
            return DONE, decode(blob[0][0])
        if rows[0][0] == DEAD:
            return DEAD, (await self.journal.adead_letters(key))[0]
        if rows[0][0] == CANCELLED:
            return CANCELLED, "cancelled in the journal"
        if rows[0][0] == FILTERED:
            return FILTERED, ""
        return None

    async def result(self, key: Any, timeout: float | None = None) -> Any:
        """The item's output once it finished; raises ItemFailedError if it went to the
        dead letters, ItemFilteredError if a stage consumed it without output,
        FlowClosedError if it was cancelled, TimeoutError after ``timeout``."""
        key = check_key(key)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            final = await self._final(key)
            if final is not None:
                state, payload = final
                if state == DONE:
                    return payload
                if state == DEAD:
                    raise ItemFailedError(payload)
                if state == FILTERED:
                    raise ItemFilteredError(key, payload)
                raise FlowClosedError(f"item {key!r} was cancelled: {payload}")
            if self._error is not None or self._closed:
                self._check_open()
            fut = loop.create_future()
            if self.journal is None:
                waiters = self._items[key].waiters
                wait = None
            else:
                waiters = self._local_waiters.setdefault(key, [])
                wait = self.journal.journal.poll * 4  # another process may finish it
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"item {key!r} not finished within {timeout} s")
                wait = left if wait is None else min(wait, left)
            waiters.append(fut)
            try:
                await asyncio.wait_for(fut, wait)
            except asyncio.TimeoutError:
                if fut in waiters:  # a long wait must not pile up futures
                    waiters.remove(fut)

    async def _pending(self) -> int:
        if self.journal is None:
            return self._active
        active: int = (
            await self.journal.aread(
                "SELECT count(*) FROM items WHERE flow=? AND state='active'", self.name
            )
        )[0][0]
        return active

    async def _finished_of(self) -> tuple[int, int]:
        """(items finished, items in all): what a progress bar shows."""
        if self.journal is None:
            counts = self.status()
        else:  # waits out a journal outage without holding up the event loop
            counts = dict(
                await self.journal.aread(
                    "SELECT state, count(*) FROM items WHERE flow=? GROUP BY state", self.name
                )
            )
        total = sum(counts.values())
        return total - counts.get(ACTIVE, 0), total

    async def drain(self, timeout: float | None = None, *, progress: bool = False) -> None:
        """Wait until no item is active (all done or dead-lettered).

        ``progress=True`` shows a progress bar of the flow's items on stderr while it
        waits, when stderr is a terminal (never in a log or a pipe)."""
        with ItemProgress(f"flow {self.name}", progress) as bar:
            await self._drain(timeout, bar)

    async def _drain(self, timeout: float | None, bar: ItemProgress) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            self._check_open()
            if self.journal is not None:
                await self.journal.call(self.journal.op_flush)
            pending = await self._pending()
            if bar.shown and (pending == 0 or bar.due()):
                bar.update(*await self._finished_of())
            if pending == 0:
                return
            self._changed.clear()
            wait = None if self.journal is None else self.journal.journal.poll * 4
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"flow {self.name!r} not drained within {timeout} s")
                wait = left if wait is None else min(wait, left)
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def results(self, *, progress: bool = False) -> AsyncIterator[tuple[str, Any]]:
        """(key, output) of every finished item in completion order, ending once no item
        is active. Dead-lettered items are not yielded: see :meth:`dead_letters`.

        ``progress=True`` shows a progress bar of the flow's items on stderr meanwhile,
        when stderr is a terminal (never in a log or a pipe)."""
        if progress and _progress_shown():
            return self._results_with_bar()
        return self._results()

    async def _results_with_bar(self) -> AsyncIterator[tuple[str, Any]]:
        with ItemProgress(f"flow {self.name}") as bar:
            async with contextlib.aclosing(self._results()) as pairs:
                async for pair in pairs:
                    if bar.due():
                        bar.update(*await self._finished_of())
                    yield pair
            bar.update(*await self._finished_of())

    async def _results(self) -> AsyncGenerator[tuple[str, Any], None]:
        if self.journal is None:
            i = 0
            while True:
                i = max(i, self._done_base)  # what was pruned meanwhile is skipped
                while i - self._done_base >= len(self._done_order):
                    if self._active == 0 or self._closed:
                        return
                    self._changed.clear()
                    await self._changed.wait()
                    i = max(i, self._done_base)
                key = self._done_order[i - self._done_base]
                i += 1
                yield key, self._items[key].value
        journal = self.journal
        assert journal is not None  # the in-memory branch above always returns
        seq = 0
        while True:
            rows = await journal.aread(
                "SELECT seq, key, value FROM results WHERE flow=? AND seq>? ORDER BY seq LIMIT 1000",
                self.name,
                seq,
            )
            for s, key, blob in rows:
                seq = s
                yield key, decode(blob)
            if rows:
                continue
            if await self._pending() == 0:
                # One more look: the last items may have committed between the two reads.
                if not await journal.aread(
                    "SELECT 1 FROM results WHERE flow=? AND seq>? LIMIT 1", self.name, seq
                ):
                    return
                continue
            self._check_open()
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), journal.journal.poll * 4)
            except asyncio.TimeoutError:
                pass
