"""The durable journal: SQLite in WAL mode, written by one thread per deployed flow.

Every change is an *op* applied inside a write transaction. Ops queue up while a
transaction commits and the next transaction applies all of them (group commit), so a
commit carries many complete hops but never part of one. A hop deletes its input token
only if this owner still holds it (the compare-and-swap) and inserts its outputs in the
same transaction; if the delete finds nothing, the lease was lost and nothing is written.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydotcompute.coordinator.plan import Plan
from pydotcompute.coordinator.records import DeadLetter, decode, encode
from pydotcompute.errors import JournalError

__all__ = ["JournalSession", "SQLiteJournal", "open_journal"]

APPLICATION_ID = 0x50444331  # "PDC1": marks a file as ours
SCHEMA_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"

SCHEMA = """
CREATE TABLE IF NOT EXISTS flows(
    name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, stages TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items(
    flow TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL,
    submitted REAL NOT NULL, finished REAL, PRIMARY KEY(flow, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens(
    id INTEGER PRIMARY KEY, flow TEXT NOT NULL, key TEXT NOT NULL, node INTEGER NOT NULL,
    port INTEGER NOT NULL, value BLOB NOT NULL, failures INTEGER NOT NULL DEFAULT 0,
    owner TEXT, lease_until REAL NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0,
    UNIQUE(flow, key, node, port));
CREATE INDEX IF NOT EXISTS tokens_claim ON tokens(flow, node, port);  -- rowid order: FIFO claims
CREATE TABLE IF NOT EXISTS results(
    seq INTEGER PRIMARY KEY, flow TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    UNIQUE(flow, key));
CREATE TABLE IF NOT EXISTS dead_letters(
    flow TEXT NOT NULL, key TEXT NOT NULL, node INTEGER NOT NULL, stage TEXT NOT NULL,
    value BLOB NOT NULL, error TEXT NOT NULL, traceback TEXT NOT NULL,
    attempts INTEGER NOT NULL, failed_at REAL NOT NULL, PRIMARY KEY(flow, key, node));
CREATE TABLE IF NOT EXISTS owners(
    owner TEXT PRIMARY KEY, flow TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    seen REAL NOT NULL);
"""

Dest = tuple[int, int, bytes]  # (node, port, encoded value)
Events = list[tuple[str, str]]  # ("done" | "dead" | "joined" | "lost", key)


@dataclass(frozen=True)
class SQLiteJournal:
    """Where a flow keeps its state: an SQLite file (created if missing).

    ``lease``: seconds a claim lasts without a heartbeat (heartbeats come every
    ``lease / 3``); ``poll``: how often idle workers look for claimable items.
    """

    path: str
    lease: float = 30.0
    poll: float = 0.05
    max_batch: int = 8192

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))


def open_journal(journal: Any) -> SQLiteJournal | None:
    """Normalise a ``journal=`` argument: None, a path, or an SQLiteJournal."""
    if journal is None or isinstance(journal, SQLiteJournal):
        return journal
    if isinstance(journal, (str, os.PathLike)):
        return SQLiteJournal(os.fspath(journal))
    raise JournalError(f"journal must be None, a path or an SQLiteJournal, got {journal!r}")


def create_file(path: str) -> None:
    """Make a new, complete journal at ``path`` unless one is there: built under another
    name and linked into place, so a process killed meanwhile never leaves a half-made
    (say, empty) file that later opens would have to refuse as truncated."""
    if os.path.exists(path):
        return
    tmp = f"{path}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        conn = connect(tmp)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        try:
            os.link(tmp, path)  # never replaces a file another process created meanwhile
        except FileExistsError:
            pass
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def check_file(path: str) -> None:
    """Refuse anything at ``path`` that is not an intact journal, before writing a byte."""
    p = Path(path)
    if not p.exists():
        return
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(100)
    if size == 0 or len(head) < 100:
        raise JournalError(
            f"journal {path} is truncated ({size} bytes); it was left untouched, "
            "move it away to start a new journal"
        )
    if head[:16] != SQLITE_MAGIC:
        raise JournalError(f"{path} is not a journal (not an SQLite file); it was left untouched")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    wal = Path(path + "-wal")
    if pages and page_size * pages > size and not (wal.exists() and wal.stat().st_size > 0):
        raise JournalError(
            f"journal {path} is truncated: header says {pages * page_size} bytes, file has "
            f"{size}; it was left untouched"
        )


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60.0, check_same_thread=False)
    try:
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise JournalError(f"journal {path} is corrupt ({ok}); it was left untouched")
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables and app != APPLICATION_ID:
            raise JournalError(f"{path} is an SQLite file but not a journal; it was left untouched")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if tables and version != SCHEMA_VERSION:
            raise JournalError(
                f"journal {path} has schema {version}, this version reads {SCHEMA_VERSION}"
            )
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only power loss can
        # drop the last commits, never corrupt the file.
        conn.execute("PRAGMA synchronous=NORMAL")
        if not tables:
            # One transaction: a process killed half-way leaves an empty file, never
            # some tables without the mark that says the file is a journal.
            conn.executescript(
                f"BEGIN IMMEDIATE;{SCHEMA}PRAGMA application_id={APPLICATION_ID};"
                f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
            )
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise JournalError(
            f"journal {path} is corrupt or truncated: {exc}; it was left untouched"
        ) from exc
    except BaseException:
        conn.close()
        raise
    return conn


CHUNK = 400  # rows per multi-row statement (7 columns: well under SQLite's 32766 variables)


def write_rows(
    conn: sqlite3.Connection, head: str, width: int, rows: list[tuple[Any, ...]]
) -> None:
    """Insert ``rows`` with few statements. The writer thread gives up the GIL on every
    SQLite step, and each time it may wait for the event loop to give it back, so one
    step per few hundred rows instead of one per row is what makes the journal fast."""
    mark = "(" + ",".join("?" * width) + ")"
    for i in range(0, len(rows), CHUNK):
        chunk = rows[i : i + CHUNK]
        conn.execute(
            head + " VALUES " + ",".join([mark] * len(chunk)), [v for r in chunk for v in r]
        )


def select_json(conn: sqlite3.Connection, sql: str, args: list[Any]) -> list[Any]:
    """Rows of ``sql`` (whose one column is a json_array) fetched in a single step."""
    text = conn.execute(f"SELECT json_group_array(json(j)) FROM ({sql})", args).fetchone()[0]
    return json.loads(text) if text else []


def marks(n: int) -> str:
    return ",".join("?" * n)


def describe_change(old: list[str], new: list[str]) -> str:
    added = [n for n in new if n not in old]
    removed = [n for n in old if n not in new]
    if not added and not removed:
        return "same stages, different wiring or options"
    return f"stages added: {added or 'none'}; stages removed: {removed or 'none'}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JournalSession:
    """One deployed flow's connection to the journal: a writer thread and a reader."""

    def __init__(self, journal: SQLiteJournal, flow: str, plan: Plan, owner: str) -> None:
        self.journal = journal
        self.flow = flow
        self.plan = plan
        self.owner = owner
        self._ops: deque[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any] | None]] = (
            deque()
        )
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._room = asyncio.Event()
        self._room.set()
        self.on_events: Callable[[Events], None] = lambda events: None
        self.on_error: Callable[[BaseException], None] = lambda exc: None
        self.hops = 0
        # Tokens written and retired inside one transaction never need to reach the file:
        # they wait here until the end of the batch, and a hop that retires one drops it.
        self._pending: dict[tuple[str, int], tuple[bytes, float]] = {}
        self._finished: list[tuple[str, bytes]] = []
        self._owned: dict[tuple[str, int], int] = {}  # our tokens in the file: (key, node) -> id
        self._deletes: list[int] = []

    # ---- lifetime -------------------------------------------------------------------
    async def open(self) -> None:
        self._writer = await asyncio.to_thread(self._open_sync)
        # Short: a busy journal is waited for in _run with asyncio.sleep, not in SQLite.
        self._writer.execute("PRAGMA busy_timeout=10")
        self._writer.execute("PRAGMA wal_autocheckpoint=0")
        self._reader = sqlite3.connect(self.journal.path, isolation_level=None, timeout=60.0)
        self._task = asyncio.create_task(self._run())
        self._checkpointing: asyncio.Task[None] | None = None
        self._commits = 0

    def _open_sync(self) -> sqlite3.Connection:
        path = self.journal.path
        create_file(path)
        check_file(path)
        conn = connect(path)
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT fingerprint, stages FROM flows WHERE name=?", (self.flow,)
            ).fetchone()
            names = self.plan.stage_names
            if row is None:
                conn.execute(
                    "INSERT INTO flows VALUES(?,?,?,?)",
                    (self.flow, self.plan.fingerprint, json.dumps(names), time.time()),
                )
            elif row[0] != self.plan.fingerprint:
                change = describe_change(json.loads(row[1]), names)
                raise JournalError(
                    f"journal {path} holds flow {self.flow!r} with a different graph ({change}); "
                    "deploy it under a new name or use a new journal"
                )
            host = socket.gethostname()
            self._reap(conn)
            conn.execute(
                "INSERT OR REPLACE INTO owners VALUES(?,?,?,?,?)",
                (self.owner, self.flow, host, os.getpid(), time.time()),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        """Give back this owner's leases, then stop the writer after what is queued."""
        if self._task is None:
            return
        try:
            await self.call(self._release_mine)
        except JournalError:
            pass  # already reported through on_error; the leases will simply expire
        self._stopping = True
        self._wake.set()
        try:
            await self._task
        finally:
            self._task = None
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # ---- queueing ops ---------------------------------------------------------------
    def post(
        self, fn: Callable[..., Any], *args: Any, want: bool = False
    ) -> asyncio.Future[Any] | None:
        if self._task is None or self._stopping:
            raise JournalError(f"journal of flow {self.flow!r} is closed")
        fut = asyncio.get_running_loop().create_future() if want else None
        self._ops.append((fn, args, fut))
        self._wake.set()
        if len(self._ops) > 4 * self.journal.max_batch:
            self._room.clear()
        return fut

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        fut = self.post(fn, *args, want=True)
        assert fut is not None
        return await fut

    async def room(self) -> None:
        """Wait while the writer is far behind: bounds what waits in memory for a commit."""
        if not self._room.is_set():
            await self._room.wait()

    # ---- writer thread ----------------------------------------------------------------
    async def _run(self) -> None:
        """Group commit on the event loop: every op queued since the last commit goes
        into the next transaction. Running here rather than in a thread matters: a
        thread gives up the GIL on each SQLite step and then waits for the busy loop to
        hand it back, which made commits many times slower."""
        conn = self._writer
        assert conn is not None
        beat = self.journal.lease / 3
        next_beat = time.time() + beat
        while True:
            if not self._ops and not self._stopping:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, next_beat - time.time()))
                except asyncio.TimeoutError:
                    pass
            # Another process may hold the write lock: wait for it without blocking the loop.
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise
                    await asyncio.sleep(0.005)
            n = min(len(self._ops), self.journal.max_batch)
            ops = [self._ops.popleft() for _ in range(n)]
            stop = self._stopping and not self._ops
            now = time.time()
            results: list[Any]
            try:
                self._prepare(conn, ops)
                results = [fn(conn, now, *args) for fn, args, _ in ops]
                self._flush(conn, now)
                if now >= next_beat:
                    self._heartbeat(conn, now)
                    next_beat = now + beat
                conn.execute("COMMIT")
            except Exception as exc:
                self._pending.clear()
                self._finished.clear()
                self._deletes.clear()
                self._owned.clear()
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                err = (
                    exc
                    if isinstance(exc, JournalError)
                    else JournalError(f"journal write failed: {exc!r}")
                )
                err.__cause__ = exc
                results = [err] * len(ops)
                if not ops:
                    self.on_error(err)
            self._deliver(ops, results)
            self._commits += 1
            if self._commits % 200 == 0 and (
                self._checkpointing is None or self._checkpointing.done()
            ):
                # Copying the WAL back into the file costs fsyncs: do it on a thread, with
                # its own connection, so commits go on meanwhile (PASSIVE never blocks them).
                self._checkpointing = asyncio.create_task(asyncio.to_thread(self._checkpoint))
            if stop:
                break
        if self._checkpointing is not None:
            await self._checkpointing

    def _checkpoint(self) -> None:
        conn = sqlite3.connect(self.journal.path, isolation_level=None, timeout=60.0)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    def _deliver(self, ops: list[Any], results: list[Any]) -> None:
        events: Events = []
        for (_, _, fut), res in zip(ops, results, strict=True):
            if isinstance(res, BaseException):
                if fut is not None and not fut.done():
                    fut.set_exception(res)
                elif fut is None:
                    self.on_error(res)
                continue
            value, evs = res
            events.extend(evs)
            if fut is not None and not fut.done():
                fut.set_result(value)
        if len(self._ops) <= self.journal.max_batch:
            self._room.set()
        if events:
            self.on_events(events)

    def _prepare(self, conn: sqlite3.Connection, ops: list[Any]) -> None:
        """Find, in one step per few hundred keys, the tokens this batch's hops retire."""
        self._owned.clear()
        keys = list({args[0] for fn, args, _ in ops if fn == self.op_hop})
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i : i + CHUNK]
            for tid, node, key in select_json(
                conn,
                "SELECT json_array(id, node, key) AS j FROM tokens WHERE flow=? AND owner=? "
                f"AND port=0 AND key IN ({marks(len(chunk))})",
                [self.flow, self.owner, *chunk],
            ):
                self._owned[(key, node)] = tid

    def _flush(self, conn: sqlite3.Connection, now: float) -> None:
        flow = self.flow
        if self._deletes:
            for i in range(0, len(self._deletes), CHUNK):
                chunk = self._deletes[i : i + CHUNK]
                conn.execute(f"DELETE FROM tokens WHERE id IN ({marks(len(chunk))})", chunk)
            self._deletes.clear()
        if self._pending:
            write_rows(
                conn,
                "INSERT OR IGNORE INTO tokens(flow, key, node, port, value, owner, lease_until)",
                7,
                [
                    (flow, k, n, 0, blob, self.owner, until)
                    for (k, n), (blob, until) in self._pending.items()
                ],
            )
            self._pending.clear()
        if self._finished:
            done = [k for k, _ in self._finished]
            for i in range(0, len(done), CHUNK):
                part = done[i : i + CHUNK]
                conn.execute(
                    "UPDATE items SET state='done', finished=? WHERE flow=? AND state='active' "
                    f"AND key IN ({marks(len(part))})",
                    [now, flow, *part],
                )
            write_rows(
                conn,
                "INSERT OR IGNORE INTO results(flow, key, value)",
                3,
                [(flow, k, blob) for k, blob in self._finished],
            )
            self._finished.clear()

    def _heartbeat(self, conn: sqlite3.Connection, now: float) -> None:
        conn.execute(
            "UPDATE tokens SET lease_until=? WHERE flow=? AND owner=?",
            (now + self.journal.lease, self.flow, self.owner),
        )
        conn.execute("UPDATE owners SET seen=? WHERE owner=?", (now, self.owner))
        self._reap(conn)

    def _reap(self, conn: sqlite3.Connection) -> None:
        """Owners on this host whose process is gone cannot renew their leases: free
        their items now instead of waiting for the leases to run out."""
        for owner, pid in conn.execute(
            "SELECT owner, pid FROM owners WHERE flow=? AND host=?",
            (self.flow, socket.gethostname()),
        ).fetchall():
            if pid != os.getpid() and not pid_alive(pid):
                self._release(conn, owner)

    def _release(self, conn: sqlite3.Connection, owner: str) -> None:
        conn.execute(
            "UPDATE tokens SET owner=NULL, lease_until=0 WHERE flow=? AND owner=?",
            (self.flow, owner),
        )
        conn.execute("DELETE FROM owners WHERE owner=?", (owner,))

    def _release_mine(self, conn: sqlite3.Connection, now: float) -> tuple[None, Events]:
        self._release(conn, self.owner)
        return None, []

    # ---- ops (run on the writer thread, inside a transaction) ------------------------
    def _apply(
        self, conn: sqlite3.Connection, now: float, key: str, dests: list[Dest], events: Events
    ) -> None:
        """Write an item's outputs: finish it, add a join part, or add a token (ours)."""
        flow = self.flow
        for node, port, blob in dests:
            if node == self.plan.sink:
                # Exactly once: only the hop that retired this item's last token gets here.
                self._finished.append((key, blob))
                events.append(("done", key))
            elif port:
                conn.execute(
                    "INSERT OR REPLACE INTO tokens(flow, key, node, port, value) VALUES(?,?,?,?,?)",
                    (flow, key, node, port, blob),
                )
                parts = conn.execute(
                    "SELECT port, value FROM tokens WHERE flow=? AND key=? AND node=? AND port>0",
                    (flow, key, node),
                ).fetchall()
                target = self.plan.nodes[node]
                if len(parts) == target.parts:
                    joined = self.plan.join_value(target, {p: decode(v) for p, v in parts})
                    conn.execute(
                        "DELETE FROM tokens WHERE flow=? AND key=? AND node=? AND port>0",
                        (flow, key, node),
                    )
                    # Unleased: whoever has room claims it, like a fresh submission.
                    conn.execute(
                        "INSERT OR IGNORE INTO tokens(flow, key, node, port, value) VALUES(?,?,?,0,?)",
                        (flow, key, node, encode(joined)),
                    )
                    events.append(("joined", key))
            else:
                self._pending[(key, node)] = (blob, now + self.journal.lease)

    def _take(self, conn: sqlite3.Connection, key: str, node: int) -> bool:
        """The compare-and-swap: retire our token, only if we still own it."""
        if self._pending.pop((key, node), None) is not None:
            return True
        tid = self._owned.pop((key, node), None)
        if tid is not None:
            # Ours in the file, and we hold the write lock: nobody can take it before
            # the batched delete at the end of this transaction.
            self._deletes.append(tid)
            return True
        self._flush(conn, time.time())
        cur = conn.execute(
            "DELETE FROM tokens WHERE flow=? AND key=? AND node=? AND port=0 AND owner=?",
            (self.flow, key, node, self.owner),
        )
        return cur.rowcount == 1

    def op_submit(
        self, conn: sqlite3.Connection, now: float, batch: list[tuple[str, list[Dest] | DeadLetter]]
    ) -> tuple[list[bool], Events]:
        """New items with their first tokens (unleased: any process may claim them)."""
        events: Events = []
        known: set[str] = set()
        keys = [k for k, _ in batch]
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            known.update(
                select_json(
                    conn,
                    f"SELECT json_quote(key) AS j FROM items WHERE flow=? AND key IN ({marks(len(chunk))})",
                    [self.flow, *chunk],
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
        write_rows(conn, "INSERT INTO items(flow, key, state, submitted)", 4, items)
        write_rows(conn, "INSERT INTO tokens(flow, key, node, port, value)", 5, tokens)
        for key, rest in later:
            if isinstance(rest, DeadLetter):
                self._bury(conn, rest, events)
            else:
                self._apply(conn, now, key, rest, events)
        return fresh, events

    def op_hop(
        self, conn: sqlite3.Connection, now: float, key: str, node: int, dests: list[Dest]
    ) -> tuple[bool, Events]:
        events: Events = []
        if not self._take(conn, key, node):
            return False, [("lost", key)]
        self._apply(conn, now, key, dests, events)
        self.hops += 1
        return True, events

    def op_release(
        self,
        conn: sqlite3.Connection,
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

    def _bury(self, conn: sqlite3.Connection, rec: DeadLetter, events: Events) -> None:
        self._flush(conn, rec.failed_at)
        conn.execute(
            "INSERT OR REPLACE INTO dead_letters VALUES(?,?,?,?,?,?,?,?,?)",
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

    def op_dead(
        self, conn: sqlite3.Connection, now: float, node: int, rec: DeadLetter
    ) -> tuple[bool, Events]:
        events: Events = []
        if not self._take(conn, rec.key, node):
            return False, [("lost", rec.key)]
        self._bury(conn, rec, events)
        return True, events

    def op_claim(
        self, conn: sqlite3.Connection, now: float, wants: list[tuple[int, int]]
    ) -> tuple[list[tuple[str, int, bytes, int]], Events]:
        """Lease up to n free tokens per node. The read and the UPDATE run in one write
        transaction (BEGIN IMMEDIATE holds SQLite's write lock), and the UPDATE repeats the
        ``lease_until < now`` test: a token another owner leased is never taken."""
        out: list[tuple[str, int, bytes, int]] = []
        until = now + self.journal.lease
        for node, n in wants:
            rows = select_json(
                conn,
                "SELECT json_array(id, key, hex(value), failures) AS j FROM tokens WHERE flow=? "
                "AND node=? AND port=0 AND lease_until<? AND not_before<=? ORDER BY id LIMIT ?",
                [self.flow, node, now, now, n],
            )
            for i in range(0, len(rows), CHUNK):
                chunk = rows[i : i + CHUNK]
                cur = conn.execute(
                    f"UPDATE tokens SET owner=?, lease_until=? WHERE id IN ({marks(len(chunk))}) "
                    "AND lease_until<?",
                    [self.owner, until, *(r[0] for r in chunk), now],
                )
                if cur.rowcount != len(chunk):
                    raise JournalError(
                        "journal changed under a write transaction; is it shared over NFS?"
                    )
            out.extend(
                (key, node, bytes.fromhex(value), failures) for _, key, value, failures in rows
            )
        return out, []

    def op_retry(
        self, conn: sqlite3.Connection, now: float, key: str, reinject: list[tuple[int, list[Dest]]]
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
                        "INSERT OR REPLACE INTO tokens(flow, key, node, port, value) VALUES(?,?,?,0,?)",
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

    def op_flush(self, conn: sqlite3.Connection, now: float) -> tuple[None, Events]:
        return None, []

    # ---- reads (event-loop thread, committed state) ----------------------------------
    def read(self, sql: str, *args: Any) -> list[Any]:
        if self._reader is None:
            raise JournalError(f"journal of flow {self.flow!r} is closed")
        return self._reader.execute(sql, args).fetchall()

    def dead_letters(self, key: str | None = None) -> list[DeadLetter]:
        sql = (
            "SELECT key, stage, node, error, traceback, attempts, failed_at, value "
            "FROM dead_letters WHERE flow=?"
        )
        rows = self.read(sql + " AND key=?", self.flow, key) if key else self.read(sql, self.flow)
        return [DeadLetter(k, s, n, e, t, a, f, decode(v)) for k, s, n, e, t, a, f, v in rows]
