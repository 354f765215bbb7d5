"""An operator's changes to a flow's items, made from outside the processes that run it:
retry dead-lettered items, cancel unfinished ones.

The writes are the flow's own ops (``op_retry``, ``op_cancel``), queued on the journal's
writer like any flow's, so they keep the same guarantees: a dead letter is re-queued at
most once however many operators retry it at once, and an item a live process is running
is only taken from it when the operator insists (``force``); that process's next hop then
finds its token gone and writes nothing. Nothing here needs the flow's graph: a dead
letter goes back to the input of the stage that failed, where the process running the
flow picks it up.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydotcompute.coordinator.journal import Events, JournalConfig, JournalSession, open_journal
from pydotcompute.coordinator.journal_reader import Holder, JournalReader, live_holders
from pydotcompute.coordinator.plan import ROUTE_PREFIX, SINK, Node, Plan
from pydotcompute.errors import JournalError

__all__ = ["RepairOutcome", "RepairSession", "cancel_items", "retry_items"]

# The graph is not known here, only where items finish: dead letters are re-queued at
# their own (call) node's input, never at the sink or as a join's part.
_SINK_ONLY = Plan([Node(SINK, "result", "sink")], (SINK, 0))


@dataclass(frozen=True)
class RepairOutcome:
    """What a retry or cancel did to one item: ``changed`` says whether it did anything,
    ``detail`` what and why (``held`` lists the leases that made it refuse)."""

    key: str
    changed: bool
    detail: str
    held: list[Holder] = field(default_factory=list)


class RepairSession(JournalSession):
    """A writer on one flow of a journal that holds no items: it registers no process,
    renews no lease and checks the flow exists instead of deploying it."""

    def __init__(self, journal: JournalConfig, flow: str) -> None:
        super().__init__(journal, flow, _SINK_ONLY, owner="operator")
        self.what = f"journal {journal.where}"
        self.names: list[str] = []

    def setup(self, conn: Any, now: float) -> None:
        row = conn.execute("SELECT stages FROM flows WHERE name=?", (self.flow,)).fetchone()
        if row is None:
            raise JournalError(f"journal {self.journal.where} has no flow {self.flow!r}")
        self.names = list(json.loads(row[0]))

    def rejoin(self, conn: Any, now: float) -> None:
        pass  # after a reconnect too: not an owner, it holds no liveness lock

    def heartbeat(self, conn: Any, now: float) -> None:
        pass  # it holds no lease

    def release(self, conn: Any, now: float) -> tuple[None, Events]:
        return None, []

    def _held(self, conn: Any, now: float, key: str) -> list[Holder]:
        def read(sql: str, *args: Any) -> list[Any]:
            return list(conn.execute(sql, args).fetchall())

        return live_holders(
            read,
            self.flow,
            [key],
            now,
            self.names,
            lambda owner, seen: bool(self.dialect.owners.gone(read, owner, seen)),
        )

    def op_retry_dead(
        self, conn: Any, now: float, key: str, force: bool
    ) -> tuple[RepairOutcome, Events]:
        """Re-queue the item's dead letters at the stages that failed (``op_retry``)."""
        rows = conn.execute(
            "SELECT node, stage, value FROM dead_letters WHERE flow=? AND key=? ORDER BY node",
            (self.flow, key),
        ).fetchall()
        if not rows:
            state = conn.execute(
                "SELECT state FROM items WHERE flow=? AND key=?", (self.flow, key)
            ).fetchone()
            why = "no such item" if state is None else f"no dead letters (it is {state[0]})"
            return RepairOutcome(key, False, why), []
        routed = [stage for _, stage, _ in rows if str(stage).startswith(ROUTE_PREFIX)]
        if routed:
            # Where a route sends the item is decided by its predicate, which only the
            # program that deployed the flow has.
            return RepairOutcome(
                key,
                False,
                f"it failed in the routing step {routed[0]!r}: retry it from the program "
                "that runs the flow (flow.retry(key)), which can route it",
            ), []
        held = self._held(conn, now, key)
        if held and not force:
            return RepairOutcome(key, False, "refused: " + held[0].describe(), held), []
        reinject = [(int(node), [(int(node), 0, bytes(value))]) for node, _, value in rows]
        done, events = self.op_retry(conn, now, key, reinject)
        stages = ", ".join(sorted({str(stage) for _, stage, _ in rows}))
        detail = f"re-queued at {stages}" if done else "retried meanwhile by someone else"
        return RepairOutcome(key, bool(done), detail, held), events

    def op_cancel_item(
        self, conn: Any, now: float, key: str, force: bool
    ) -> tuple[RepairOutcome, Events]:
        """Cancel the item (``op_cancel``) unless a live process holds it and not ``force``."""
        held = self._held(conn, now, key)
        if held and not force:
            return RepairOutcome(key, False, "refused: " + held[0].describe(), held), []
        state, events = self.op_cancel(conn, now, key)
        if state == "cancelled" and events:
            detail = "cancelled" + (f" (taken from {held[0].describe()})" if held else "")
            return RepairOutcome(key, True, detail, held), events
        why = {
            "unknown": "no such item",
            "done": "it finished already",
            "cancelled": "it was cancelled already",
        }.get(state, f"it is {state}")
        return RepairOutcome(key, False, why), []


async def _run(journal: Any, flow: str, keys: Sequence[str] | None, op: str, force: bool) -> Any:
    cfg = open_journal(journal)
    if cfg is None:
        raise JournalError("no journal given: pass an SQLite path or a postgresql:// DSN")
    # Checked read-only first: a missing SQLite path must not become a new journal.
    with JournalReader(cfg) as reader:
        reader.node_names(flow)
        if keys is None:
            keys = [
                r[0]
                for r in reader.read(
                    "SELECT DISTINCT key FROM dead_letters WHERE flow=? ORDER BY key", flow
                )
            ]
    session = RepairSession(cfg, flow)
    await session.open()
    try:
        fn = session.op_retry_dead if op == "retry" else session.op_cancel_item
        futures = [session.post(fn, key, force, want=True) for key in dict.fromkeys(keys)]
        return [await f for f in futures if f is not None]
    finally:
        await session.close()


async def retry_items(
    journal: Any, flow: str, keys: Sequence[str] | None = None, *, force: bool = False
) -> list[RepairOutcome]:
    """Send dead-lettered items of ``flow`` back to the stages where they failed, with
    fresh attempts (every dead item when ``keys`` is None). An item part of which a live
    process holds is left alone unless ``force``. One outcome per key."""
    return list(await _run(journal, flow, keys, "retry", force))


async def cancel_items(
    journal: Any, flow: str, keys: Sequence[str], *, force: bool = False
) -> list[RepairOutcome]:
    """Cancel unfinished items of ``flow``: their pending work and dead letters are
    removed and they stay listed as ``cancelled``; ``flow.result(key)`` raises
    ``FlowClosedError``. An item a live process is running is refused unless ``force``."""
    return list(await _run(journal, flow, keys, "cancel", force))
