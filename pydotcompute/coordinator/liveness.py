"""Whether the owner of leased work is alive, decided by a lock only that owner can hold.

Every process that writes a journal (a deployed flow, a workflow engine) is an *owner*:
it leases tokens and workflows and renews the leases with heartbeats. When an owner
dies its leases run out in time, but the others can free its work at once if they know
for sure that it is dead. A host name and a process id cannot say that: two containers
(or cloned VMs) share host names and number their processes alike, and a live worker
was taken for dead. So each owner holds a lock that the operating system or the
database server releases when the owner is gone, and only a free lock counts as death:

- PostgreSQL: a session-level advisory lock named for the owner, taken on the writer's
  connection. The server releases it when that connection ends (the process died, or
  its connection was cut: either way its transactions can no longer commit). A server
  restart releases every lock, and owners take theirs again when they reconnect; an
  owner last seen before the server started is not judged by its lock (it may still be
  reconnecting): its leases decide.
- SQLite: an exclusive ``flock`` on a file of its own in ``<journal>-owners/``, beside
  the journal, held while the owner runs. The kernel releases it when the process ends,
  however it ends, in any PID namespace that shares the file.

Anything else (an owner without a lock file, an owner from another server incarnation)
is left to its lease.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: leases alone decide there
    fcntl = None  # type: ignore[assignment]

__all__ = ["AdvisoryLocks", "FileLocks", "owners_folder", "owners_of"]

LOCK_PREFIX = "pydotcompute/owner/"

Read = Callable[..., list[Any]]  # read(sql, *args): rows, on a reader or in a transaction


OWNERS_SUFFIX = "-owners"


def owners_folder(journal_path: str) -> str:
    """Where the owners of the SQLite journal at ``journal_path`` keep their lock files."""
    return journal_path + OWNERS_SUFFIX


def owners_of(folder: str) -> str | None:
    """The journal whose owners' folder ``folder`` is, if it is one (else None)."""
    path = folder.rstrip("/" + os.sep)
    if path.endswith(OWNERS_SUFFIX) and os.path.isfile(path[: -len(OWNERS_SUFFIX)]):
        return path[: -len(OWNERS_SUFFIX)]
    return None


class AdvisoryLocks:
    """Owner locks as PostgreSQL session-level advisory locks (see the module)."""

    def hold(self, conn: Any, owner: str) -> None:
        """Take ``owner``'s lock on ``conn`` (waits while a reaper is testing it)."""
        conn.execute("SELECT pg_advisory_lock(hashtextextended(?, 0))", (LOCK_PREFIX + owner,))

    def dead(self, conn: Any, owner: str, seen: float) -> bool:
        """True only if ``owner`` certainly died: it was seen since the server started and
        its lock is free. Inside a write transaction; the test lock lasts until it ends."""
        return bool(
            conn.execute(
                "SELECT CASE WHEN ? < extract(epoch FROM pg_postmaster_start_time()) THEN false "
                "ELSE pg_try_advisory_xact_lock(hashtextextended(?, 0)) END",
                (seen, LOCK_PREFIX + owner),
            ).fetchone()[0]
        )

    def gone(self, read: Read, owner: str, seen: float) -> bool:
        """``dead`` for those who only look (a journal reader, an operator's repair):
        the test lock lasts the statement, or the transaction it runs in."""
        return bool(
            read(
                "SELECT CASE WHEN ? < extract(epoch FROM pg_postmaster_start_time()) THEN false "
                "ELSE pg_try_advisory_xact_lock(hashtextextended(?, 0)) END",
                seen,
                LOCK_PREFIX + owner,
            )[0][0]
        )

    def forget(self, owner: str) -> None:
        """Nothing to do: closing the writer's connection releases the lock."""

    def close(self) -> None:
        pass


class FileLocks:
    """Owner locks as ``flock``-ed files beside an SQLite journal (see the module)."""

    def __init__(self, journal_path: str) -> None:
        self.folder = owners_folder(journal_path)
        self._held: dict[str, int] = {}  # owner -> file descriptor holding its lock

    def _path(self, owner: str) -> str:
        return os.path.join(self.folder, owner)

    def hold(self, conn: Any, owner: str) -> None:
        if fcntl is None or owner in self._held:
            return
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self._path(owner), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # flock, not fcntl locks: those belong to the process, so a second owner in
            # the same process would not see the first one's lock.
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._held[owner] = fd

    def dead(self, conn: Any, owner: str, seen: float) -> bool:
        """True if ``owner``'s lock file exists and nobody holds it. The file goes once
        found free (inside the reaper's write transaction, which holds SQLite's write
        lock: no other reaper looks meanwhile)."""
        if fcntl is None or owner in self._held:
            return False
        try:
            fd = os.open(self._path(owner), os.O_RDWR)
        except FileNotFoundError:
            return False  # no lock to tell by: its lease decides
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                os.unlink(self._path(owner))
            except FileNotFoundError:
                pass
            return True
        finally:
            os.close(fd)

    def gone(self, read: Read, owner: str, seen: float) -> bool:
        """``dead`` for those who only look (a journal reader, an operator's repair): a
        shared test lock, given back at once, and the file left for the owners' reaper
        (without it, the reaper could no longer tell that this owner died)."""
        if fcntl is None:
            return False
        try:
            fd = os.open(self._path(owner), os.O_RDONLY)
        except OSError:
            return False  # no lock file (or none this user may read): its lease decides
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(fd, fcntl.LOCK_UN)
            return True
        finally:
            os.close(fd)

    def forget(self, owner: str) -> None:
        """Give up ``owner``'s lock and its file (after its leases were released)."""
        fd = self._held.pop(owner, None)
        if fd is None:
            return
        try:
            os.unlink(self._path(owner))
        except FileNotFoundError:
            pass
        os.close(fd)

    def close(self) -> None:
        for owner in list(self._held):
            self.forget(owner)
