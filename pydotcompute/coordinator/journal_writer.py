"""Group commit: ops queued by tasks, applied by one writer, many per transaction.

Both users of a journal (a deployed flow's session and the workflow store) write through
this one writer. What differs between SQLite and PostgreSQL (how to connect, how to begin,
which errors mean "run the transaction again") is the journal's :class:`Dialect`.

A server that goes away (a restart, a failover) is ridden through: the writer, the reads
and opening the journal keep trying for the dialect's ``reconnect_timeout`` (see
``coordinator.reconnect``), then every op fails with ``JournalUnavailableError``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from pydotcompute.coordinator.reconnect import Outage
from pydotcompute.errors import JournalError, JournalUnavailableError

__all__ = ["Dialect", "JournalWriter", "Op"]

Op = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any] | None"]

RETRIES = 20  # a transaction another writer aborted (deadlock, key race) runs again


class Dialect(Protocol):
    """What one database engine does its own way; the SQL the ops run is shared.

    Connections answer ``execute(sql, args)`` with ``?`` placeholders and a cursor that
    has ``rowcount``, ``fetchone`` and ``fetchall``.
    """

    name: str
    for_update: str  # appended to a SELECT whose rows this transaction will change
    reconnect_timeout: float  # seconds a lost server is tried again (see ``unreachable``)
    owners: Any  # the owners' liveness locks (``coordinator.liveness``)

    def writer(self) -> Any:
        """A connection for the writer, the journal's tables made if missing."""

    def reader(self) -> Any:
        """A connection that sees committed state, for reads on the event loop."""

    def create(self, conn: Any, schema: str) -> None:
        """Run ``schema`` (statements separated by ``;``) inside the open transaction."""

    threaded: bool  # transactions run on a thread (they wait on the network)

    def try_begin(self, conn: Any) -> float | None:
        """Start a write transaction and return the time leases are measured by, or
        None at once if another writer holds the journal (try again later)."""

    def commit(self, conn: Any) -> None: ...

    def rollback(self, conn: Any) -> None: ...

    def retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` aborted the transaction only because another writer raced it."""

    def refusals(self) -> tuple[type[Exception], ...]:
        """Constraint errors: an op that hits one is refused, the rest of the batch goes on."""

    def driver_errors(self) -> tuple[type[Exception], ...]:
        """Every error the engine's driver raises (reported as ``JournalError``)."""

    def lost(self, conn: Any) -> bool:
        """Whether ``conn`` lost its server (a new connection may work)."""

    def unreachable(self, exc: BaseException) -> bool:
        """Whether ``exc`` (or its ``__cause__``) says the server cannot be reached now
        and may be soon: worth trying again until ``reconnect_timeout``."""

    def committed(self, conn: Any, lost: Any) -> bool | None:
        """Whether the transaction that was committing when ``lost`` went away was
        committed, asked on the new connection ``conn``; None if it cannot be known."""

    def rows(self, conn: Any, cols: str, tail: str, args: list[Any]) -> list[Any]:
        """``SELECT cols tail`` as a list of rows (sequences), fetched in as few steps as
        the engine allows."""

    def insert(
        self, conn: Any, head: str, width: int, rows: list[tuple[Any, ...]], tail: str = ""
    ) -> None:
        """``head`` (``INSERT INTO t(cols)``) for every row, in as few statements as the
        engine allows, each ending with ``tail`` (an ON CONFLICT clause)."""

    def among(self, column: str, values: list[Any]) -> tuple[str, list[Any]]:
        """A test that ``column`` is one of ``values``: (SQL, its arguments)."""

    def lock(self, conn: Any, name: str) -> None:
        """Hold a lock named ``name`` until this transaction ends (serialises writers
        that would otherwise miss each other's uncommitted rows)."""

    def claim(
        self, conn: Any, flow: str, owner: str, node: int, n: int, now: float, until: float
    ) -> list[tuple[int, str, bytes, int]]:
        """Lease up to ``n`` free tokens of ``node`` to ``owner``, oldest first:
        (id, key, value, failures) of each."""

    def after_commit(self, commits: int) -> None: ...

    async def aclose(self) -> None: ...


class JournalWriter:
    """A queue of ops and the one task that commits them: every op queued since the last
    commit goes into the next transaction, in the order queued, so a record is never
    durable without the records queued before it. SQLite's transactions run on the
    event loop: a thread would give up the GIL on each step and then wait for the busy
    loop to hand it back, which made commits many times slower. PostgreSQL's run on a
    thread: they wait on the network and for the server's fsync, and the loop must not."""

    what = "journal"  # how errors name this writer

    def __init__(self, journal: Any) -> None:
        self.journal = journal
        self.dialect: Dialect = journal.dialect()
        self._ops: deque[Op] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._writer: Any = None
        self._reader: Any = None
        self._thread: ThreadPoolExecutor | None = None  # where threaded dialects commit
        self.on_error: Callable[[BaseException], None] = lambda exc: None
        self.commits = 0
        self._committing = False  # the running transaction has sent its COMMIT
        self._uncommitted: list[Any] = []  # that transaction's results
        self._down: JournalError | None = None  # gave up on an outage: every op fails so

    # ---- hooks ------------------------------------------------------------------------
    def setup(self, conn: Any, now: float) -> None:
        """Run once, in the first transaction."""

    def apply(self, conn: Any, now: float, ops: list[Op]) -> list[Any]:
        return [fn(conn, now, *args) for fn, args, _ in ops]

    def heartbeat(self, conn: Any, now: float) -> None:
        """Renew this writer's leases (every ``lease / 3``)."""

    def rejoin(self, conn: Any, now: float) -> None:
        """Run in the first transaction of a new connection that replaced a lost one."""

    def reset(self) -> None:
        """Forget what a transaction that rolled back had gathered."""

    def release(self, conn: Any, now: float) -> Any:
        """The last op: give back this writer's leases."""

    def deliver(self, ops: list[Op], results: list[Any]) -> None:
        for (_, _, fut), res in zip(ops, results, strict=True):
            if isinstance(res, BaseException):
                if fut is None:
                    self.on_error(res)
                elif not fut.done():
                    fut.set_exception(res)
            elif fut is not None and not fut.done():
                fut.set_result(res)
        if len(self._ops) <= self.journal.max_batch:
            self._room.set()

    # ---- lifetime -----------------------------------------------------------------------
    async def open(self) -> None:
        self._started(*await asyncio.to_thread(self._open_sync))

    def open_now(self) -> None:
        """``open`` without leaving the event loop (it blocks while the journal opens)."""
        self._started(*self._open_sync())

    def _open_sync(self) -> tuple[Any, Any]:
        """The writer's and the reader's connections; a server that is not up yet (or
        restarting) is waited for, up to ``reconnect_timeout``."""
        outage: Outage | None = None
        while True:
            try:
                writer = self._open_writer()
                try:
                    reader = self.dialect.reader()
                except BaseException:
                    writer.close()
                    raise
            except Exception as exc:
                if not self.dialect.unreachable(exc):
                    raise
                if outage is None:
                    outage = self._outage(exc)
                outage.wait_blocking(exc)
                continue
            if outage is not None:
                outage.over()
            return writer, reader

    def _outage(self, exc: BaseException) -> Outage:
        return Outage(self.what, self.journal.where, self.dialect.reconnect_timeout, exc)

    def _open_writer(self) -> Any:
        conn = self.dialect.writer()
        try:
            for attempt in range(RETRIES + 1):
                deadline = time.monotonic() + 60.0
                while (now := self.dialect.try_begin(conn)) is None:
                    if time.monotonic() > deadline:
                        raise JournalError(f"{self.what} stayed locked by another writer")
                    time.sleep(0.005)
                try:
                    self.setup(conn, now)
                    self.dialect.commit(conn)
                    return conn
                except Exception as exc:
                    if not self.dialect.lost(conn):
                        self.dialect.rollback(conn)
                    if isinstance(exc, JournalError):
                        raise
                    if attempt == RETRIES or not self.dialect.retryable(exc):
                        raise JournalError(f"{self.what} cannot be opened: {exc!r}") from exc
                    time.sleep(random.uniform(0.001, 0.02))
        except BaseException:
            conn.close()
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _started(self, writer: Any, reader: Any) -> None:
        self._writer = writer
        self._reader = reader
        if self.dialect.threaded:
            # Its own thread: stages that fill the default executor never delay a commit.
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="pydotcompute-journal")
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Give back this writer's leases, then stop after what is queued."""
        if self._task is None:
            return
        if self._down is None:
            try:
                await self.call(self.release)
            except JournalError:
                pass  # already reported through on_error; the leases will simply expire
        self._stopping = True
        self._wake.set()
        try:
            await self._task
        finally:
            self._task = None
            if self._thread is not None:
                self._thread.shutdown()
                self._thread = None
            await self.dialect.aclose()
            for conn in (self._writer, self._reader):
                if conn is not None:
                    conn.close()
            self._writer = self._reader = None
            self.dialect.owners.close()

    # ---- queueing ops -------------------------------------------------------------------
    def post(
        self, fn: Callable[..., Any], *args: Any, want: bool = False
    ) -> asyncio.Future[Any] | None:
        if self._down is not None:
            raise self._down
        if self._task is None or self._stopping:
            raise JournalError(f"{self.what} is closed")
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

    # ---- the writer ---------------------------------------------------------------------
    async def _run(self) -> None:
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
            n = min(len(self._ops), self.journal.max_batch)
            ops = [self._ops.popleft() for _ in range(n)]
            stop = self._stopping and not self._ops
            beat_due = time.time() >= next_beat
            results: list[Any] = []
            attempt = 0
            outage: Outage | None = None  # this batch's, from its first lost connection
            while self._down is None:
                try:
                    got = await self._off_loop(self._transact, conn, ops, beat_due)
                    if got is None:  # another process holds the journal: wait off the loop
                        await asyncio.sleep(0.005)
                        continue
                    results = got
                except Exception as exc:
                    if attempt < RETRIES and self.dialect.retryable(exc):
                        # Another process's transaction raced this one and won; after a
                        # short random pause the next try sees what it committed.
                        attempt += 1
                        await asyncio.sleep(random.uniform(0.001, 0.01) * attempt)
                        continue
                    if not (self.dialect.lost(conn) or self.dialect.unreachable(exc)):
                        err = (
                            exc
                            if isinstance(exc, JournalError)
                            else JournalError(f"{self.what} write failed: {exc!r}")
                        )
                        err.__cause__ = exc
                        results = [err] * len(ops)
                        if not ops:
                            self.on_error(err)
                        break
                    # The server went away (restart, failover, idle timeout): it rolled
                    # the transaction back, unless it was committing. Wait for it, then
                    # learn what became of a commit and run the batch again if it was
                    # lost, renewing the leases at once.
                    committing = self._committing
                    if outage is None:
                        outage = self._outage(exc)
                    try:
                        conn, verdict = await self._reconnect(conn, outage, exc, committing)
                    except JournalError as failed:
                        results = [failed] * len(ops)
                        if isinstance(failed, JournalUnavailableError):
                            self._down = failed  # every later op fails with it at once
                            self.on_error(failed)  # the user of the journal stops
                        elif not ops:
                            self.on_error(failed)
                        break
                    if verdict is True:
                        results = self._uncommitted
                    elif verdict is None and committing:
                        err = JournalError(
                            f"{self.what} lost its server while committing and the server "
                            f"cannot tell whether the batch was committed ({exc!r})"
                        )
                        err.__cause__ = exc
                        results = [err] * len(ops)
                    else:
                        beat_due = True
                        continue
                break
            if self._down is not None and not results:
                results = [self._down] * len(ops)
            self._uncommitted = []
            if beat_due:
                next_beat = time.time() + beat
            self.commits += 1
            self.deliver(ops, results)
            self.dialect.after_commit(self.commits)
            if stop:
                break

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` where this dialect's transactions run: on the writer's thread
        (the event loop goes on running stages meanwhile: their hops gather for the next
        transaction), or right here."""
        if self._thread is not None:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        return fn(*args)

    def _transact(self, conn: Any, ops: list[Op], beat_due: bool) -> list[Any] | None:
        """One transaction of the batch: the ops' results, or None if the journal is busy."""
        self._committing = False
        now = self.dialect.try_begin(conn)
        if now is None:
            return None
        try:
            results = self.apply(conn, now, ops)
            if beat_due:
                self.heartbeat(conn, now)
            self._committing = True
            self._uncommitted = results
            self.dialect.commit(conn)
        except BaseException:
            self.reset()
            if not self.dialect.lost(conn):  # a lost server has rolled back already
                self.dialect.rollback(conn)
            raise
        return results

    async def _reconnect(
        self, conn: Any, outage: Outage, exc: BaseException, committing: bool
    ) -> tuple[Any, bool | None]:
        """A new writer connection for ``conn``, which lost its server, tried until the
        outage's deadline (``JournalUnavailableError`` then); with whether the batch that
        was committing on ``conn`` (if ``committing``) was committed."""
        last = exc
        while True:
            await outage.wait(last)
            try:
                fresh = await self._off_loop(self._rejoin)
            except JournalError as e:
                if not self.dialect.unreachable(e):
                    raise
                last = e
            except self.dialect.driver_errors() as e:
                if not self.dialect.unreachable(e):
                    err = JournalError(f"{self.what} cannot reconnect: {e}")
                    err.__cause__ = e
                    raise err from e
                last = e
            else:
                break
        conn.close()
        self._writer = fresh
        verdict: bool | None = False
        if committing:
            try:
                verdict = await self._off_loop(self.dialect.committed, fresh, conn)
            except self.dialect.driver_errors():
                verdict = None  # lost again at once: the next failure tells
        outage.over()
        return fresh, verdict

    def _rejoin(self) -> Any:
        """A new writer connection, with this writer's ``rejoin`` committed on it."""
        conn = self.dialect.writer()
        try:
            while (now := self.dialect.try_begin(conn)) is None:
                time.sleep(0.005)
            self.rejoin(conn, now)
            self.dialect.commit(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    # ---- reads (event loop, committed state) --------------------------------------------
    def read(self, sql: str, *args: Any) -> list[Any]:
        """Rows of a query on committed state. A reader whose server went away (restart,
        idle timeout, failover) is replaced: reads change nothing, so trying again is
        safe. While the server cannot be reached this waits, blocking, up to
        ``reconnect_timeout`` (async code uses :meth:`aread`). Driver errors come out as
        ``JournalError``."""
        outage: Outage | None = None
        while True:
            try:
                rows = self._read_once(sql, args)
            except JournalError as exc:
                if not self.dialect.unreachable(exc):
                    raise
                if outage is None:
                    outage = self._outage(exc)
                outage.wait_blocking(exc)
                continue
            if outage is not None:
                outage.over()
            return rows

    async def aread(self, sql: str, *args: Any) -> list[Any]:
        """:meth:`read` that waits out an outage without holding up the event loop."""
        outage: Outage | None = None
        while True:
            try:
                rows = self._read_once(sql, args)
            except JournalError as exc:
                if not self.dialect.unreachable(exc):
                    raise
                if outage is None:
                    outage = self._outage(exc)
                await outage.wait(exc)
                continue
            if outage is not None:
                outage.over()
            return rows

    def _read_once(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        reader = self._reader
        if reader is None:
            raise JournalError(f"{self.what} is closed")
        errors = self.dialect.driver_errors()
        try:
            return list(reader.execute(sql, args).fetchall())
        except errors as exc:
            if not self.dialect.lost(reader):
                raise JournalError(f"{self.what} read failed: {exc}") from exc
        # Raises JournalError if the server cannot be reached; the broken reader stays
        # until then, so the next read tries again.
        fresh = self.dialect.reader()
        reader.close()
        self._reader = fresh
        try:
            return list(fresh.execute(sql, args).fetchall())
        except errors as exc:
            raise JournalError(f"{self.what} read failed: {exc}") from exc
