"""Reading a journal from outside the processes that write it: what the ``pydotcompute``
journal commands and the dashboard show about flows, items and dead letters.

A reader never writes: an SQLite journal is opened read-only (a missing path is refused,
never created) and a PostgreSQL session is made read-only. Values stay as the pickled
bytes the journal holds; whoever shows them decodes them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydotcompute.coordinator.journal import JournalConfig, open_journal
from pydotcompute.coordinator.journal_postgres import MARK_TABLE, SCHEMA_VERSION, PostgresJournal
from pydotcompute.coordinator.journal_sqlite import SQLiteJournal, connect_read_only
from pydotcompute.errors import JournalError

__all__ = [
    "DeadLetterRow",
    "FlowSummary",
    "Holder",
    "ItemRow",
    "JournalReader",
    "StageCounts",
    "TokenRow",
]


@dataclass(frozen=True)
class FlowSummary:
    """One flow of a journal: its stages, items by state and what is oldest."""

    name: str
    stages: list[str]
    """Names of the graph's nodes, entry first (the final ``result`` node left out)."""
    created: float
    items: dict[str, int]
    """Number of items per state: ``active``, ``done``, ``dead``, ``cancelled``."""
    dead_letters: int
    oldest_active: str | None
    """Key of the unfinished item submitted first (None when none is unfinished)."""
    oldest_active_since: float | None
    processes: list[tuple[str, int, float]]
    """(host, pid, last heartbeat) of each process running the flow on this journal."""


@dataclass(frozen=True)
class TokenRow:
    """Where part of an active item waits: at a stage's input or as a join's part."""

    stage: str
    node: int
    port: int
    failures: int
    owner: str | None
    lease_until: float
    not_before: float


@dataclass(frozen=True)
class ItemRow:
    """One item: its state, when it came and went, and where its tokens are."""

    key: str
    state: str
    submitted: float
    finished: float | None
    tokens: list[TokenRow] = field(default_factory=list)


@dataclass(frozen=True)
class DeadLetterRow:
    """A dead letter as stored: ``value`` is the pickled input of the failed stage."""

    flow: str
    key: str
    stage: str
    node: int
    error: str
    traceback: str
    attempts: int
    failed_at: float
    value: bytes


@dataclass(frozen=True)
class StageCounts:
    """What waits at one node of a flow."""

    stage: str
    node: int
    waiting: int
    """Items at the node's input that any process may take now."""
    running: int
    """Tokens a process holds a lease on: being run now."""
    retrying: int
    """Tokens waiting for a retry's back-off to pass."""
    join_parts: int
    """Parts of items gathered for a join at this node."""
    dead_letters: int


@dataclass(frozen=True)
class Holder:
    """A process holding a lease on part of an item."""

    key: str
    stage: str
    owner: str
    host: str | None
    pid: int | None
    lease_until: float

    def describe(self) -> str:
        where = (
            f"process {self.pid} on {self.host}" if self.pid is not None else "an unknown process"
        )
        left = max(0.0, self.lease_until - time.time())
        return (
            f"{where} (owner {self.owner[:12]}) holds its lease at stage {self.stage!r} "
            f"for {left:.0f} s more"
        )


class JournalReader:
    """A read-only view of a journal (a path, a ``postgresql://`` DSN or a journal
    config). Safe to share between threads: reads take turns on one connection."""

    def __init__(self, journal: Any) -> None:
        # Not checked for writing: a journal on a read-only mount, or one this user may
        # only read, can be looked at (``connect_read_only`` says what is wrong instead).
        cfg = open_journal(journal, for_writing=False)
        if cfg is None:
            raise JournalError("no journal given: pass an SQLite path or a postgresql:// DSN")
        self.journal: JournalConfig = cfg
        self.where = cfg.where
        self._lock = threading.Lock()
        self._conn: Any = None
        self._dialect: Any = None
        self._owners: Any = None  # the owners' liveness locks, to tell who holds an item
        self._conn = self._connect()

    def _connect(self) -> Any:
        cfg = self.journal
        if isinstance(cfg, SQLiteJournal):
            return connect_read_only(cfg.path)
        assert isinstance(cfg, PostgresJournal)
        if self._dialect is None:
            self._dialect = cfg.dialect()  # raises JournalError without psycopg
        conn = self._dialect.reader()
        try:
            conn.execute("SET default_transaction_read_only = on")
            marked = conn.execute("SELECT to_regclass(?) IS NOT NULL", (MARK_TABLE,)).fetchone()[0]
            if not marked:
                raise JournalError(
                    f"{self.where} holds no journal (no {MARK_TABLE} table in the schemas of "
                    "its search_path): check the DSN, or its options=-csearch_path"
                )
            version = conn.execute(f"SELECT version FROM {MARK_TABLE}").fetchone()
            if version is None or version[0] != SCHEMA_VERSION:
                raise JournalError(
                    f"journal {self.where} has schema {version and version[0]}, "
                    f"this version reads {SCHEMA_VERSION}"
                )
        except BaseException as exc:
            conn.close()
            if isinstance(exc, self._dialect.driver_errors()):
                raise JournalError(f"cannot read journal {self.where}: {exc}") from exc
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<JournalReader {self.where}{' closed' if self._conn is None else ''}>"

    # ---- plumbing ---------------------------------------------------------------------
    @property
    def is_postgres(self) -> bool:
        return isinstance(self.journal, PostgresJournal)

    def read(self, sql: str, *args: Any) -> list[Any]:
        """Rows of ``sql`` (``?`` placeholders). A PostgreSQL connection the server
        dropped is replaced once; reads change nothing, so trying again is safe."""
        with self._lock:
            if self._conn is None:
                raise JournalError(f"the reader of {self.where} is closed")
            errors = self._driver_errors()
            try:
                return [tuple(r) for r in self._conn.execute(sql, args).fetchall()]
            except errors as exc:
                if self._dialect is None or not self._dialect.lost(self._conn):
                    raise JournalError(f"reading journal {self.where} failed: {exc}") from exc
            self._conn.close()
            self._conn = None
            self._conn = self._connect()
            try:
                return [tuple(r) for r in self._conn.execute(sql, args).fetchall()]
            except errors as exc:
                raise JournalError(f"reading journal {self.where} failed: {exc}") from exc

    def _driver_errors(self) -> tuple[type[Exception], ...]:
        if self._dialect is not None:
            return tuple(self._dialect.driver_errors())
        import sqlite3

        return (sqlite3.Error,)

    def now(self) -> float:
        """The time leases are measured by: the server's clock for PostgreSQL."""
        if self.is_postgres:
            return float(self.read("SELECT extract(epoch FROM clock_timestamp())")[0][0])
        return time.time()

    def has_table(self, name: str) -> bool:
        if self.is_postgres:
            return bool(self.read("SELECT to_regclass(?) IS NOT NULL", name)[0][0])
        return bool(self.read("SELECT count(*) FROM sqlite_master WHERE name=?", name)[0][0])

    def _among(self, column: str, values: list[Any]) -> tuple[str, list[Any]]:
        if self.is_postgres:
            return f"{column} = ANY(?)", [list(values)]
        return f"{column} IN ({','.join('?' * len(values))})", list(values)

    # ---- flows ------------------------------------------------------------------------
    def flow_names(self) -> list[str]:
        return [r[0] for r in self.read("SELECT name FROM flows ORDER BY name")]

    def node_names(self, flow: str) -> list[str]:
        """Names of the flow's nodes by index (index 0 is the final ``result`` node)."""
        rows = self.read("SELECT stages FROM flows WHERE name=?", flow)
        if not rows:
            raise self._no_flow(flow)
        return list(json.loads(rows[0][0]))

    def _no_flow(self, flow: str) -> JournalError:
        names = self.flow_names()
        known = ", ".join(repr(n) for n in names) if names else "none"
        return JournalError(f"journal {self.where} has no flow {flow!r} (its flows: {known})")

    def flows(self) -> list[FlowSummary]:
        """Every flow of the journal, by name."""
        counts: dict[str, dict[str, int]] = {}
        for flow, state, n in self.read(
            "SELECT flow, state, count(*) FROM items GROUP BY flow, state"
        ):
            counts.setdefault(flow, {})[state] = int(n)
        dead = dict(self.read("SELECT flow, count(*) FROM dead_letters GROUP BY flow"))
        oldest: dict[str, tuple[str, float]] = {}
        for flow, key, submitted in self.read(
            "SELECT i.flow, min(i.key), i.submitted FROM items i JOIN (SELECT flow, "
            "min(submitted) AS first FROM items WHERE state='active' GROUP BY flow) o "
            "ON i.flow=o.flow AND i.submitted=o.first WHERE i.state='active' "
            "GROUP BY i.flow, i.submitted"
        ):
            oldest[flow] = (key, float(submitted))
        procs: dict[str, list[tuple[str, int, float]]] = {}
        for flow, host, pid, seen in self.read(
            "SELECT flow, host, pid, seen FROM owners ORDER BY flow, host, pid"
        ):
            procs.setdefault(flow, []).append((host, int(pid), float(seen)))
        out = []
        for name, stages, created in self.read(
            "SELECT name, stages, created FROM flows ORDER BY name"
        ):
            first = oldest.get(name)
            out.append(
                FlowSummary(
                    name=name,
                    # Nodes are numbered from the result backwards: reversed, each
                    # comes before the nodes it sends to.
                    stages=list(reversed(json.loads(stages)[1:])),
                    created=float(created),
                    items=counts.get(name, {}),
                    dead_letters=int(dead.get(name, 0)),
                    oldest_active=first[0] if first else None,
                    oldest_active_since=first[1] if first else None,
                    processes=procs.get(name, []),
                )
            )
        return out

    def items(
        self,
        flow: str,
        states: list[str] | None = None,
        keys: list[str] | None = None,
        limit: int | None = None,
    ) -> list[ItemRow]:
        """Items of ``flow`` in submission order, only those in ``states`` or with
        ``keys`` when given, each with the tokens it has in the journal."""
        names = self.node_names(flow)
        sql = "SELECT key, state, submitted, finished FROM items WHERE flow=?"
        args: list[Any] = [flow]
        if states:
            cond, more = self._among("state", states)
            sql += f" AND {cond}"
            args += more
        if keys:
            cond, more = self._among("key", keys)
            sql += f" AND {cond}"
            args += more
        sql += " ORDER BY submitted, key"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = self.read(sql, *args)
        tokens: dict[str, list[TokenRow]] = {}
        # A dead item may still have tokens: the other branches of a fan-out go on.
        active = [r[0] for r in rows if r[1] in ("active", "dead")]
        for i in range(0, len(active), 400):
            cond, more = self._among("key", active[i : i + 400])
            for key, node, port, failures, owner, until, not_before in self.read(
                "SELECT key, node, port, failures, owner, lease_until, not_before FROM tokens "
                f"WHERE flow=? AND {cond} ORDER BY key, node, port",
                flow,
                *more,
            ):
                tokens.setdefault(key, []).append(
                    TokenRow(
                        _name(names, node),
                        int(node),
                        int(port),
                        int(failures),
                        owner,
                        float(until),
                        float(not_before),
                    )
                )
        return [
            ItemRow(k, s, float(sub), None if fin is None else float(fin), tokens.get(k, []))
            for k, s, sub, fin in rows
        ]

    def dead_letters(self, flow: str | None = None, key: str | None = None) -> list[DeadLetterRow]:
        """Dead letters, oldest first: of one flow, and of one item, when given."""
        if flow is not None:
            self.node_names(flow)  # an unknown flow is an error, not an empty list
        sql = (
            "SELECT flow, key, stage, node, error, traceback, attempts, failed_at, value "
            "FROM dead_letters"
        )
        conds, args = [], []
        if flow is not None:
            conds.append("flow=?")
            args.append(flow)
        if key is not None:
            conds.append("key=?")
            args.append(key)
        if conds:
            sql += " WHERE " + " AND ".join(conds)
        sql += " ORDER BY failed_at, flow, key, node"
        return [
            DeadLetterRow(f, k, s, int(n), e, t, int(a), float(at), bytes(v))
            for f, k, s, n, e, t, a, at, v in self.read(sql, *args)
        ]

    def stages(self, flow: str) -> list[StageCounts]:
        """What waits at each node of ``flow`` now (nodes with nothing included)."""
        names = self.node_names(flow)
        now = self.now()
        per: dict[int, list[int]] = {i: [0, 0, 0, 0, 0] for i in range(1, len(names))}
        slots = {"waiting": 0, "running": 1, "retrying": 2, "part": 3}
        for node, what, n in self.read(
            "SELECT node, CASE WHEN port>0 THEN 'part' "
            "WHEN owner IS NOT NULL AND lease_until>=? THEN 'running' "
            "WHEN not_before>? THEN 'retrying' ELSE 'waiting' END AS what, count(*) "
            "FROM tokens WHERE flow=? GROUP BY node, what",
            now,
            now,
            flow,
        ):
            per.setdefault(int(node), [0, 0, 0, 0, 0])[slots[what]] += int(n)
        for node, n in self.read(
            "SELECT node, count(*) FROM dead_letters WHERE flow=? GROUP BY node", flow
        ):
            per.setdefault(int(node), [0, 0, 0, 0, 0])[4] += int(n)
        return [StageCounts(_name(names, i), i, *per[i]) for i in sorted(per)]

    def holders(self, flow: str, keys: list[str]) -> list[Holder]:
        """Live processes holding a lease on a token of these items. A lease held by an
        owner whose liveness lock is free (``coordinator.liveness``) is not counted: its
        process is gone and no longer runs anything."""
        if self._owners is None:
            dialect = self._dialect if self._dialect is not None else self.journal.dialect()
            self._owners = dialect.owners
        owners = self._owners
        return live_holders(
            self.read,
            flow,
            keys,
            self.now(),
            self.node_names(flow),
            lambda owner, seen: owners.gone(self.read, owner, seen),
        )


def _name(names: list[str], node: int) -> str:
    return names[node] if 0 <= node < len(names) else f"node {node}"


def live_holders(
    read: Any,
    flow: str,
    keys: list[str],
    now: float,
    names: list[str],
    gone: Callable[[str, float], bool],
) -> list[Holder]:
    """The leases held on ``keys``' tokens by processes that may be running them, read
    with ``read(sql, *args)`` (a reader's, or a transaction's). ``gone(owner, seen)``
    says whether an owner certainly died (its liveness lock is free); host and pid are
    only for naming the holder."""
    out: list[Holder] = []
    for key in keys:
        for node, owner, until, host, pid, seen in read(
            "SELECT t.node, t.owner, t.lease_until, o.host, o.pid, o.seen FROM tokens t "
            "LEFT JOIN owners o ON o.owner=t.owner WHERE t.flow=? AND t.key=? "
            "AND t.owner IS NOT NULL AND t.lease_until>=? ORDER BY t.node, t.port",
            flow,
            key,
            now,
        ):
            if seen is not None and gone(owner, float(seen)):
                continue  # its process is gone: the lease only waits to be reaped
            out.append(
                Holder(
                    key,
                    _name(names, int(node)),
                    owner,
                    host,
                    None if pid is None else int(pid),
                    float(until),
                )
            )
    return out
