"""What a flow's workers record items in: the ledger contract.

A :class:`~pydotcompute.coordinator.flow.Flow` runs one set of workers per stage. Where
its items live — their state, results, dead letters, what is still to be done — is its
ledger's business: :class:`~pydotcompute.coordinator.ledger_memory.MemoryLedger` keeps
them in this process, :class:`~pydotcompute.coordinator.ledger_journal.JournalLedger`
in a durable journal shared with other processes. The workers only hand a ledger each
item's outcome (passed on, retried later, dead) and ask it what callers want to know.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, Protocol

from pydotcompute.coordinator.channel import Channel
from pydotcompute.coordinator.plan import Node
from pydotcompute.coordinator.records import DeadLetter, Token
from pydotcompute.coordinator.retention import Retention

__all__ = ["Ledger", "SplitFailed"]


class SplitFailed(Exception):
    """A split node's choice raised: the item goes to the dead letters at that node."""

    def __init__(self, node: Node, value: Any, exc: Exception) -> None:
        super().__init__(node, value, exc)
        self.node, self.value, self.exc = node, value, exc


class Ledger(Protocol):
    """Where a flow's items live. One ledger per flow; every method runs on its loop
    (``status``, ``items``, ``dead_letters`` and ``in_flight`` may be called from
    another thread: they only copy)."""

    poll: float | None
    """Seconds between looks for progress made elsewhere; None when this process sees
    every change itself (waits then end only on its own events)."""

    hungry: set[int]
    """Nodes whose worker, on taking items, should wake the ledger's claiming."""

    # ---- lifetime
    async def open(self) -> None:
        """Get ready before the workers start."""

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """Loops to run beside the workers once they are ready (claiming, retention)."""

    def stop_admitting(self) -> None:
        """The flow is closing: wake submits waiting for room."""

    async def close(self, reason: str, *, cancel_items: bool) -> None:
        """After the workers stopped: let go of the storage; ``cancel_items`` ends
        unfinished items that cannot be resumed with ``reason``."""

    # ---- what the workers hand over
    async def submit(self, keys: list[str], values: list[Any]) -> None:
        """Add items not seen before at the flow's entry."""

    def inline_hop(self, node: Node) -> tuple[Channel | None, Callable[[str, Any], None] | None]:
        """A worker's shortcut for ``node``'s usual hop: the next stage's channel to put
        outputs in directly, or the call that finishes an item at the sink; (None, None)
        when every output must go through :meth:`forward`."""

    async def forward(self, node: Node, tok: Token, out: Any) -> None:
        """``node`` produced ``out`` for ``tok``: record the hop and pass it on."""

    def retry_later(self, node: Node, tok: Token, attempt: int, delay: float) -> None:
        """``tok`` failed at ``node`` and runs there again after ``delay`` seconds."""

    def wake_claims(self) -> None:
        """A worker took items at a node in :attr:`hungry`."""

    def bury(self, node: int, rec: DeadLetter) -> None:
        """The item failed for good at ``node``: it goes to the dead letters."""

    def filter(self, node: Node, tok: Token) -> None:
        """``node`` consumed ``tok`` without output: the item ends there, filtered
        (neither failed nor retried)."""

    # ---- what callers ask
    def in_flight(self) -> int:
        """Items this process holds (durable) or has not finished (in memory)."""

    def status(self) -> dict[str, int]:
        """Number of items per state."""

    def items(self, state: str | None) -> list[str]:
        """Keys in ``state`` (all when None), in submission order."""

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead-letter record."""

    async def retry(self, key: str) -> bool:
        """Send a dead-lettered item back where it failed; False if it has none."""

    async def prune(self, rule: Retention) -> int:
        """Forget the finished items ``rule`` lets go; how many went."""

    async def final(self, key: str) -> tuple[str, Any] | None:
        """(state, value or record or reason) once ``key`` finished; None while active.
        Raises KeyError for a key the ledger does not know."""

    def waiters(self, key: str) -> list[asyncio.Future[None]]:
        """Futures woken when ``key`` may have finished (a caller appends its own)."""

    async def pending(self) -> int:
        """Items still active."""

    async def state_counts(self) -> dict[str, int]:
        """:meth:`status`, without holding up the event loop."""

    async def flush(self) -> None:
        """Make what the workers handed over visible to readers."""

    def results(self) -> AsyncGenerator[tuple[str, Any], None]:
        """(key, output) of finished items in completion order, ending once none is
        active."""
