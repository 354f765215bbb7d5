"""The durable journal of a deployed flow: SQLite (a file) or PostgreSQL (a DSN).

Every change is an *op* applied inside a write transaction by the journal's one writer
(:class:`JournalWriter`). Ops queue up while a transaction commits and the next
transaction applies all of them (group commit), so a commit carries many complete hops but
never part of one. A hop deletes its input token only if this owner still holds it (the
compare-and-swap) and inserts its outputs in the same transaction; if the delete finds
nothing, the lease was lost and nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from pydotcompute.coordinator.journal_path import check_sqlite_path
from pydotcompute.coordinator.journal_postgres import PostgresJournal, is_postgres_dsn
from pydotcompute.coordinator.journal_sqlite import CHUNK, SQLiteJournal
from pydotcompute.coordinator.journal_writer import JournalWriter, Op
from pydotcompute.coordinator.plan import Node, Plan
from pydotcompute.coordinator.records import (
    ACTIVE,
    CANCELLED,
    DEAD,
    FILTERED,
    DeadLetter,
    decode,
    encode,
)
from pydotcompute.coordinator.retention import ITEMS_INDEX, Retention, prune_items
from pydotcompute.errors import JournalError

__all__ = ["JournalConfig", "JournalSession", "PostgresJournal", "SQLiteJournal", "open_journal"]

log = logging.getLogger("pydotcompute.coordinator")

JournalConfig = SQLiteJournal | PostgresJournal
Dest = tuple[int, int, bytes]  # (node, port, encoded value)
Events = list[tuple[str, str]]  # ("done" | "dead" | "filtered" | "joined" | "lost", key)

# What a second write of the same row replaces (SQLite's INSERT OR REPLACE, said in the
# upsert both engines read).
NEW_TOKEN = (
    "ON CONFLICT(flow, key, node, port) DO UPDATE SET value=excluded.value, failures=0, "
    "owner=NULL, lease_until=0, not_before=0"
)


def open_journal(journal: Any, *, for_writing: bool = True) -> JournalConfig | None:
    """Normalise a ``journal=`` argument: None, a path (SQLite), a ``postgresql://`` DSN,
    an SQLiteJournal or a PostgresJournal. An SQLite path is checked at once (see
    ``check_sqlite_path``): a journal that cannot be opened for writing is refused here,
    with the reason and the fix, not at its first use (``for_writing=False``: a journal
    only read, which a read-only mount or file does not stop). A DSN is only parsed:
    the server is reached when the journal is opened."""
    cfg: JournalConfig | None
    if journal is None or isinstance(journal, (SQLiteJournal, PostgresJournal)):
        cfg = journal
    elif is_postgres_dsn(journal):
        cfg = PostgresJournal(journal)
    elif isinstance(journal, (str, os.PathLike)):
        cfg = SQLiteJournal(os.fspath(journal))
    else:
        raise JournalError(
            "journal must be None, a path, a postgresql:// DSN, an SQLiteJournal or a "
            f"PostgresJournal, got {journal!r}"
        )
    if for_writing and isinstance(cfg, SQLiteJournal):
        check_sqlite_path(cfg.path)
    return cfg


def register_owner(conn: Any, dialect: Any, owner: str, flow: str, now: float) -> None:
    """Hold ``owner``'s liveness lock and record it in ``owners`` (``seen``: now, by the
    journal's clock). Host and pid are kept for people reading the table, never to
    decide whether the owner lives."""
    dialect.owners.hold(conn, owner)
    conn.execute(
        "INSERT INTO owners VALUES(?,?,?,?,?) ON CONFLICT(owner) DO UPDATE SET "
        "flow=excluded.flow, host=excluded.host, pid=excluded.pid, seen=excluded.seen",
        (owner, flow, socket.gethostname(), os.getpid(), now),
    )


def describe_change(old: list[str], new: list[str]) -> str:
    added = [n for n in new if n not in old]
    removed = [n for n in old if n not in new]
    if not added and not removed:
        return "same stages, different wiring or options"
    return f"stages added: {added or 'none'}; stages removed: {removed or 'none'}"


def unreadable(key: str, node: Node, stored: Any, exc: JournalError) -> DeadLetter:
    """The dead letter of an item whose stored input cannot be read back: its value is
    the stored bytes, for a person to look at."""
    return DeadLetter(
        key=key,
        stage=node.name,
        node=node.index,
        error=f"JournalError: its stored input cannot be read back: {exc}",
        traceback="",
        attempts=0,
        failed_at=time.time(),
        value=stored,
    )


class JournalSession(JournalWriter):
    """One deployed flow's connection to the journal: its writer and a reader."""

    def __init__(self, journal: JournalConfig, flow: str, plan: Plan, owner: str) -> None:
        super().__init__(journal)
        self.what = f"journal of flow {flow!r}"
        self.flow = flow
        self.plan = plan
        self.owner = owner
        self.on_events: Callable[[Events], None] = lambda events: None
        self.hops = 0
        self.resumed = 0  # unfinished items found in the journal when it opened
        self._stale: set[str] = set()  # owners whose lapsed leases were said
        # Tokens written and retired inside one transaction never need to reach the file:
        # they wait here until the end of the batch, and a hop that retires one drops it.
        self._pending: dict[tuple[str, int], tuple[bytes, float]] = {}
        self._finished: list[tuple[str, bytes]] = []
        self._owned: dict[tuple[str, int], int] = {}  # our tokens in the file: (key, node) -> id
        self._deletes: list[int] = []

    # ---- writer hooks -----------------------------------------------------------------
    def setup(self, conn: Any, now: float) -> None:
        names = self.plan.stage_names
        conn.execute(
            "INSERT INTO flows VALUES(?,?,?,?) ON CONFLICT DO NOTHING",
            (self.flow, self.plan.fingerprint, json.dumps(names), now),
        )
        fingerprint, stages = conn.execute(
            "SELECT fingerprint, stages FROM flows WHERE name=?", (self.flow,)
        ).fetchone()
        if fingerprint != self.plan.fingerprint:
            change = describe_change(json.loads(stages), names)
            raise JournalError(
                f"journal {self.journal.where} holds flow {self.flow!r} with a different graph "
                f"({change}); deploy it under a new name or use a new journal"
            )
        self.dialect.create(conn, ITEMS_INDEX)  # journals made before pruning lack it
        self._reap(conn)
        self._take_over(conn, now, opening=True)
        self.resumed = conn.execute(
            "SELECT count(DISTINCT key) FROM tokens WHERE flow=?", (self.flow,)
        ).fetchone()[0]
        register_owner(conn, self.dialect, self.owner, self.flow, now)

    def rejoin(self, conn: Any, now: float) -> None:
        # A new connection after an outage: take the liveness lock again (a server restart
        # released it) and say so, before anyone judges this owner by its lock.
        register_owner(conn, self.dialect, self.owner, self.flow, now)

    def apply(self, conn: Any, now: float, ops: list[Op]) -> list[Any]:
        self._prepare(conn, ops)
        results = [fn(conn, now, *args) for fn, args, _ in ops]
        self._flush(conn, now)
        return results

    def reset(self) -> None:
        self._pending.clear()
        self._finished.clear()
        self._deletes.clear()
        self._owned.clear()

    def heartbeat(self, conn: Any, now: float) -> None:
        conn.execute(
            "UPDATE tokens SET lease_until=? WHERE flow=? AND owner=?",
            (now + self.journal.lease, self.flow, self.owner),
        )
        conn.execute("UPDATE owners SET seen=? WHERE owner=?", (now, self.owner))
        self._reap(conn)
        self._take_over(conn, now)

    def release(self, conn: Any, now: float) -> tuple[None, Events]:
        self._release(conn, self.owner)
        return None, []

    def deliver(self, ops: list[Op], results: list[Any]) -> None:
        events: Events = []
        for (fn, _, fut), res in zip(ops, results, strict=True):
            if isinstance(res, BaseException):
                if fut is not None and not fut.done():
                    fut.set_exception(res)
                elif fut is None:
                    self.on_error(res)
                continue
            value, evs = res
            events.extend(evs)
            if fn == self.op_hop and value:
                self.hops += 1
            if fut is not None and not fut.done():
                fut.set_result(value)
        if len(self._ops) <= self.journal.max_batch:
            self._room.set()
        if events:
            self.on_events(events)

    def _prepare(self, conn: Any, ops: list[Any]) -> None:
        """Find, in one step per few hundred keys, the tokens this batch's hops retire,
        and lock them (PostgreSQL) so nobody takes them before this transaction ends."""
        self._owned.clear()
        keys = list({args[0] for fn, args, _ in ops if fn == self.op_hop})
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i : i + CHUNK]
            among, args = self.dialect.among("key", chunk)
            for tid, node, key in self.dialect.rows(
                conn,
                "id, node, key",
                f"FROM tokens WHERE flow=? AND owner=? AND port=0 AND {among}"
                + self.dialect.for_update,
                [self.flow, self.owner, *args],
            ):
                self._owned[(key, node)] = tid

    def _flush(self, conn: Any, now: float) -> None:
        flow = self.flow
        if self._deletes:
            for i in range(0, len(self._deletes), CHUNK):
                chunk = self._deletes[i : i + CHUNK]
                among, args = self.dialect.among("id", chunk)
                conn.execute(f"DELETE FROM tokens WHERE {among}", args)
            self._deletes.clear()
        if self._pending:
            self.dialect.insert(
                conn,
                "INSERT INTO tokens(flow, key, node, port, value, owner, lease_until)",
                7,
                [
                    (flow, k, n, 0, blob, self.owner, until)
                    for (k, n), (blob, until) in self._pending.items()
                ],
                " ON CONFLICT DO NOTHING",
            )
            self._pending.clear()
        if self._finished:
            done = [k for k, _ in self._finished]
            for i in range(0, len(done), CHUNK):
                among, args = self.dialect.among("key", done[i : i + CHUNK])
                conn.execute(
                    f"UPDATE items SET state='done', finished=? WHERE flow=? AND state='active' "
                    f"AND {among}",
                    [now, flow, *args],
                )
            # Result rows are read in ``seq`` order by followers: numbered and committed
            # one writer at a time, a later seq never becomes visible before an earlier.
            self.dialect.lock(conn, f"results/{flow}")
            self.dialect.insert(
                conn,
                "INSERT INTO results(flow, key, value)",
                3,
                [(flow, k, blob) for k, blob in self._finished],
                " ON CONFLICT DO NOTHING",
            )
            self._finished.clear()

    def _reap(self, conn: Any) -> None:
        """Owners whose liveness lock is free are dead (see ``coordinator.liveness``) and
        cannot renew their leases: free their items now instead of waiting for the leases
        to run out."""
        for owner, host, pid, seen in conn.execute(
            "SELECT owner, host, pid, seen FROM owners WHERE flow=? AND owner<>?",
            (self.flow, self.owner),
        ).fetchall():
            if self.dialect.owners.dead(conn, owner, seen):
                n = self._release(conn, owner)
                if owner not in self._stale:  # said already if its leases ran out first
                    self._stale.add(owner)
                    self._taken(
                        owner,
                        n,
                        f"its liveness lock is free: its process (pid {pid} on {host}) is "
                        f"gone ({n} items freed)",
                    )

    def _release(self, conn: Any, owner: str) -> int:
        n = conn.execute(
            "UPDATE tokens SET owner=NULL, lease_until=0 WHERE flow=? AND owner=?",
            (self.flow, owner),
        ).rowcount
        conn.execute("DELETE FROM owners WHERE owner=?", (owner,))
        return int(n)

    def _take_over(self, conn: Any, now: float, opening: bool = False) -> None:
        """Say when another owner stops renewing its leases (a process on another host
        that died, or one that stalls): its items are free to claim once each lease runs
        out, and this frees those whose lease has. Said once per owner; owners long gone
        when this one opens are said only if they still held items."""
        for owner, host, pid, seen in conn.execute(
            "SELECT owner, host, pid, seen FROM owners WHERE flow=? AND owner<>? AND seen<?",
            (self.flow, self.owner, now - self.journal.lease),
        ).fetchall():
            if owner in self._stale:
                continue
            self._stale.add(owner)
            n = conn.execute(
                "UPDATE tokens SET owner=NULL, lease_until=0 WHERE flow=? AND owner=? "
                "AND lease_until<?",
                (self.flow, owner, now),
            ).rowcount
            self._taken(
                owner,
                n if opening else max(1, n),
                f"it (pid {pid} on {host}) renewed no lease for {now - seen:.1f} s, so its "
                f"leases ran out ({n} items freed now, the rest were claimed already)",
            )

    def _taken(self, owner: str, n: int, why: str) -> None:
        if n:
            log.warning(
                "flow %r: the items held by owner %s are taken over: %s", self.flow, owner, why
            )

    # ---- ops (run by the writer, inside a transaction) ------------------------
    def _apply(self, conn: Any, now: float, key: str, dests: list[Dest], events: Events) -> None:
        """Write an item's outputs: finish it, add a join part, or add a token (ours)."""
        flow = self.flow
        for node, port, blob in dests:
            if node == self.plan.sink:
                # Exactly once: only the hop that retired this item's last token gets here.
                self._finished.append((key, blob))
                events.append(("done", key))
            elif port:
                # Parts written by two processes at once would each miss the other's.
                self.dialect.lock(conn, f"join/{flow}/{key}/{node}")
                conn.execute(
                    "INSERT INTO tokens(flow, key, node, port, value) VALUES(?,?,?,?,?) "
                    + NEW_TOKEN,
                    (flow, key, node, port, blob),
                )
                parts = conn.execute(
                    "SELECT port, value FROM tokens WHERE flow=? AND key=? AND node=? AND port>0",
                    (flow, key, node),
                ).fetchall()
                target = self.plan.nodes[node]
                if len(parts) == target.parts:
                    conn.execute(
                        "DELETE FROM tokens WHERE flow=? AND key=? AND node=? AND port>0",
                        (flow, key, node),
                    )
                    try:
                        joined = self.plan.join_value(target, {p: decode(v) for p, v in parts})
                    except JournalError as exc:
                        # A damaged part fails this item, not the flow's whole batch.
                        self._bury(
                            conn, unreadable(key, target, [v for _, v in parts], exc), events
                        )
                        continue
                    # Unleased: whoever has room claims it, like a fresh submission.
                    conn.execute(
                        "INSERT INTO tokens(flow, key, node, port, value) VALUES(?,?,?,0,?) "
                        "ON CONFLICT DO NOTHING",
                        (flow, key, node, encode(joined)),
                    )
                    events.append(("joined", key))
            else:
                self._pending[(key, node)] = (blob, now + self.journal.lease)

    def _take(self, conn: Any, key: str, node: int) -> bool:
        """The compare-and-swap: retire our token, only if we still own it."""
        if self._pending.pop((key, node), None) is not None:
            return True
        tid = self._owned.pop((key, node), None)
        if tid is not None:
            # Ours in the journal, and locked by this transaction (SQLite's write lock,
            # PostgreSQL's row lock from _prepare): nobody can take it before the
            # batched delete at the end of this transaction.
            self._deletes.append(tid)
            return True
        self._flush(conn, time.time())
        cur = conn.execute(
            "DELETE FROM tokens WHERE flow=? AND key=? AND node=? AND port=0 AND owner=?",
            (self.flow, key, node, self.owner),
        )
        taken: bool = cur.rowcount == 1
        return taken

    def op_submit(
        self, conn: Any, now: float, batch: list[tuple[str, list[Dest] | DeadLetter]]
    ) -> tuple[list[bool], Events]:
        """New items with their first tokens (unleased: any process may claim them)."""
        events: Events = []
        known: set[str] = set()
        keys = [k for k, _ in batch]
        for i in range(0, len(keys), 500):
            among, args = self.dialect.among("key", keys[i : i + 500])
            known.update(
                r[0]
                for r in self.dialect.rows(
                    conn, "key", f"FROM items WHERE flow=? AND {among}", [self.flow, *args]
                )
            )
        fresh: list[bool] = []
        items: list[tuple[str, str, str, float]] = []
        tokens: list[tuple[str, str, int, int, bytes]] = []
        later: list[tuple[str, list[Dest] | DeadLetter]] = []
        for key, dests in batch:
            new = key not in known
            fresh.append(new)
            if not new:
                continue
            known.add(key)
            items.append((self.flow, key, "active", now))
            if isinstance(dests, DeadLetter):
                later.append((key, dests))
                continue
            for node, port, blob in dests:
                if port == 0 and node != self.plan.sink:
                    tokens.append((self.flow, key, node, 0, blob))
                else:
                    later.append((key, [(node, port, blob)]))
        self.dialect.insert(conn, "INSERT INTO items(flow, key, state, submitted)", 4, items)
        self.dialect.insert(conn, "INSERT INTO tokens(flow, key, node, port, value)", 5, tokens)
        for key, rest in later:
            if isinstance(rest, DeadLetter):
                self._bury(conn, rest, events)
            else:
                self._apply(conn, now, key, rest, events)
        return fresh, events

    def op_hop(
        self, conn: Any, now: float, key: str, node: int, dests: list[Dest]
    ) -> tuple[bool, Events]:
        events: Events = []
        if not self._take(conn, key, node):
            return False, [("lost", key)]
        self._apply(conn, now, key, dests, events)
        return True, events

    def op_release(
        self,
        conn: Any,
        now: float,
        key: str,
        node: int,
        failures: int,
        not_before: float,
    ) -> tuple[bool, Events]:
        self._flush(conn, now)
        cur = conn.execute(
            "UPDATE tokens SET owner=NULL, lease_until=0, failures=?, not_before=? "
            "WHERE flow=? AND key=? AND node=? AND port=0 AND owner=?",
            (failures, not_before, self.flow, key, node, self.owner),
        )
        return cur.rowcount == 1, []

    def _bury(self, conn: Any, rec: DeadLetter, events: Events) -> None:
        self._flush(conn, rec.failed_at)
        conn.execute(
            "INSERT INTO dead_letters VALUES(?,?,?,?,?,?,?,?,?) ON CONFLICT(flow, key, node) "
            "DO UPDATE SET stage=excluded.stage, value=excluded.value, error=excluded.error, "
            "traceback=excluded.traceback, attempts=excluded.attempts, "
            "failed_at=excluded.failed_at",
            (
                self.flow,
                rec.key,
                rec.node,
                rec.stage,
                encode(rec.value),
                rec.error,
                rec.traceback,
                rec.attempts,
                rec.failed_at,
            ),
        )
        conn.execute(
            "UPDATE items SET state='dead', finished=? WHERE flow=? AND key=? AND state='active'",
            (rec.failed_at, self.flow, rec.key),
        )
        events.append(("dead", rec.key))

    def op_dead(self, conn: Any, now: float, node: int, rec: DeadLetter) -> tuple[bool, Events]:
        events: Events = []
        if not self._take(conn, rec.key, node):
            return False, [("lost", rec.key)]
        self._bury(conn, rec, events)
        return True, events

    def op_filter(self, conn: Any, now: float, key: str, node: int) -> tuple[bool, Events]:
        """A stage consumed the item's token without output: the item ends as filtered."""
        if not self._take(conn, key, node):
            return False, [("lost", key)]
        self._flush(conn, now)
        conn.execute(
            "UPDATE items SET state=?, finished=? WHERE flow=? AND key=? AND state='active'",
            (FILTERED, now, self.flow, key),
        )
        return True, [(FILTERED, key)]

    def op_claim(
        self, conn: Any, now: float, wants: list[tuple[int, int]]
    ) -> tuple[list[tuple[str, int, bytes, int]], Events]:
        """Lease up to n free tokens per node; a token another owner leased is never
        taken (how is the dialect's: see ``claim``)."""
        until = now + self.journal.lease
        out: list[tuple[str, int, bytes, int]] = []
        for node, n in wants:
            rows = self.dialect.claim(conn, self.flow, self.owner, node, n, now, until)
            out.extend((key, node, value, failures) for _, key, value, failures in rows)
        return out, []

    def op_retry(
        self, conn: Any, now: float, key: str, reinject: list[tuple[int, list[Dest]]]
    ) -> tuple[bool, Events]:
        events: Events = []
        self._flush(conn, now)
        took = 0
        for node, dests in reinject:
            cur = conn.execute(
                "DELETE FROM dead_letters WHERE flow=? AND key=? AND node=?", (self.flow, key, node)
            )
            if not cur.rowcount:
                continue
            took += 1
            for dnode, port, blob in dests:
                if port == 0 and dnode != self.plan.sink:
                    conn.execute(
                        "INSERT INTO tokens(flow, key, node, port, value) VALUES(?,?,?,0,?) "
                        + NEW_TOKEN,
                        (self.flow, key, dnode, blob),
                    )
                else:
                    self._apply(conn, now, key, [(dnode, port, blob)], events)
        if took:
            conn.execute(
                "UPDATE items SET state='active', finished=NULL WHERE flow=? AND key=? AND state='dead'",
                (self.flow, key),
            )
            events.append(("joined", key))
        return took > 0, events

    def op_cancel(self, conn: Any, now: float, key: str) -> tuple[str, Events]:
        """Stop an unfinished item for good: its tokens and dead letters go, its row stays
        as ``cancelled``. Returns ``cancelled``, or what kept it: ``done``, ``cancelled``
        (already), ``unknown``."""
        self._flush(conn, now)
        row = conn.execute(
            "SELECT state FROM items WHERE flow=? AND key=?" + self.dialect.for_update,
            (self.flow, key),
        ).fetchone()
        if row is None:
            return "unknown", []
        if row[0] not in (ACTIVE, DEAD):
            return row[0], []
        # A DELETE sees the tokens committed before it began: on PostgreSQL a hop of
        # another process may commit the item's next token meanwhile, so delete until
        # nothing is left (that hop's process then finds its token gone and stops).
        while conn.execute("DELETE FROM tokens WHERE flow=? AND key=?", (self.flow, key)).rowcount:
            pass
        cur = conn.execute(
            "UPDATE items SET state=?, finished=? WHERE flow=? AND key=? "
            "AND state IN ('active', 'dead')",
            (CANCELLED, now, self.flow, key),
        )
        if cur.rowcount != 1:  # it finished while the tokens were being deleted
            return "done", []
        conn.execute("DELETE FROM dead_letters WHERE flow=? AND key=?", (self.flow, key))
        return CANCELLED, [(CANCELLED, key)]

    def op_flush(self, conn: Any, now: float) -> tuple[None, Events]:
        return None, []

    def op_prune(self, conn: Any, now: float, rule: Retention) -> tuple[int, Events]:
        """Up to ``BATCH`` finished items of this flow that ``rule`` lets go."""
        return prune_items(conn, self.dialect, now, rule, self.flow), []

    # ---- reads (event loop, committed state) ----------------------------------------
    DEAD_LETTERS = (
        "SELECT key, stage, node, error, traceback, attempts, failed_at, value "
        "FROM dead_letters WHERE flow=?"
    )

    def _dead_letters_query(self, key: str | None) -> tuple[str, tuple[Any, ...]]:
        order = " ORDER BY failed_at, key, node"
        if key:
            return self.DEAD_LETTERS + " AND key=?" + order, (self.flow, key)
        return self.DEAD_LETTERS + order, (self.flow,)

    def state_counts(self) -> dict[str, int]:
        """Number of this flow's items per state."""
        return dict(self.read(self.STATE_COUNTS, self.flow))

    async def astate_counts(self) -> dict[str, int]:
        """:meth:`state_counts` that waits out an outage without holding up the loop."""
        return dict(await self.aread(self.STATE_COUNTS, self.flow))

    STATE_COUNTS = "SELECT state, count(*) FROM items WHERE flow=? GROUP BY state"

    def keys(self, state: str | None = None) -> list[str]:
        """Keys of this flow's items in ``state`` (all when None), in submission order."""
        if state is None:
            rows = self.read(
                "SELECT key FROM items WHERE flow=? ORDER BY submitted, key", self.flow
            )
        else:
            rows = self.read(
                "SELECT key FROM items WHERE flow=? AND state=? ORDER BY submitted, key",
                self.flow,
                state,
            )
        return [r[0] for r in rows]

    async def aitem_state(self, key: str) -> str | None:
        """The state of item ``key``; None when the journal does not know it."""
        rows = await self.aread("SELECT state FROM items WHERE flow=? AND key=?", self.flow, key)
        return rows[0][0] if rows else None

    async def aresult(self, key: str) -> Any:
        """The stored output of the finished item ``key``."""
        rows = await self.aread("SELECT value FROM results WHERE flow=? AND key=?", self.flow, key)
        return decode(rows[0][0])

    async def aactive(self) -> int:
        """How many of this flow's items are active."""
        rows = await self.aread(
            "SELECT count(*) FROM items WHERE flow=? AND state='active'", self.flow
        )
        return int(rows[0][0])

    async def aresults_after(self, seq: int, limit: int = 1000) -> list[tuple[int, str, bytes]]:
        """(seq, key, stored output) of up to ``limit`` results after ``seq``, in order."""
        return await self.aread(
            f"SELECT seq, key, value FROM results WHERE flow=? AND seq>? ORDER BY seq "
            f"LIMIT {int(limit)}",
            self.flow,
            seq,
        )

    async def ahas_results_after(self, seq: int) -> bool:
        """Whether a result after ``seq`` is stored."""
        return bool(
            await self.aread("SELECT 1 FROM results WHERE flow=? AND seq>? LIMIT 1", self.flow, seq)
        )

    def dead_letters(self, key: str | None = None) -> list[DeadLetter]:
        sql, args = self._dead_letters_query(key)
        return [
            DeadLetter(k, s, n, e, t, a, f, decode(v))
            for k, s, n, e, t, a, f, v in self.read(sql, *args)
        ]

    async def adead_letters(self, key: str | None = None) -> list[DeadLetter]:
        """:meth:`dead_letters` that waits out an outage without holding up the loop."""
        sql, args = self._dead_letters_query(key)
        rows = await self.aread(sql, *args)
        return [DeadLetter(k, s, n, e, t, a, f, decode(v)) for k, s, n, e, t, a, f, v in rows]
