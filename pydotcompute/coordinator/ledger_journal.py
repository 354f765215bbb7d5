"""A flow's items kept in a durable journal: every hop written behind the work, idle
capacity filled by claiming tokens (fresh submissions, items another process left
behind, joins completed by the writer, retries whose back-off has passed)."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pydotcompute.coordinator.channel import Channel
from pydotcompute.coordinator.journal import (
    Dest,
    Events,
    JournalConfig,
    JournalSession,
    unreadable,
)
from pydotcompute.coordinator.ledger import SplitFailed
from pydotcompute.coordinator.plan import Node
from pydotcompute.coordinator.records import (
    CANCELLED,
    DEAD,
    DONE,
    FILTERED,
    DeadLetter,
    Token,
    decode,
    encode,
)
from pydotcompute.coordinator.retention import BATCH, Retention
from pydotcompute.errors import JournalError, MessageSerializationError

if TYPE_CHECKING:
    from pydotcompute.coordinator.flow import Flow

__all__ = ["JournalLedger"]

log = logging.getLogger("pydotcompute.coordinator")


class JournalLedger:
    """The items of a flow with a journal; unfinished ones stay there, resumable."""

    def __init__(self, flow: Flow, config: JournalConfig) -> None:
        self.flow = flow
        self.hungry: set[int] = set()
        self.session = JournalSession(config, flow.name, flow.plan, flow.owner)
        self.poll: float | None = self.session.journal.poll
        self.session.on_events = self._on_events
        self.session.on_error = flow._fail
        self._claim_wake = asyncio.Event()
        self._local_waiters: dict[str, list[asyncio.Future[None]]] = {}

    # ---- lifetime -------------------------------------------------------------------
    async def open(self) -> None:
        session = self.session
        await session.open()
        if session.resumed:
            log.info(
                "flow %r on journal %s: %d unfinished items found; resuming them",
                self.flow.name,
                session.journal.where,
                session.resumed,
            )

    def background(self) -> list[Coroutine[Any, Any, None]]:
        loops = [self._claim_loop()]
        rule = self.session.journal.retention
        if rule is not None:
            loops.append(self._retention_loop(rule))
        return loops

    def stop_admitting(self) -> None:
        return None  # a durable submit waits for nothing but its commit

    async def close(self, reason: str, *, cancel_items: bool) -> None:
        await self.session.close()  # nothing to do when it never opened

    # ---- what the workers hand over ---------------------------------------------------
    async def submit(self, keys: list[str], values: list[Any]) -> None:
        flow = self.flow
        batch: list[tuple[str, list[Dest] | DeadLetter]] = []
        for key, value in zip(keys, values, strict=True):
            try:
                dests = flow._resolve(key, flow.plan.entry, value)
                batch.append((key, [(n, p, encode(v)) for n, p, v in dests]))
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                raise MessageSerializationError(
                    f"item {key!r} cannot be stored in the journal: {exc}"
                ) from exc
            except SplitFailed as f:
                batch.append((key, flow._record(key, f.node, f.value, f.exc, 1)))
        fresh = await self.session.call(self.session.op_submit, batch)
        flow._counters["submitted"] += sum(fresh)
        self._claim_wake.set()

    def inline_hop(self, node: Node) -> tuple[Channel | None, Callable[[str, Any], None] | None]:
        return None, None  # every hop is written to the journal

    async def forward(self, node: Node, tok: Token, out: Any) -> None:
        flow, session = self.flow, self.session
        try:
            dests = flow._resolve(tok.key, node.edges[0], out)
        except SplitFailed as f:
            rec = flow._record(tok.key, f.node, f.value, f.exc, 1)
            await session.room()
            session.post(session.op_dead, node.index, rec)
            return
        try:
            encoded = [(n, p, encode(v)) for n, p, v in dests]
        except Exception as exc:  # an output the journal cannot store fails the item
            flow._failed(node, tok, exc)
            return
        await session.room()
        session.post(session.op_hop, tok.key, node.index, encoded)
        # Write-behind: the next stage may start before the commit. The writer commits in
        # order, so the next hop can never be durable without this one.
        sink = flow.plan.sink
        for n, p, v in dests:
            if n != sink and not p:
                await flow._channels[n].put(Token(tok.key, n, v))

    def retry_later(self, node: Node, tok: Token, attempt: int, delay: float) -> None:
        self.session.post(
            self.session.op_release, tok.key, node.index, attempt, time.time() + delay
        )
        self.flow._later(delay, self._claim_wake.set)

    def bury(self, node: int, rec: DeadLetter) -> None:
        self.session.post(self.session.op_dead, node, rec)

    def filter(self, node: Node, tok: Token) -> None:
        self.session.post(self.session.op_filter, tok.key, node.index)

    def wake_claims(self) -> None:
        """A worker took items at a node where the journal may hold more."""
        self._claim_wake.set()

    # ---- journal callbacks and claiming ---------------------------------------------
    def _on_events(self, events: Events) -> None:
        flow = self.flow
        counters = flow._counters
        for kind, key in events:
            if kind == "done":
                counters["completed"] += 1
            elif kind == FILTERED:
                counters["filtered"] += 1
            elif kind == "dead":
                counters["dead_lettered"] += 1
            elif kind == "lost":
                counters["lost_leases"] += 1
                flow._log.log(
                    logging.WARNING,
                    "lost",
                    "flow %r: item %r was taken over by another process while this one ran "
                    "it (its lease ran out: is the lease shorter than a stage's run?); this "
                    "process's result for it was dropped",
                    flow.name,
                    key,
                )
            elif kind == "joined":
                self._claim_wake.set()
            for fut in self._local_waiters.pop(key, ()):
                if not fut.done():
                    fut.set_result(None)
        flow._changed.set()

    async def _claim_loop(self) -> None:
        flow, session = self.flow, self.session
        channels = flow._channels
        poll = self.session.journal.poll
        while True:
            wants: list[tuple[int, int]] = []
            for i, ch in channels.items():
                free = ch.free()
                if free > 0:
                    wants.append((i, free))
                    ch.reserve(free)
            got: Counter[int] = Counter()
            asked = dict(wants)
            # Nodes where the journal may hold more: a worker taking from one wakes us.
            self.hungry = {i for i in channels if i not in asked}
            if wants:
                try:
                    rows = await session.call(session.op_claim, wants)
                finally:
                    for i, n in wants:
                        channels[i].unreserve(n)
                for key, node, blob, failures in rows:
                    got[node] += 1
                    try:
                        value = decode(blob)
                    except JournalError as exc:  # a damaged row fails its item only
                        rec = unreadable(key, flow.plan.nodes[node], blob, exc)
                        flow._log.log(
                            logging.ERROR,
                            ("dead", rec.stage),
                            "flow %r, stage %r: item %r went to the dead letters: %s",
                            flow.name,
                            rec.stage,
                            key,
                            rec.error,
                        )
                        session.post(session.op_dead, node, rec)
                        continue
                    channels[node].put_nowait(Token(key, node, value, failures))
            self.hungry.update(i for i, n in wants if got[i] == n)
            if any(got[i] == n for i, n in wants) or any(
                channels[i].free() > 0 for i in channels if i not in asked
            ):
                continue
            self._claim_wake.clear()
            try:
                await asyncio.wait_for(self._claim_wake.wait(), poll)
            except asyncio.TimeoutError:
                pass

    async def _retention_loop(self, rule: Retention) -> None:
        """Prune by the journal's retention rule now and every ``rule.every`` seconds."""
        flow = self.flow
        while True:
            n = await flow.prune(rule.older_than, rule.keep, dead_letters=rule.dead_letters)
            if n:
                log.info("flow %r: pruned %d finished items (%s)", flow.name, n, rule)
            await asyncio.sleep(rule.every)

    # ---- what callers ask -------------------------------------------------------------
    def in_flight(self) -> int:
        # Also read from the metrics server's thread: take each container in one
        # C-level copy, never iterate one the event loop may change meanwhile.
        channels = list(self.flow._channels.values())
        return sum(len(c) for c in channels) + sum(list(self.flow._busy.values()))

    def status(self) -> dict[str, int]:
        return self.session.state_counts()

    def items(self, state: str | None) -> list[str]:
        return self.session.keys(state)

    def dead_letters(self) -> list[DeadLetter]:
        return self.session.dead_letters()

    async def retry(self, key: str) -> bool:
        flow, session = self.flow, self.session
        reinject: list[tuple[int, list[Dest]]] = []
        for rec in session.dead_letters(key):
            try:
                dests = flow._resolve(key, (rec.node, 0), rec.value)
            except SplitFailed:
                continue  # cannot route yet: leave it dead
            reinject.append((rec.node, [(n, p, encode(v)) for n, p, v in dests]))
        ok = bool(await session.call(session.op_retry, key, reinject))
        self._claim_wake.set()
        return ok

    async def prune(self, rule: Retention) -> int:
        total = 0
        while True:  # a few hundred per transaction: the writer goes on in between
            n: int = await self.session.call(self.session.op_prune, rule)
            total += n
            if n < BATCH:
                return total

    async def final(self, key: str) -> tuple[str, Any] | None:
        session = self.session
        state = await session.aitem_state(key)
        if state is None:
            raise KeyError(f"flow {self.flow.name!r} has no item {key!r}")
        if state == DONE:
            return DONE, await session.aresult(key)
        if state == DEAD:
            return DEAD, (await session.adead_letters(key))[0]
        if state == CANCELLED:
            return CANCELLED, "cancelled in the journal"
        if state == FILTERED:
            return FILTERED, ""
        return None

    def waiters(self, key: str) -> list[asyncio.Future[None]]:
        return self._local_waiters.setdefault(key, [])

    async def pending(self) -> int:
        return await self.session.aactive()

    async def state_counts(self) -> dict[str, int]:
        return await self.session.astate_counts()

    async def flush(self) -> None:
        await self.session.call(self.session.op_flush)

    async def results(self) -> AsyncGenerator[tuple[str, Any], None]:
        flow, session = self.flow, self.session
        seq = 0
        while True:
            rows = await session.aresults_after(seq)
            for s, key, blob in rows:
                seq = s
                yield key, decode(blob)
            if rows:
                continue
            if await self.pending() == 0:
                # One more look: the last items may have committed between the two reads.
                if not await session.ahas_results_after(seq):
                    return
                continue
            flow._check_open()
            flow._changed.clear()
            try:
                await asyncio.wait_for(flow._changed.wait(), session.journal.poll * 4)
            except asyncio.TimeoutError:
                pass
