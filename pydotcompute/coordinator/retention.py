"""Keeping a journal bounded: finished items and workflows pruned by age or by count.

Only what is finished goes: items that are ``done`` or ``cancelled`` (and, when asked,
``dead``) with no token left anywhere in the graph, and top-level workflows that are ``done``, ``failed``
or ``cancelled`` with no running workflow below them. Each goes whole, with its result,
dead letters, call records, child workflows and the items its graph calls made, in
transactions of a few hundred, so a running flow's writer is never held up for long.
A pruned key is forgotten: submitting it again runs it again.

Three ways in, one set of SQL: :func:`prune_journal` for a journal given by its path or
DSN (what ``pydotcompute prune`` calls), ``await flow.prune(...)`` and
``await engine.prune(...)`` on a running flow or workflow engine, and a ``retention=``
option on the journal that has running flows and engines prune themselves.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydotcompute.errors import InvalidConfigurationError, JournalError

__all__ = ["Pruned", "Retention", "prune_items", "prune_journal"]

log = logging.getLogger("pydotcompute.coordinator")

BATCH = 500  # items or workflows per transaction
GRAPH_FLOWS = "workflow-graph-%"  # items of workflows' graph calls: they go with the workflow
# Finished items in the order pruning takes them (rows join it when they finish).
ITEMS_INDEX = (
    "CREATE INDEX IF NOT EXISTS items_finished ON items(flow, finished, key) "
    "WHERE finished IS NOT NULL"
)


def seconds(age: float | timedelta | None, what: str) -> float | None:
    if age is None:
        return None
    value = age.total_seconds() if isinstance(age, timedelta) else float(age)
    if not value >= 0 or math.isinf(value):
        raise InvalidConfigurationError(f"{what} is a finite age in seconds >= 0, got {age!r}")
    return value


@dataclass(frozen=True)
class Retention:
    """What to keep of what is finished; the rest is pruned.

    ``older_than``: seconds (or a ``timedelta``) since an item or workflow finished;
    ``keep``: the newest this many finished items per flow (and top-level workflows)
    always stay. With both, what is older *and* not among the newest ``keep`` goes.
    ``dead_letters``: also prune dead-lettered items (kept by default: they wait for a
    person). ``every``: how often (seconds) running flows and engines prune by it.
    """

    older_than: float | None = None
    keep: int | None = None
    dead_letters: bool = False
    every: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "older_than", seconds(self.older_than, "older_than"))
        if self.older_than is None and self.keep is None:
            raise InvalidConfigurationError(
                "a retention rule needs older_than (an age) or keep (a count), or both"
            )
        if self.keep is not None and (
            not isinstance(self.keep, int) or isinstance(self.keep, bool) or self.keep < 0
        ):
            raise InvalidConfigurationError(f"keep is a count >= 0, got {self.keep!r}")
        if not self.every > 0:
            raise InvalidConfigurationError(f"every is in seconds > 0, got {self.every!r}")


def check_retention(value: Any) -> None:
    """A journal's ``retention=``: None or a :class:`Retention`."""
    if value is not None and not isinstance(value, Retention):
        raise InvalidConfigurationError(
            f"retention is a Retention(older_than=..., keep=...) or None, got {value!r}"
        )


@dataclass(frozen=True)
class Pruned:
    """What a prune removed: finished ``items`` and top-level ``workflows`` (each with
    everything that belonged to it)."""

    items: int = 0
    workflows: int = 0


def prune_bound(
    conn: Any, sql: str, args: list[Any], rule: Retention, now: float
) -> tuple[float, str] | None:
    """The newest (time, key) that may go, as a bound on ``(time, key) <= bound``: the
    older_than cutoff and the (keep + 1)-th newest finished row, whichever is lower.
    None: nothing may go."""
    bound: tuple[float, str] | None = None
    if rule.keep is not None:
        row = conn.execute(sql, [*args, rule.keep]).fetchone()
        if row is None:
            return None  # no more than ``keep`` finished: all stay
        bound = (float(row[0]), str(row[1]))
    if rule.older_than is not None:
        cutoff = now - rule.older_than
        if bound is None or cutoff <= bound[0]:
            # strictly older than the cutoff: (time, key) <= (cutoff - epsilon, any key)
            bound = (math.nextafter(cutoff, -math.inf), "\U0010ffff")
    return bound


def prune_items(
    conn: Any, dialect: Any, now: float, rule: Retention, flow: str, limit: int = BATCH
) -> int:
    """Inside an open write transaction: delete up to ``limit`` finished items of
    ``flow`` that ``rule`` lets go, with their results and dead letters. Returns how
    many went (fewer than ``limit``: none is left to prune now)."""
    # Cancelled (by an operator: ``journal_repair``) is as finished as done.
    # Filtered (a stage consumed it without output) too.
    states = ("done", "cancelled", "filtered") + (("dead",) if rule.dead_letters else ())
    marks = ",".join("?" * len(states))
    bound = prune_bound(
        conn,
        "SELECT finished, key FROM items WHERE flow=? AND finished IS NOT NULL "
        "ORDER BY finished DESC, key DESC LIMIT 1 OFFSET ?",
        [flow],
        rule,
        now,
    )
    if bound is None:
        return 0
    keys = [
        r[0]
        for r in conn.execute(
            f"SELECT key FROM items WHERE flow=? AND finished IS NOT NULL AND state IN ({marks}) "
            "AND (finished < ? OR (finished = ? AND key <= ?)) AND NOT EXISTS "
            "(SELECT 1 FROM tokens t WHERE t.flow=items.flow AND t.key=items.key) "
            "ORDER BY finished, key LIMIT ?" + dialect.for_update,
            [flow, *states, bound[0], bound[0], bound[1], limit],
        ).fetchall()
    ]
    if not keys:
        return 0
    among, args = dialect.among("key", keys)
    gone = conn.execute(
        f"DELETE FROM items WHERE flow=? AND state IN ({marks}) AND {among}",
        [flow, *states, *args],
    ).rowcount
    for table in ("results", "dead_letters"):
        conn.execute(f"DELETE FROM {table} WHERE flow=? AND {among}", [flow, *args])
    return int(gone)


def pruned_flows(conn: Any, flow: str | None) -> list[str]:
    """The flows a journal-wide prune looks at (not workflows' graph flows)."""
    if flow is not None:
        return [flow]
    return [
        r[0]
        for r in conn.execute(
            "SELECT name FROM flows WHERE name NOT LIKE ? ORDER BY name", (GRAPH_FLOWS,)
        ).fetchall()
    ]


# ---- a journal given by its path or DSN ------------------------------------------------


def _has_table(conn: Any, dialect: Any, name: str) -> bool:
    if dialect.name == "sqlite":
        sql = "SELECT count(*) FROM sqlite_master WHERE type='table' AND name=?"
    else:
        sql = "SELECT to_regclass(?) IS NOT NULL"
    return bool(conn.execute(sql, (name,)).fetchone()[0])


def _transact(conn: Any, dialect: Any, what: str, fn: Any, *args: Any) -> Any:
    """Run ``fn(now, *args)`` in one write transaction, waiting for a busy journal (another
    writer) and running it again if another writer raced it."""
    deadline = time.monotonic() + 60.0
    attempt = 0
    while True:
        now = dialect.try_begin(conn)
        if now is None:
            if time.monotonic() > deadline:
                raise JournalError(f"{what} stayed locked by another writer for 60 s")
            time.sleep(0.005)
            continue
        try:
            out = fn(now, *args)
            dialect.commit(conn)
            return out
        except Exception as exc:
            dialect.rollback(conn)
            if attempt < 20 and dialect.retryable(exc):
                attempt += 1
                time.sleep(0.01 * attempt)
                continue
            if isinstance(exc, dialect.driver_errors()):
                raise JournalError(f"{what} failed: {exc}") from exc
            raise


def _items(now: float, conn: Any, dialect: Any, rule: Retention, flow: str) -> int:
    return prune_items(conn, dialect, now, rule, flow)


def _workflows(
    now: float, conn: Any, dialect: Any, rule: Retention, after: Any, fn: Any
) -> tuple[int, Any]:
    return fn(conn, dialect, now, rule, after)  # type: ignore[no-any-return]


def prune_journal(
    journal: Any,
    *,
    older_than: float | timedelta | None = None,
    keep: int | None = None,
    flow: str | None = None,
    items: bool = True,
    workflows: bool = True,
    dead_letters: bool = False,
) -> Pruned:
    """Prune what is finished from a journal: an SQLite path, a ``postgresql://`` DSN,
    an :class:`SQLiteJournal` or a :class:`PostgresJournal`. Safe while flows and
    workflows run on it (in other processes too); nothing unfinished is touched.

    ``older_than`` (seconds or a ``timedelta``) and ``keep`` (a count) as in
    :class:`Retention`; ``flow`` limits item pruning to one flow (all flows otherwise;
    the items of workflows' graph calls go with their workflows); ``items`` and
    ``workflows`` choose what to prune; ``dead_letters`` also prunes dead-lettered items.
    Returns the counts removed. Raises ``JournalError`` if there is no journal there.
    """
    from pydotcompute.coordinator.journal import SQLiteJournal, open_journal

    rule = Retention(seconds(older_than, "older_than"), keep, dead_letters)
    cfg = open_journal(journal)
    if cfg is None:
        raise JournalError("prune_journal needs a journal, got None")
    if isinstance(cfg, SQLiteJournal) and not os.path.exists(cfg.path):
        raise JournalError(f"no journal at {cfg.path}")
    dialect: Any = cfg.dialect()
    if dialect.name != "sqlite":
        probe = dialect.reader()
        try:
            if not _has_table(probe, dialect, "pydotcompute_journal"):
                raise JournalError(f"no journal in {cfg.where}")
        finally:
            probe.close()
    conn = dialect.writer()
    what = f"prune of journal {cfg.where}"
    try:
        n_items = n_workflows = 0
        if items:
            _transact(conn, dialect, what, lambda now: dialect.create(conn, ITEMS_INDEX))
            for name in _transact(conn, dialect, what, lambda now: pruned_flows(conn, flow)):
                while True:
                    n = _transact(conn, dialect, what, _items, conn, dialect, rule, name)
                    n_items += n
                    if n < BATCH:
                        break
        if workflows and _has_table(conn, dialect, "workflows"):
            # The workflow tables are the workflows layer's: imported only when present.
            from pydotcompute.workflows.store import prune_workflows

            after: tuple[float, str] | None = None
            while True:
                n, after = _transact(
                    conn, dialect, what, _workflows, conn, dialect, rule, after, prune_workflows
                )
                n_workflows += n
                if after is None:
                    break
    finally:
        conn.close()
    if n_items or n_workflows:
        log.info(
            "journal %s: pruned %d finished items and %d finished workflows",
            cfg.where,
            n_items,
            n_workflows,
        )
    return Pruned(items=n_items, workflows=n_workflows)
