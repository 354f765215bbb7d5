"""The coordinator: pipelines, fan-out/fan-in, routes and DAGs of stages, run in memory or
durably on a journal, with bounded buffers, retries and dead letters; finished work is
pruned from a journal by ``prune_journal``, ``Flow.prune`` or a ``Retention`` rule."""

from __future__ import annotations

from typing import Any

from pydotcompute.coordinator.flow import Flow
from pydotcompute.coordinator.fusion import FusedSegment, FusionReport, NotFused
from pydotcompute.coordinator.graph import (
    DAG,
    FanIn,
    FanOut,
    Graph,
    Pipeline,
    Route,
    Stage,
    route,
    stage,
)
from pydotcompute.coordinator.journal import PostgresJournal, SQLiteJournal, open_journal
from pydotcompute.coordinator.journal_reader import JournalReader
from pydotcompute.coordinator.journal_repair import RepairOutcome, cancel_items, retry_items
from pydotcompute.coordinator.plan import compile_graph
from pydotcompute.coordinator.records import DeadLetter
from pydotcompute.coordinator.retention import Pruned, Retention, prune_journal
from pydotcompute.coordinator.retry import RetryPolicy

__all__ = [
    "DAG",
    "DEFAULT_JOURNAL",
    "DeadLetter",
    "FanIn",
    "FanOut",
    "Flow",
    "FusedSegment",
    "FusionReport",
    "Graph",
    "JournalReader",
    "NotFused",
    "Pipeline",
    "Pruned",
    "Retention",
    "RetryPolicy",
    "Route",
    "PostgresJournal",
    "RepairOutcome",
    "SQLiteJournal",
    "Stage",
    "cancel_items",
    "deploy",
    "prune_journal",
    "retry_items",
    "route",
    "stage",
]


class _DefaultJournal:
    def __repr__(self) -> str:
        return "DEFAULT_JOURNAL"


DEFAULT_JOURNAL: Any = _DefaultJournal()
"""``journal=`` default of :func:`deploy`: use the runtime's journal (None without a runtime)."""


async def deploy(runtime: Any, graph: Any, *, name: str, journal: Any = DEFAULT_JOURNAL) -> Flow:
    """Validate ``graph``, start its workers and return the running :class:`Flow`.

    ``runtime`` (a RingKernelRuntime, or None for function-only graphs) runs kernel-id
    stages and closes the flow when it shuts down. ``journal``: None (in memory), a
    path (SQLite), a ``postgresql://`` DSN, an :class:`SQLiteJournal` or a
    :class:`PostgresJournal`; by default the runtime's own journal.
    """
    plan = compile_graph(graph)
    if journal is DEFAULT_JOURNAL:
        journal = getattr(runtime, "journal", None) if runtime is not None else None
    flow = Flow(plan, name=name, runtime=runtime, journal=open_journal(journal))
    await flow.start()
    if runtime is not None:
        runtime.add_closer(flow.close)  # no worker or process outlives the runtime
    return flow
