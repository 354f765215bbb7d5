"""The PostgreSQL journal: one database that workers on many hosts share.

Writers run in PostgreSQL's READ COMMITTED isolation. Where SQLite's single write lock
made a race impossible, a row lock or a lock named for what is written does it here:
claims take free tokens with ``FOR UPDATE SKIP LOCKED``, a hop locks the tokens it
retires, join parts and result rows are written under a transaction-scoped advisory
lock. A transaction that loses a race anyway (a deadlock, two processes adding the same
key) is rolled back and run again. Leases are timed by the server's clock, so hosts
need not agree on the time.

psycopg is imported only when a PostgreSQL journal is opened.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydotcompute.coordinator.journal_sqlite import SCHEMA as SQLITE_SCHEMA
from pydotcompute.coordinator.liveness import AdvisoryLocks
from pydotcompute.coordinator.retention import Retention, check_retention
from pydotcompute.errors import JournalError

__all__ = ["PostgresJournal", "is_postgres_dsn", "pg_schema"]

SCHEMES = ("postgresql://", "postgres://")
SCHEMA_VERSION = 1
MARK_TABLE = "pydotcompute_journal"
JOURNAL_TABLES = ("flows", "items", "tokens", "results", "dead_letters", "owners")
SCHEMA_LOCK = 0x50444331  # "PDC1": one process at a time creates tables
# SQLSTATEs of a transaction that lost a race and may simply run again:
# serialization_failure, deadlock_detected, unique_violation.
RACES = {"40001", "40P01", "23505"}
# SQLSTATEs of a server that is going away or not ready yet (besides class 08, connection
# exceptions): admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections,
# and the connection failure of a hot standby that is being promoted.
UNREACHABLE = {"57P01", "57P02", "57P03", "53300", "25006"}
# What a server that is up says to a connection it refuses for good (bad credentials, a
# missing database or role): no point in trying again. libpq gives no SQLSTATE for a
# failed connection, only its text.
REFUSED = ("authentication failed", "does not exist", "no pg_hba.conf entry", "permission denied")
ARRAY_TYPES = {str: "TEXT[]", int: "BIGINT[]", float: "DOUBLE PRECISION[]", bytes: "BYTEA[]"}


def is_postgres_dsn(journal: object) -> bool:
    return isinstance(journal, str) and journal.startswith(SCHEMES)


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and reprs."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "postgresql://?"
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}:***@{host}" if ":" in user else netloc
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class PostgresJournal:
    """Where a flow keeps its state: a PostgreSQL database (``postgresql://`` DSN).

    The journal's tables are made in the first schema of the connection's search path
    (``?options=-csearch_path%3Dname`` in the DSN picks another). ``lease``: seconds a
    claim lasts without a heartbeat (heartbeats come every ``lease / 3``); ``poll``: how
    often idle workers look for claimable items; ``reconnect_timeout``: how long every
    journal operation keeps trying a server it lost (a restart, a failover) before the
    flow stops with ``JournalUnavailableError`` (see ``coordinator.reconnect``).
    ``retention``: what running flows and workflow engines keep of what is finished (a
    :class:`Retention`); None keeps everything. Needs ``pip install
    "pydotcompute[postgres]"``.
    """

    dsn: str = field(repr=False)
    lease: float = 30.0
    poll: float = 0.05
    max_batch: int = 8192
    reconnect_timeout: float = 60.0
    retention: Retention | None = None

    def __post_init__(self) -> None:
        check_retention(self.retention)
        if not is_postgres_dsn(self.dsn):
            raise JournalError(
                f"a PostgreSQL journal needs a postgresql:// DSN, got {redact(str(self.dsn))!r}"
            )

    def __repr__(self) -> str:
        return (
            f"PostgresJournal({redact(self.dsn)!r}, lease={self.lease}, poll={self.poll}, "
            f"max_batch={self.max_batch}, reconnect_timeout={self.reconnect_timeout}, "
            f"retention={self.retention!r})"
        )

    @property
    def where(self) -> str:
        """The journal, named for messages (without the password)."""
        return redact(self.dsn)

    def dialect(self) -> PostgresDialect:
        return PostgresDialect(self.dsn, self.reconnect_timeout)


def load_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise JournalError(
            'a postgresql:// journal needs psycopg: pip install "pydotcompute[postgres]"'
        ) from exc
    return psycopg


@functools.lru_cache(maxsize=1024)
def placeholders(sql: str) -> str:
    """``?`` placeholders (the journal's SQL) as psycopg's ``%s``."""
    return sql.replace("%", "%%").replace("?", "%s")


@functools.lru_cache(maxsize=16)
def pg_schema(sqlite_schema: str) -> str:
    """A schema written for SQLite, in PostgreSQL's types. Text compares byte by byte
    (``COLLATE "C"``) as in SQLite, whatever the database's locale."""
    out = re.sub(
        r"\bINTEGER PRIMARY KEY\b",
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        sqlite_schema,
    )
    out = re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', out)
    out = re.sub(r"\bBLOB\b", "BYTEA", out)
    out = re.sub(r"\bREAL\b", "DOUBLE PRECISION", out)
    return out.replace(") WITHOUT ROWID", ")")


class Connection:
    """A psycopg connection that takes the journal's ``?`` placeholders."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.xid: int | None = None  # the running write transaction's id (try_begin)

    def execute(self, sql: str, args: Any = ()) -> Any:
        if args:
            return self.raw.execute(placeholders(sql), args)
        return self.raw.execute(sql)

    def close(self) -> None:
        self.raw.close()


class PostgresDialect:
    """PostgreSQL's side of the journal (see the module's text for the locking)."""

    name = "postgresql"
    threaded = True  # see JournalWriter
    for_update = " FOR UPDATE"

    def __init__(self, dsn: str, reconnect_timeout: float = 60.0) -> None:
        self.dsn = dsn
        self.reconnect_timeout = reconnect_timeout
        self.psycopg = load_psycopg()
        self.owners = AdvisoryLocks()

    def _connect(self) -> Connection:
        try:
            raw = self.psycopg.connect(self.dsn, autocommit=True, application_name="pydotcompute")
        except self.psycopg.Error as exc:
            raise JournalError(f"cannot connect to journal {redact(self.dsn)}: {exc}") from exc
        return Connection(raw)

    def writer(self) -> Connection:
        conn = self._connect()
        try:
            conn.execute("BEGIN")
            self._lock_schema(conn)
            marked = conn.execute("SELECT to_regclass(?) IS NOT NULL", (MARK_TABLE,)).fetchone()[0]
            if marked:
                version = conn.execute(f"SELECT version FROM {MARK_TABLE}").fetchone()
                if version is None or version[0] != SCHEMA_VERSION:
                    found = None if version is None else version[0]
                    raise JournalError(
                        f"journal {redact(self.dsn)} has schema {found}, "
                        f"this version reads {SCHEMA_VERSION}"
                    )
            else:
                clash = conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE "
                    "table_schema=current_schema() AND table_name = ANY(?)",
                    (list(JOURNAL_TABLES),),
                ).fetchall()
                if clash:
                    raise JournalError(
                        f"{redact(self.dsn)} has tables named like the journal's "
                        f"({', '.join(sorted(r[0] for r in clash))}) but is not a journal; "
                        "it was left untouched (choose another schema with search_path)"
                    )
                self.create(conn, SQLITE_SCHEMA, locked=True)
                conn.execute(f"CREATE TABLE {MARK_TABLE}(version INTEGER NOT NULL)")
                conn.execute(f"INSERT INTO {MARK_TABLE} VALUES(?)", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException as exc:
            conn.close()
            if isinstance(exc, self.psycopg.Error):
                raise JournalError(f"cannot open journal {redact(self.dsn)}: {exc}") from exc
            raise
        return conn

    def reader(self) -> Connection:
        return self._connect()

    def _lock_schema(self, conn: Connection) -> None:
        # CREATE TABLE IF NOT EXISTS is not safe against a concurrent twin in PostgreSQL.
        conn.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))

    def create(self, conn: Connection, schema: str, locked: bool = False) -> None:
        if not locked:
            self._lock_schema(conn)
        for statement in pg_schema(schema).split(";"):
            made = re.search(r"IF NOT EXISTS\s+(\w+)", statement)
            # An existing table or index is skipped, not created "if not exists": that
            # would lock the table against every other writer until this commit.
            if made and conn.execute("SELECT to_regclass(?)", (made[1],)).fetchone()[0]:
                continue
            if statement.strip():
                conn.execute(statement)

    def try_begin(self, conn: Connection) -> float:
        conn.execute("BEGIN")
        # The transaction's id, asked for in the same round trip: if the connection is
        # lost while COMMIT is on its way, ``committed`` asks the server what became of it.
        now, conn.xid = conn.execute(
            "SELECT extract(epoch FROM clock_timestamp()), txid_current()"
        ).fetchone()
        return float(now)

    def committed(self, conn: Connection, lost: Connection) -> bool | None:
        """Whether the transaction ``lost`` was committing when its connection went
        committed (asked on ``conn``); None if the server cannot tell any more."""
        xid = getattr(lost, "xid", None)
        if xid is None:
            return None
        status = conn.execute("SELECT txid_status(?)", (xid,)).fetchone()[0]
        if status == "committed":
            return True
        if status == "aborted":
            return False
        return None  # too old to know, or (impossible after a reconnect) in progress

    def unreachable(self, exc: BaseException) -> bool:
        """Whether ``exc`` (or what it wraps) says the server cannot be reached now but
        may be soon: refused, shutting down, starting up, the connection broken."""
        for e in (exc, exc.__cause__):
            if not isinstance(e, self.psycopg.OperationalError):
                continue
            state = getattr(e, "sqlstate", None)
            if state is None and any(words in str(e) for words in REFUSED):
                return False
            if state is None or state.startswith("08") or state in UNREACHABLE:
                return True
        return False

    def commit(self, conn: Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: Connection) -> None:
        if conn.raw.info.transaction_status != self.psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")

    def retryable(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) in RACES

    def refusals(self) -> tuple[type[Exception], ...]:
        return (self.psycopg.errors.IntegrityError,)

    def driver_errors(self) -> tuple[type[Exception], ...]:
        return (self.psycopg.Error,)

    def lost(self, conn: Connection) -> bool:
        return bool(conn.raw.closed or conn.raw.broken)

    def rows(self, conn: Connection, cols: str, tail: str, args: list[Any]) -> list[Any]:
        rows: list[Any] = conn.execute(f"SELECT {cols} {tail}", args).fetchall()
        return rows

    def insert(
        self, conn: Connection, head: str, width: int, rows: list[tuple[Any, ...]], tail: str = ""
    ) -> None:
        """One statement, one array per column: its text never changes, so the server
        plans it once, and there are ``width`` arguments whatever the number of rows."""
        if rows:
            arrays = ",".join(f"CAST(? AS {ARRAY_TYPES[type(v)]})" for v in rows[0])
            columns = [list(c) for c in zip(*rows, strict=True)]
            conn.execute(f"{head} SELECT * FROM unnest({arrays}){tail}", columns)

    def among(self, column: str, values: list[Any]) -> tuple[str, list[Any]]:
        # One array argument: a list of arguments makes the server's cached plan build
        # the array again for every row it tests.
        return f"{column} = ANY(?)", [list(values)]

    def lock(self, conn: Connection, name: str) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (name,))

    def claim(
        self,
        conn: Connection,
        flow: str,
        owner: str,
        node: int,
        n: int,
        now: float,
        until: float,
    ) -> list[tuple[int, str, bytes, int]]:
        """Free tokens that another writer is busy with (locked) are skipped, not waited
        for: workers on many hosts claim side by side."""
        rows = conn.execute(
            "UPDATE tokens SET owner=?, lease_until=? WHERE id IN (SELECT id FROM tokens "
            "WHERE flow=? AND node=? AND port=0 AND lease_until<? AND not_before<=? "
            "ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING id, key, value, failures",
            (owner, until, flow, node, now, now, n),
        ).fetchall()
        rows.sort()
        return [(tid, key, bytes(value), failures) for tid, key, value, failures in rows]

    def after_commit(self, commits: int) -> None:
        pass

    async def aclose(self) -> None:
        pass
