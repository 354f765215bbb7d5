"""Running a compiled graph: workers per stage, bounded channels, retries, dead letters.

The workers are the same with or without a journal; where the items live is the flow's
ledger (see :mod:`pydotcompute.coordinator.ledger`): in this process, or in a journal,
where every hop is also written (behind the work, group-committed, in order) and idle
capacity is filled by claiming tokens from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from typing import Any

from pydotcompute.coordinator.channel import Channel
from pydotcompute.coordinator.fusion import (
    FusedSegment,
    FusionPlan,
    FusionReport,
    LinkedSegment,
    NotFused,
    fused_node,
    launch_copy,
    launch_segment,
    linked_node,
    plan_fusion,
    plan_links,
)
from pydotcompute.coordinator.journal import JournalConfig, JournalSession
from pydotcompute.coordinator.kernel_replies import FILTERED_OUT
from pydotcompute.coordinator.ledger import Ledger, SplitFailed
from pydotcompute.coordinator.ledger_journal import JournalLedger
from pydotcompute.coordinator.ledger_memory import Admission, MemoryLedger
from pydotcompute.coordinator.log_throttle import LogThrottle
from pydotcompute.coordinator.plan import Edge, Node, Plan
from pydotcompute.coordinator.progress import ItemProgress
from pydotcompute.coordinator.progress import stderr_is_terminal as _progress_shown
from pydotcompute.coordinator.records import ACTIVE, DEAD, DONE, FILTERED, DeadLetter, Token
from pydotcompute.coordinator.retention import Retention, seconds
from pydotcompute.coordinator.retry import RetryPolicy
from pydotcompute.coordinator.runners import Runner, make_runner, refuse_deploy_while_spawning
from pydotcompute.errors import (
    FlowClosedError,
    ItemFailedError,
    ItemFilteredError,
    JournalError,
    PyDotComputeError,
)

__all__ = ["Admission", "Flow"]

log = logging.getLogger("pydotcompute.coordinator")

TAKE = 64  # items a single-worker stage takes per wake-up
NO_RETRY = RetryPolicy()


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
        self._direct: dict[Edge, Channel] = {}
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
        self._fusion: FusionPlan | None = None
        self._fused_kernels: list[str] = []  # launched by this flow, terminated when it closes
        self._links: list[tuple[str, str]] = []  # made by this flow, unlinked when it closes
        self._chains: dict[int, tuple[str, ...]] = {}  # head node: its linked kernels
        self._ledger: Ledger = (
            MemoryLedger(self) if journal is None else JournalLedger(self, journal)
        )

    # ---- lifetime -------------------------------------------------------------------
    async def start(self) -> Flow:
        for node in self.plan.calls:
            st = node.stage
            capacity = st.buffer if st is not None else 64
            if node.batch_count:
                capacity = max(capacity, node.batch_count)
            self._channels[node.index] = Channel(capacity)
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
        ledger = self._ledger
        try:
            if isinstance(ledger, JournalLedger):
                self.journal = ledger.session
            await ledger.open()
            heads = await self._fuse()
            for node in self.plan.calls:
                run_as = heads.get(node.index, node)
                chain = self._chains.get(node.index, ())
                for _ in range(self._workers(node)):
                    runner = make_runner(run_as.stage, self.runtime, chain)
                    self._runners.append(runner)
                    await runner.start()
                    self._spawn(self._work(run_as, runner))
            # Worker processes have started side by side; a deploy fails here if one
            # cannot load its stage. (One by one: runners with nothing to wait for do not
            # yield to the loop, so the flow's first ops go to the writer as before.)
            for runner in self._runners:
                await runner.ready()
            for loop in ledger.background():
                self._spawn(loop)
        except BaseException:
            await self._shutdown("deploy failed", cancel_items=False)
            raise
        return self

    async def _fuse(self) -> dict[int, Node]:
        """Launch a kernel per fused segment; the nodes its first stage runs as, by index."""
        fusion = plan_fusion(self.plan, self.runtime)
        heads: dict[int, Node] = {}
        segments: list[FusedSegment] = []
        for seg, info in zip(fusion.segments, fusion.report.fused, strict=True):
            kid = f"{self.name}:fused:{seg[0].name}..{seg[-1].name}:{self.owner[:8]}"
            await launch_segment(self.runtime, seg, kid)
            self._fused_kernels.append(kid)
            heads[seg[0].index] = fused_node(seg, kid)
            segments.append(dataclasses.replace(info, kernel_id=kid))
        linked, not_linked = await self._link(fusion, heads)
        report = FusionReport(
            tuple(segments),
            fusion.report.not_fused,
            self.stage_counts,
            linked=linked,
            not_linked=not_linked,
        )
        self._fusion = FusionPlan(report, fusion.segments)
        return heads

    async def _link(
        self, fusion: FusionPlan, heads: dict[int, Node]
    ) -> tuple[tuple[LinkedSegment, ...], tuple[NotFused, ...]]:
        """Link the kernels of each run of kernel stages that did not fuse, so records go
        from kernel to kernel without the event loop; the run's first node sends to its
        first kernel and takes the last one's replies. In memory the graph's kernels are
        linked; a durable flow launches a copy of each and links the copies, so that the
        graph's kernels stay free for the items its journal holds at inner stages (the
        segment is one journal hop, as a fused one is)."""
        durable = self._journal_cfg is not None
        chains, not_linked = plan_links(self.plan, self.runtime, fusion, durable=durable)
        linked: list[LinkedSegment] = []
        refused = list(not_linked)
        for chain in chains:
            kernels = tuple(str(x.stage.target) for x in chain if x.stage is not None)
            run_on = kernels
            if durable:
                tag = self.owner[:8]
                run_on = tuple(f"{self.name}:linked:{x.name}:{tag}" for x in chain)
                for kid, cid in zip(kernels, run_on, strict=True):
                    self._fused_kernels.append(cid)  # terminated when the flow closes
                    await launch_copy(self.runtime, kid, cid)
            done = 0
            try:
                for a, b in itertools.pairwise(run_on):
                    await self.runtime.link(a, b)
                    self._links.append((a, b))
                    done += 1
            except PyDotComputeError as exc:  # e.g. a kernel failed meanwhile: unlinked
                refused.append(NotFused(chain[done].name, chain[done + 1].name, str(exc)))
                chain, kernels, run_on = chain[: done + 1], kernels[: done + 1], run_on[: done + 1]
                if done == 0:
                    continue
            heads[chain[0].index] = linked_node(chain, run_on[0])
            self._chains[chain[0].index] = run_on
            copies = run_on if durable else ()
            linked.append(LinkedSegment(tuple(x.name for x in chain), kernels, copies))
        return tuple(linked), tuple(refused)

    def explain(self) -> FusionReport:
        """Which stages run fused (one kernel per segment), why each other adjacent pair
        does not, and per fused stage its counts (``counts()``)."""
        if self._fusion is None:
            return plan_fusion(self.plan, self.runtime).report
        return self._fusion.report

    def stage_counts(self) -> dict[str, dict[str, int]]:
        """Per stage of a fused segment: records ``processed``, ``emitted`` and
        ``dropped`` by its handler in the fused kernel."""
        out: dict[str, dict[str, int]] = {}
        for kid in self._fused_kernels:
            try:
                counts = self.runtime.kernel_handle(kid).stage_counts()
            except PyDotComputeError:
                continue  # terminated with its runtime: nothing to read any more
            out.update(counts or {})
        return out

    def _capacity(self) -> int:
        """How many items the flow's channels and workers hold at most."""
        return sum(ch.capacity for ch in self._channels.values()) + sum(
            self._take_size(n) * self._workers(n) for n in self.plan.calls
        )

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
        self._ledger.stop_admitting()
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        for r in self._runners:
            await r.close()
        for a, b in reversed(self._links):
            try:
                await asyncio.wait_for(self.runtime.unlink(a, b), timeout)
            except PyDotComputeError as exc:  # terminated meanwhile: the link went with it
                log.debug("flow %r: link %r -> %r: %s", self.name, a, b, exc)
            except asyncio.TimeoutError:
                log.warning(
                    "flow %r: kernel %r did not place its last batch in %r within %g s; "
                    "the link is left to terminate",
                    self.name,
                    a,
                    b,
                    timeout,
                )
        self._links.clear()
        for kid in self._fused_kernels:
            try:
                await self.runtime.terminate(kid)
            except PyDotComputeError as exc:  # the runtime is shutting down and got there first
                log.debug("flow %r: fused kernel %r: %s", self.name, kid, exc)
        await self._ledger.close(reason, cancel_items=cancel_items)
        self._log.flush()
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
        await self._ledger.submit(ks, values)
        return ks

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
            raise SplitFailed(node, value, exc) from exc
        out: list[tuple[int, int, Any]] = []
        for e in edges:
            out.extend(self._resolve(key, e, value))
        return out

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
        ledger = self._ledger
        forward = ledger.forward
        # The ledger's usual hop (to the next stage's input, or out of the flow), when it
        # has one, is done inline: this loop is then the whole per-item cost of a stage.
        nxt, finish = ledger.inline_hop(node)
        nxt_node = node.edges[0][0]
        many = getattr(runner, "call_many", None)  # kernels: the items taken go together
        # Kernels: the next items go while earlier ones are in the kernel, a few batches
        # at a time, so a stage never waits for a round trip with items ready.
        ahead = getattr(runner, "batches_in_flight", 1) if many is not None else 1
        slots = asyncio.Semaphore(ahead) if ahead > 1 else None
        passed: asyncio.Future[None] | None = None  # the last batch's outputs passed on
        while True:
            toks = await ch.take(take, node.batch_timeout)
            if i in ledger.hungry:
                ledger.wake_claims()
            busy[i] += len(toks)
            if node.is_batch:
                try:
                    await self._run_batch(node, runner, toks)
                finally:
                    busy[i] -= len(toks)
                continue
            if slots is not None:
                await slots.acquire()
                passed = self._spawn_many(node, many, toks, nxt, nxt_node, finish, slots, passed)
                continue
            if many is not None and len(toks) > 1:
                try:
                    await self._run_many(node, many, toks, nxt, nxt_node, finish)
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
                            ledger.filter(node, tok)
                        elif nxt is not None:
                            nt = Token(tok.key, nxt_node, out)
                            if not nxt.try_put(nt):
                                await nxt.put(nt)
                        elif finish is not None:
                            finish(tok.key, out)
                        else:
                            await forward(node, tok, out)
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
        finish: Any,
        slots: asyncio.Semaphore,
        after: asyncio.Future[None] | None,
    ) -> asyncio.Future[None]:
        """``_run_many`` as a task of its own, holding one of the stage's ``slots``; it
        passes its outputs on once the batch before it (``after``) has passed on its
        own, so batches in flight together keep their order (a task that woke first
        could otherwise take the room the next stage freed for the one waiting). What
        it returns is done once this batch's outputs are passed on (or it ended)."""
        passed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run_many(node, many, toks, nxt, nxt_node, finish, after))
        self._tasks.append(task)

        def done(t: asyncio.Task[None]) -> None:
            if not passed.done():
                passed.set_result(None)
            slots.release()
            self._busy[node.index] -= len(toks)
            if t in self._tasks:
                self._tasks.remove(t)
            self._task_done(t)

        task.add_done_callback(done)
        return passed

    async def _run_many(
        self,
        node: Node,
        many: Any,
        toks: list[Token],
        nxt: Channel | None,
        nxt_node: int,
        finish: Any,
        after: asyncio.Future[None] | None = None,
    ) -> None:
        """The items a worker took, sent to its kernel together (``call_many``), then
        each passed on (or failed) as a single call would have, once the batch before
        (``after``) has passed on its own."""
        outs = await many([t.value for t in toks])
        if after is not None and not after.done():
            await asyncio.shield(after)  # shielded: it is the batch before's, not ours
        for tok, out in zip(toks, outs, strict=True):
            if isinstance(out, Exception):
                self._failed(node, tok, out)
            elif out is FILTERED_OUT:
                self._ledger.filter(node, tok)
            elif nxt is not None:
                nt = Token(tok.key, nxt_node, out)
                if not nxt.try_put(nt):
                    await nxt.put(nt)
            elif finish is not None:
                finish(tok.key, out)
            else:
                await self._ledger.forward(node, tok, out)

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
            await self._ledger.forward(node, t, out)

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
            self._ledger.retry_later(node, tok, attempt, delay)
            return
        self._ledger.bury(node.index, self._record(tok.key, node, tok.value, exc, attempt))

    def _later(self, delay: float, fn: Any, *args: Any) -> None:
        def fire() -> None:
            self._timers.discard(handle)
            fn(*args)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    # ---- looking at items -------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """submitted, completed, filtered, retried, dead_lettered (by this process), in_flight
        (items this process holds or, in memory, has not finished) and lost_leases."""
        out = dict(self._counters)
        out["in_flight"] = self._ledger.in_flight()
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
        return self._ledger.status()

    def items(self, state: str | None = None) -> list[str]:
        """Keys of the items in ``state`` (all items when None), in submission order."""
        return self._ledger.items(state)

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead-letter record: key, stage, error text, traceback, attempts, input."""
        return self._ledger.dead_letters()

    async def retry(self, key: Any) -> bool:
        """Send a dead-lettered item back to the stage(s) where it failed, with fresh
        attempts. Returns False if the item has no dead letters."""
        self._check_open()
        return await self._ledger.retry(check_key(key))

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
        return await self._ledger.prune(rule)

    async def result(self, key: Any, timeout: float | None = None) -> Any:
        """The item's output once it finished; raises ItemFailedError if it went to the
        dead letters, ItemFilteredError if a stage consumed it without output,
        FlowClosedError if it was cancelled, TimeoutError after ``timeout``."""
        key = check_key(key)
        ledger = self._ledger
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            final = await ledger.final(key)
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
            waiters = ledger.waiters(key)
            # Another process may finish it: look again every few polls.
            wait = None if ledger.poll is None else ledger.poll * 4
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

    async def _finished_of(self) -> tuple[int, int]:
        """(items finished, items in all): what a progress bar shows."""
        counts = await self._ledger.state_counts()
        total = sum(counts.values())
        return total - counts.get(ACTIVE, 0), total

    async def drain(self, timeout: float | None = None, *, progress: bool = False) -> None:
        """Wait until no item is active (all done or dead-lettered).

        ``progress=True`` shows a progress bar of the flow's items on stderr while it
        waits, when stderr is a terminal (never in a log or a pipe)."""
        with ItemProgress(f"flow {self.name}", progress) as bar:
            await self._drain(timeout, bar)

    async def _drain(self, timeout: float | None, bar: ItemProgress) -> None:
        ledger = self._ledger
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            self._check_open()
            await ledger.flush()
            pending = await ledger.pending()
            if bar.shown and (pending == 0 or bar.due()):
                bar.update(*await self._finished_of())
            if pending == 0:
                return
            self._changed.clear()
            wait = None if ledger.poll is None else ledger.poll * 4
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
        return self._ledger.results()

    async def _results_with_bar(self) -> AsyncIterator[tuple[str, Any]]:
        with ItemProgress(f"flow {self.name}") as bar:
            async with contextlib.aclosing(self._ledger.results()) as pairs:
                async for pair in pairs:
                    if bar.due():
                        bar.update(*await self._finished_of())
                    yield pair
            bar.update(*await self._finished_of())
