"""The SQLite journal: one file in WAL mode, shared by the processes of one host.

The journal's tables are written here once, in SQLite's words; the PostgreSQL journal
derives its own from them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydotcompute.errors import JournalError

__all__ = ["SCHEMA", "SQLiteDialect", "SQLiteJournal", "connect_read_only"]

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

    @property
    def where(self) -> str:
        """The journal, named for messages."""
        return self.path

    def dialect(self) -> SQLiteDialect:
        return SQLiteDialect(self.path)


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


def connect_read_only(path: str) -> sqlite3.Connection:
    """A connection that reads the journal at ``path`` and cannot write to it. Refuses,
    saying so, a missing file (it is never created here), a file that is not a journal
    and a schema this version does not read."""
    if not os.path.exists(path):
        raise JournalError(
            f"no journal at {path}: check the path (a flow or a workflow makes its journal "
            "when it first runs)"
        )
    check_file(path)
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, timeout=60.0, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise JournalError(f"cannot open journal {path}: {exc}") from exc
    try:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if not tables or app != APPLICATION_ID:
            raise JournalError(f"{path} is an SQLite file but not a journal")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise JournalError(
                f"journal {path} has schema {version}, this version reads {SCHEMA_VERSION}"
            )
    except sqlite3.Error as exc:
        conn.close()
        raise JournalError(f"cannot read journal {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def select_json(conn: sqlite3.Connection, sql: str, args: list[Any]) -> list[Any]:
    """Rows of ``sql`` (whose one column is a json_array) fetched in a single step."""
    text = conn.execute(f"SELECT json_group_array(json(j)) FROM ({sql})", args).fetchone()[0]
    return json.loads(text) if text else []


class SQLiteDialect:
    """SQLite's side of the journal: the file's write lock serialises every writer."""

    name = "sqlite"
    threaded = False  # see JournalWriter
    for_update = ""  # BEGIN IMMEDIATE already holds the only write lock

    def __init__(self, path: str) -> None:
        self.path = path
        self._checkpointing: asyncio.Task[None] | None = None

    def writer(self) -> sqlite3.Connection:
        create_file(self.path)
        check_file(self.path)
        conn = connect(self.path)
        # Short: a busy journal is waited for off SQLite (try_begin, then asyncio.sleep).
        conn.execute("PRAGMA busy_timeout=10")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # after_commit checkpoints on a thread
        return conn

    def reader(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None, timeout=60.0)

    def create(self, conn: sqlite3.Connection, schema: str) -> None:
        for statement in schema.split(";"):
            if statement.strip():
                conn.execute(statement)

    def try_begin(self, conn: sqlite3.Connection) -> float | None:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            return None  # another process holds the write lock
        return time.time()

    def commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def retryable(self, exc: BaseException) -> bool:
        return False  # the write lock leaves no race to lose

    def refusals(self) -> tuple[type[Exception], ...]:
        return (sqlite3.IntegrityError,)

    def driver_errors(self) -> tuple[type[Exception], ...]:
        return (sqlite3.Error,)

    def lost(self, conn: sqlite3.Connection) -> bool:
        return False  # a file does not go away under an open connection

    def rows(self, conn: sqlite3.Connection, cols: str, tail: str, args: list[Any]) -> list[Any]:
        return select_json(conn, f"SELECT json_array({cols}) AS j {tail}", args)

    def insert(
        self,
        conn: sqlite3.Connection,
        head: str,
        width: int,
        rows: list[tuple[Any, ...]],
        tail: str = "",
    ) -> None:
        """Multi-row VALUES: the writer gives up the GIL on every SQLite step and each
        time may wait for the event loop to give it back, so one step per few hundred
        rows instead of one per row is what makes the journal fast."""
        mark = "(" + ",".join("?" * width) + ")"
        for i in range(0, len(rows), CHUNK):
            chunk = rows[i : i + CHUNK]
            conn.execute(
                head + " VALUES " + ",".join([mark] * len(chunk)) + tail,
                [v for r in chunk for v in r],
            )

    def among(self, column: str, values: list[Any]) -> tuple[str, list[Any]]:
        return f"{column} IN ({marks(len(values))})", list(values)

    def lock(self, conn: sqlite3.Connection, name: str) -> None:
        pass  # BEGIN IMMEDIATE holds the file's one write lock

    def claim(
        self,
        conn: sqlite3.Connection,
        flow: str,
        owner: str,
        node: int,
        n: int,
        now: float,
        until: float,
    ) -> list[tuple[int, str, bytes, int]]:
        """The read and the UPDATE run in one write transaction, and the UPDATE repeats
        the ``lease_until < now`` test: a token another owner leased is never taken."""
        rows = select_json(
            conn,
            "SELECT json_array(id, key, hex(value), failures) AS j FROM tokens WHERE flow=? "
            "AND node=? AND port=0 AND lease_until<? AND not_before<=? ORDER BY id LIMIT ?",
            [flow, node, now, now, n],
        )
        for i in range(0, len(rows), CHUNK):
            chunk = rows[i : i + CHUNK]
            cur = conn.execute(
                f"UPDATE tokens SET owner=?, lease_until=? WHERE id IN ({marks(len(chunk))}) "
                "AND lease_until<?",
                [owner, until, *(r[0] for r in chunk), now],
            )
            if cur.rowcount != len(chunk):
                raise JournalError(
                    "journal changed under a write transaction; is it shared over NFS?"
                )
        return [(tid, key, bytes.fromhex(value), failures) for tid, key, value, failures in rows]

    def after_commit(self, commits: int) -> None:
        if commits % 200 == 0 and (self._checkpointing is None or self._checkpointing.done()):
            # Copying the WAL back into the file costs fsyncs: do it on a thread, with its
            # own connection, so commits go on meanwhile (PASSIVE never blocks them).
            self._checkpointing = asyncio.create_task(asyncio.to_thread(self._checkpoint))

    def _checkpoint(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    async def aclose(self) -> None:
        if self._checkpointing is not None:
            await self._checkpointing
            self._checkpointing = None


CHUNK = 400  # rows per statement (7 columns): well under SQLite's 32766 variables


def marks(n: int) -> str:
    return ",".join("?" * n)
