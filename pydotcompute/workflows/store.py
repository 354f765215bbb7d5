"""Where workflows keep their history: two tables in the coordinator's journal.

Writes are *ops* queued by workflow tasks and applied by the journal's writer
(:class:`JournalWriter`), many per transaction (group commit), in the order they were
queued: a call's record is never durable without the records queued before it. Every
write of a running workflow checks that this engine still owns it (``owner``), so a
workflow cancelled, restarted or taken over by another process cannot be written by the
old run.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from pydotcompute.coordinator.journal import JournalConfig, register_owner
from pydotcompute.coordinator.journal_writer import JournalWriter, Op
from pydotcompute.coordinator.retention import BATCH, GRAPH_FLOWS, Retention, prune_bound

__all__ = [
    "CallRow",
    "WorkflowStore",
    "count_workflows",
    "forget_children",
    "prune_workflows",
    "read_calls",
    "read_pending_tasks",
    "read_workflow",
    "read_workflows",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS workflows(
    key TEXT PRIMARY KEY, name TEXT NOT NULL, parent TEXT, state TEXT NOT NULL,
    input BLOB NOT NULL, result BLOB, error TEXT, calls INTEGER NOT NULL DEFAULT 0, step TEXT,
    owner TEXT, owner_host TEXT, owner_pid INTEGER, lease_until REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS workflows_state ON workflows(state, created);
CREATE INDEX IF NOT EXISTS workflows_parent ON workflows(parent) WHERE parent IS NOT NULL;
CREATE INDEX IF NOT EXISTS workflows_finished ON workflows(updated, key)
    WHERE parent IS NULL AND state <> 'running';
CREATE TABLE IF NOT EXISTS workflow_calls(
    workflow TEXT NOT NULL, pos INTEGER NOT NULL, kind TEXT NOT NULL, step TEXT NOT NULL,
    args BLOB NOT NULL, state TEXT NOT NULL, result BLOB, error TEXT, task_key TEXT,
    created REAL NOT NULL, finished REAL, PRIMARY KEY(workflow, pos)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS workflow_call_tasks
    ON workflow_calls(task_key) WHERE task_key IS NOT NULL;
"""

# One call record: what was called at a position and how it ended.
CallRow = tuple[str, str, bytes, str, bytes | None, str | None, str | None]
# (kind, step, args, state, result, error, task_key)

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
ENGINES = ""  # the ``flow`` of workflow engines in the journal's owners table
STATES = (RUNNING, DONE, FAILED, CANCELLED)

# The workflow and every workflow started from it, at any depth.
DESCENDANTS = """WITH RECURSIVE d(k) AS (
    SELECT key FROM workflows WHERE key=?
    UNION SELECT w.key FROM workflows w JOIN d ON w.parent = d.k) """


def forget_children(conn: Any, key: str) -> None:
    """Delete every record a workflow's calls made: call rows, child workflows (at any
    depth) and the items its graph calls put into flows (keyed ``<key>/<pos>``)."""
    keys = [r[0] for r in conn.execute(DESCENDANTS + "SELECT k FROM d", (key,)).fetchall()]
    graphs = [
        r[0]
        for r in conn.execute("SELECT name FROM flows WHERE name LIKE ?", (GRAPH_FLOWS,)).fetchall()
    ]
    for k in keys:
        conn.execute("DELETE FROM workflow_calls WHERE workflow=?", (k,))
        # Keys from "<k>/" up to "<k>0" ("0" follows "/"): a range the (flow, key)
        # indexes find, where a prefix test read every row of the table.
        low, high = k + "/", k + "0"
        for flow in graphs:
            for table in ("items", "tokens", "results", "dead_letters"):
                conn.execute(
                    f"DELETE FROM {table} WHERE flow=? AND key>=? AND key<?", (flow, low, high)
                )
    conn.execute(
        DESCENDANTS + "DELETE FROM workflows WHERE key IN (SELECT k FROM d) AND key<>?",
        (key, key),
    )


def prune_workflows(
    conn: Any,
    dialect: Any,
    now: float,
    rule: Retention,
    after: tuple[float, str] | None,
    limit: int = BATCH,
) -> tuple[int, tuple[float, str] | None]:
    """Inside an open write transaction: delete up to ``limit`` finished top-level
    workflows that ``rule`` lets go (after ``after``, the (updated, key) where the last
    call stopped), each with everything it made; one with a workflow still running below
    it stays. Returns how many went and where to go on (None: done for now)."""
    finished = "parent IS NULL AND state <> 'running'"  # the workflows_finished index
    bound = prune_bound(
        conn,
        f"SELECT updated, key FROM workflows WHERE {finished} "
        "ORDER BY updated DESC, key DESC LIMIT 1 OFFSET ?",
        [],
        rule,
        now,
    )
    if bound is None:
        return 0, None
    sql = f"SELECT key, updated FROM workflows WHERE {finished} AND (updated < ? OR (updated = ? AND key <= ?))"
    args: list[Any] = [bound[0], bound[0], bound[1]]
    if after is not None:
        sql += " AND (updated > ? OR (updated = ? AND key > ?))"
        args += [after[0], after[0], after[1]]
    rows = conn.execute(
        sql + " ORDER BY updated, key LIMIT ?" + dialect.for_update, [*args, limit]
    ).fetchall()
    gone = 0
    for key, _ in rows:
        busy = conn.execute(
            DESCENDANTS + "SELECT 1 FROM workflows WHERE key IN (SELECT k FROM d) "
            "AND state='running' LIMIT 1",
            (key,),
        ).fetchone()
        if busy is None:
            forget_children(conn, key)
            gone += conn.execute("DELETE FROM workflows WHERE key=?", (key,)).rowcount
    return gone, ((float(rows[-1][1]), rows[-1][0]) if len(rows) == limit else None)


class LostOwnership(Exception):
    """This engine no longer runs the workflow (cancelled, restarted, taken over)."""


class WorkflowStore(JournalWriter):
    """The workflow tables of one journal, written through the journal's writer."""

    what = "the workflow journal"

    def __init__(self, journal: JournalConfig, owner: str) -> None:
        super().__init__(journal)
        self.owner = owner
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._refusals: tuple[type[Exception], ...] = (
            LostOwnership,
            LookupError,
            ValueError,
            *self.dialect.refusals(),
        )

    def post(self, fn: Any, *args: Any, want: bool = True) -> Any:
        return super().post(fn, *args, want=want)

    # ---- writer hooks -------------------------------------------------------------------
    def setup(self, conn: Any, now: float) -> None:
        self.dialect.create(conn, SCHEMA)
        self.rejoin(conn, now)

    def rejoin(self, conn: Any, now: float) -> None:
        # Listed among the journal's owners (under no flow), holding a liveness lock:
        # how other engines know for sure that this one died (``coordinator.liveness``).
        register_owner(conn, self.dialect, self.owner, ENGINES, now)

    def apply(self, conn: Any, now: float, ops: list[Op]) -> list[Any]:
        results: list[Any] = []
        for fn, args, _ in ops:
            conn.execute("SAVEPOINT op")
            try:
                results.append(fn(conn, now, *args))
                conn.execute("RELEASE SAVEPOINT op")
            except self._refusals as exc:
                # The op's own refusal: undo just this op, keep the batch.
                conn.execute("ROLLBACK TO SAVEPOINT op")
                conn.execute("RELEASE SAVEPOINT op")
                results.append(exc)
        return results

    def heartbeat(self, conn: Any, now: float) -> None:
        self.op_heartbeat(conn, now)

    def release(self, conn: Any, now: float) -> None:
        self.op_release(conn, now)

    # ---- ops: run by the writer inside a transaction -----------------------------------
    def _own(self, conn: Any, key: str, now: float, step: str | None) -> None:
        cur = conn.execute(
            "UPDATE workflows SET calls=calls+1, step=coalesce(?, step), updated=? "
            "WHERE key=? AND owner=? AND state='running'",
            (step, now, key, self.owner),
        )
        if cur.rowcount != 1:
            raise LostOwnership(key)

    def _claimable(self, conn: Any, row: tuple[Any, ...], now: float) -> bool:
        owner, _host, _pid, until = row
        if owner is None or owner == self.owner or until < now:
            return True
        # An engine whose liveness lock is free is gone and cannot renew its lease: free
        # every workflow it held now instead of waiting for the lease.
        seen = conn.execute("SELECT seen FROM owners WHERE owner=?", (owner,)).fetchone()
        if seen is None or not self.dialect.owners.dead(conn, owner, seen[0]):
            return False
        conn.execute(
            "UPDATE workflows SET owner=NULL, lease_until=0 WHERE owner=? AND state='running'",
            (owner,),
        )
        conn.execute("DELETE FROM owners WHERE owner=?", (owner,))
        return True

    def _claim(self, conn: Any, key: str, now: float) -> None:
        conn.execute(
            "UPDATE workflows SET owner=?, owner_host=?, owner_pid=?, lease_until=? WHERE key=?",
            (self.owner, self.host, self.pid, now + self.journal.lease, key),
        )

    def op_start(
        self,
        conn: Any,
        now: float,
        key: str,
        name: str,
        parent: str | None,
        blob: bytes,
    ) -> tuple[str, bool, dict[int, CallRow], bytes | None]:
        """Add the workflow, or find it: (state, claimed by us, history and stored input
        if it was there already and we claimed it)."""
        cur = conn.execute(
            "INSERT INTO workflows(key, name, parent, state, input, owner, owner_host, "
            "owner_pid, lease_until, created, updated) VALUES(?,?,?,'running',?,?,?,?,?,?,?) "
            "ON CONFLICT DO NOTHING",
            (
                key,
                name,
                parent,
                blob,
                self.owner,
                self.host,
                self.pid,
                now + self.journal.lease,
                now,
                now,
            ),
        )
        if cur.rowcount == 1:
            return RUNNING, True, {}, None
        row = conn.execute(
            "SELECT name, state, owner, owner_host, owner_pid, lease_until, input FROM workflows "
            "WHERE key=?" + self.dialect.for_update,  # two engines must not both claim it
            (key,),
        ).fetchone()
        if row[0] != name:
            raise ValueError(f"workflow key {key!r} is already used by workflow {row[0]!r}")
        if row[1] != RUNNING or not self._claimable(conn, row[2:6], now):
            return row[1], False, {}, None
        self._claim(conn, key, now)
        return RUNNING, True, self.history(conn, key), row[6]

    def history(self, conn: Any, key: str) -> dict[int, CallRow]:
        return {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT pos, kind, step, args, state, result, error, task_key "
                "FROM workflow_calls WHERE workflow=?",
                (key,),
            )
        }

    def op_call(
        self,
        conn: Any,
        now: float,
        key: str,
        pos: int,
        kind: str,
        step: str,
        args: bytes,
        state: str,
        result: bytes | None,
        error: str | None,
        task_key: str | None,
        took: float = 0.0,
    ) -> None:
        """Record one call at ``pos``: done, failed, or (a task) waiting. ``took``: how
        long it ran, measured by the caller; ``created`` is when it started by the
        journal's clock, ``finished`` when it was recorded."""
        self._own(conn, key, now, step)
        conn.execute(
            "INSERT INTO workflow_calls VALUES(?,?,?,?,?,?,?,?,?,?,?)",
            (
                key,
                pos,
                kind,
                step,
                args,
                state,
                result,
                error,
                task_key,
                now - max(0.0, took),
                None if state == "waiting" else now,
            ),
        )

    def op_finish(
        self,
        conn: Any,
        now: float,
        key: str,
        state: str,
        result: bytes | None,
        error: str | None,
    ) -> None:
        cur = conn.execute(
            "UPDATE workflows SET state=?, result=?, error=?, owner=NULL, lease_until=0, "
            "updated=? WHERE key=? AND owner=? AND state='running'",
            (state, result, error, now, key, self.owner),
        )
        if cur.rowcount != 1:
            raise LostOwnership(key)

    def op_complete(
        self, conn: Any, now: float, step: str, task_key: str, result: bytes
    ) -> tuple[str, int] | None:
        """Finish a waiting task item of a running workflow: (workflow, pos), or None."""
        row = conn.execute(
            "SELECT c.workflow, c.pos FROM workflow_calls c JOIN workflows w ON w.key=c.workflow "
            "WHERE c.task_key=? AND c.step=? AND c.state='waiting' AND w.state='running'",
            (task_key, step),
        ).fetchone()
        if row is None:
            return None
        cur = conn.execute(
            "UPDATE workflow_calls SET state='done', result=?, finished=? "
            "WHERE task_key=? AND state='waiting'",
            (result, now, task_key),
        )
        return (row[0], row[1]) if cur.rowcount == 1 else None  # another answer came first

    def op_cancel(self, conn: Any, now: float, key: str, reason: str) -> list[str]:
        """Cancel a running workflow and its running descendants; returns their keys."""
        keys = [
            r[0]
            for r in conn.execute(
                DESCENDANTS
                + "SELECT key FROM workflows WHERE key IN (SELECT k FROM d) AND state='running'",
                (key,),
            )
        ]
        conn.execute(
            DESCENDANTS + "UPDATE workflows SET state='cancelled', error=?, owner=NULL, "
            "lease_until=0, updated=? WHERE key IN (SELECT k FROM d) AND state='running'",
            (key, reason, now),
        )
        return keys

    def _forget_children(self, conn: Any, key: str) -> None:
        forget_children(conn, key)

    def op_restart(self, conn: Any, now: float, key: str) -> tuple[str, bytes]:
        """Forget everything the workflow did and run it again, owned by us: (name, input)."""
        row = conn.execute("SELECT name, input FROM workflows WHERE key=?", (key,)).fetchone()
        if row is None:
            raise LookupError(key)
        self._forget_children(conn, key)
        conn.execute(
            "UPDATE workflows SET state='running', result=NULL, error=NULL, calls=0, step=NULL, "
            "updated=? WHERE key=?",
            (now, key),
        )
        self._claim(conn, key, now)
        return row[0], row[1]

    def op_delete(self, conn: Any, now: float, key: str) -> bool:
        self._forget_children(conn, key)
        deleted: bool = conn.execute("DELETE FROM workflows WHERE key=?", (key,)).rowcount == 1
        return deleted

    def op_heartbeat(self, conn: Any, now: float) -> None:
        conn.execute(
            "UPDATE workflows SET lease_until=? WHERE owner=? AND state='running'",
            (now + self.journal.lease, self.owner),
        )
        conn.execute("UPDATE owners SET seen=? WHERE owner=?", (now, self.owner))

    def op_prune(
        self, conn: Any, now: float, rule: Retention, after: tuple[float, str] | None
    ) -> tuple[int, tuple[float, str] | None]:
        """Up to ``BATCH`` finished top-level workflows that ``rule`` lets go."""
        return prune_workflows(conn, self.dialect, now, rule, after)

    def op_release(self, conn: Any, now: float) -> None:
        conn.execute("UPDATE workflows SET owner=NULL, lease_until=0 WHERE owner=?", (self.owner,))
        conn.execute("DELETE FROM owners WHERE owner=?", (self.owner,))

    # ---- reads (event loop, committed state) ------------------------------------------
    async def acall_outcome(self, task_key: str) -> tuple[str, Any] | None:
        """(state, pickled result) of the recorded call ``task_key``; None if unknown."""
        rows = await self.aread(
            "SELECT state, result FROM workflow_calls WHERE task_key=?", task_key
        )
        return (rows[0][0], rows[0][1]) if rows else None

    async def awaiting_args(self, task_key: str, step: str) -> bytes | None:
        """The pickled arguments of task item ``task_key`` of ``step`` while it waits for
        an answer; None when no such item waits."""
        rows = await self.aread(
            "SELECT args FROM workflow_calls WHERE task_key=? AND step=? AND state='waiting'",
            task_key,
            step,
        )
        return rows[0][0] if rows else None

    async def aoutcome(self, key: str) -> tuple[str, Any, str | None] | None:
        """(state, pickled result, error text) of workflow ``key``; None if unknown."""
        rows = await self.aread("SELECT state, result, error FROM workflows WHERE key=?", key)
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def workflow(self, key: str) -> Any | None:
        """Workflow ``key`` (``WORKFLOW_COLUMNS``); None if unknown."""
        rows = self.read(f"SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE key=?", key)
        return rows[0] if rows else None

    async def arunning_top_level(self) -> list[tuple[str, str]]:
        """(key, name) of running workflows that no workflow started, oldest first."""
        return await self.aread(
            "SELECT key, name FROM workflows WHERE state='running' AND parent IS NULL "
            "ORDER BY created"
        )


# ---- reads for people looking at a journal (the journal commands, the dashboard) --------
Read = Callable[..., list[Any]]
"""``read(sql, *args)``: rows of a query on committed state."""

WORKFLOW_COLUMNS = "key, name, state, calls, step, error, parent, created, updated"


def read_workflows(
    read: Read, states: list[str] | None = None, limit: int | None = None
) -> list[Any]:
    """Workflows (``WORKFLOW_COLUMNS``), oldest first; only those in ``states`` if given."""
    sql = f"SELECT {WORKFLOW_COLUMNS} FROM workflows"
    args: list[Any] = []
    if states:
        sql += f" WHERE state IN ({','.join('?' * len(states))})"
        args += states
    sql += " ORDER BY created, key"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return read(sql, *args)


def count_workflows(read: Read, state: str) -> int:
    """How many workflows are in ``state``."""
    return int(read("SELECT count(*) FROM workflows WHERE state=?", state)[0][0])


def read_workflow(read: Read, key: str) -> Any | None:
    """One workflow: ``WORKFLOW_COLUMNS``, then its pickled input and result; None if
    the journal has no such key."""
    rows = read(f"SELECT {WORKFLOW_COLUMNS}, input, result FROM workflows WHERE key=?", key)
    return rows[0] if rows else None


def read_calls(read: Read, key: str) -> list[Any]:
    """The workflow's recorded calls in order: pos, kind, step, args, state, result,
    error, task_key, created (when it started), finished."""
    return read(
        "SELECT pos, kind, step, args, state, result, error, task_key, created, finished "
        "FROM workflow_calls WHERE workflow=? ORDER BY pos",
        key,
    )


def read_pending_tasks(read: Read, step: str | None = None) -> list[Any]:
    """Task items waiting for an answer in running workflows, oldest first: task_key,
    step (the task's name), workflow, args (pickled ``((request,), {})``), created."""
    sql = (
        "SELECT c.task_key, c.step, c.workflow, c.args, c.created FROM workflow_calls c "
        "JOIN workflows w ON w.key=c.workflow WHERE c.kind='task' AND c.state='waiting' "
        "AND w.state='running'"
    )
    args: list[Any] = []
    if step is not None:
        sql += " AND c.step=?"
        args.append(step)
    return read(sql + " ORDER BY c.created, c.task_key", *args)
