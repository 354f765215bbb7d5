"""The SQLite journal: one file in WAL mode, shared by the processes of one host.

The journal's tables are written here once, in SQLite's words; the PostgreSQL journal
derives its own from them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any

from pydotcompute.coordinator.journal_path import (
    check_header,
    check_sqlite_path,
    open_error,
    read_only_fs,
)
from pydotcompute.coordinator.liveness import FileLocks, owners_of
from pydotcompute.coordinator.retention import Retention, check_retention
from pydotcompute.errors import JournalError

__all__ = ["SCHEMA", "SQLiteDialect", "SQLiteJournal", "connect_read_only"]

log = logging.getLogger("pydotcompute.coordinator")

APPLICATION_ID = 0x50444331  # "PDC1": marks a file as ours
SCHEMA_VERSION = 1

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
    ``wal_limit``: bytes the write-ahead log (``path-wal``) may reach under steady load
    before writes pause for a checkpoint that empties it (see ``SQLiteDialect``).
    ``retention``: what running flows and workflow engines keep of what is finished (a
    :class:`Retention`); None keeps everything.
    """

    path: str
    lease: float = 30.0
    poll: float = 0.05
    max_batch: int = 8192
    wal_limit: int = 64 * 2**20
    retention: Retention | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))
        check_retention(self.retention)
        if self.wal_limit < 2**20:
            raise JournalError(f"wal_limit is at least 1 MiB (2**20), got {self.wal_limit}")

    @property
    def where(self) -> str:
        """The journal, named for messages."""
        return self.path

    def dialect(self) -> SQLiteDialect:
        return SQLiteDialect(self.path, self.wal_limit)


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
    except OSError as exc:  # the directory changed since check_sqlite_path looked
        raise JournalError(f"journal {path} cannot be created: {exc}") from exc
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
            if os.path.exists(leftover):
                os.unlink(leftover)


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
        raise open_error(path, exc) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def connect_read_only(path: str) -> sqlite3.Connection:
    """A connection that reads the journal at ``path`` and cannot write to it, also on a
    read-only mount. Refuses, saying so, a missing file (it is never created here), a
    directory (the owners' lock folder beside a journal is named as such), a file that
    is not a journal and a schema this version does not read."""
    if not os.path.exists(path):
        raise JournalError(
            f"no journal at {path}: check the path (a flow or a workflow makes its journal "
            "when it first runs)"
        )
    if os.path.isdir(path):
        owners = owners_of(path)
        raise JournalError(
            f"{path} is a directory, not a journal"
            + (
                f": it holds the lock files of the processes writing the journal {owners}; "
                f"pass {owners}"
                if owners is not None
                else ""
            )
        )
    check_header(path)
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    if read_only_fs(os.path.dirname(os.path.abspath(path))):
        # SQLite reads a WAL journal through its -shm file, which it cannot make on a
        # read-only mount; nothing can change the file through that mount either. But
        # then it ignores the log: commits still in one would be silently missing.
        wal = path + "-wal"
        if os.path.exists(wal) and os.path.getsize(wal) > 0:
            raise JournalError(
                f"journal {path} is on a read-only file system with commits still in "
                f"{wal}, which SQLite cannot read there: copy the journal with its -wal "
                "file to a writable directory and look at the copy"
            )
        uri += "&immutable=1"
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
    reconnect_timeout = 0.0  # a file has no server to lose (see ``unreachable``)

    def __init__(self, path: str, wal_limit: int = 64 * 2**20) -> None:
        self.path = path
        self.wal_limit = wal_limit
        self._checkpointing: asyncio.Task[None] | None = None
        self._emptying = False  # a TRUNCATE checkpoint runs: writes wait for it
        self.owners = FileLocks(path)

    def writer(self) -> sqlite3.Connection:
        check_sqlite_path(self.path)  # before anything is written there
        create_file(self.path)
        conn = connect(self.path)
        # Short: a busy journal is waited for off SQLite (try_begin, then asyncio.sleep).
        conn.execute("PRAGMA busy_timeout=10")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # after_commit checkpoints on a thread
        # When the log starts over from its beginning, the file shrinks back to this.
        conn.execute(f"PRAGMA journal_size_limit={self.wal_limit // 4}")
        # A log left by a process that was killed is copied back and emptied now, unless
        # another process is using the journal (then busy: it is emptied under load).
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return conn

    def reader(self) -> sqlite3.Connection:
        # Opened on the thread that opens the writer, used on the event loop's.
        return sqlite3.connect(
            self.path, isolation_level=None, timeout=60.0, check_same_thread=False
        )

    def create(self, conn: sqlite3.Connection, schema: str) -> None:
        for statement in schema.split(";"):
            if statement.strip():
                conn.execute(statement)

    def try_begin(self, conn: sqlite3.Connection) -> float | None:
        if self._emptying:
            return None  # as if another process wrote: the writer waits off the loop
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

    def unreachable(self, exc: BaseException) -> bool:
        return False  # a busy file is waited for (try_begin); other errors are real

    def committed(self, conn: sqlite3.Connection, lost: sqlite3.Connection) -> bool | None:
        return None  # never asked: a connection to a file is never lost mid-commit

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
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        try:
            wal = os.stat(self.path + "-wal").st_size
        except OSError:
            wal = 0
        if wal > self.wal_limit // 2:
            # Passive checkpoints alone let the log grow without end under steady load
            # (measured: 240 MB for a 0.8 MB journal): it starts over from its beginning
            # only once a checkpoint has copied all of it, and commits keep adding more.
            # So at half the limit, this writer pauses (try_begin) while a TRUNCATE
            # checkpoint copies the rest and empties the file; the other half is room
            # for what other processes commit meanwhile.
            self._emptying = True
            self._checkpointing = asyncio.create_task(
                asyncio.to_thread(self._checkpoint, "TRUNCATE")
            )
        elif commits % 200 == 0:
            # Copying the WAL back into the file costs fsyncs: do it on a thread, with its
            # own connection, so commits go on meanwhile (PASSIVE never blocks them).
            self._checkpointing = asyncio.create_task(
                asyncio.to_thread(self._checkpoint, "PASSIVE")
            )

    def _checkpoint(self, mode: str) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
            try:
                conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            # Not this commit's failure: the log is copied back by the next checkpoint.
            log.warning("journal %s: %s checkpoint failed: %s", self.path, mode, exc)
        finally:
            self._emptying = False

    async def aclose(self) -> None:
        if self._checkpointing is not None:
            await self._checkpointing
            self._checkpointing = None


CHUNK = 400  # rows per statement (7 columns): well under SQLite's 32766 variables


def marks(n: int) -> str:
    return ",".join("?" * n)
