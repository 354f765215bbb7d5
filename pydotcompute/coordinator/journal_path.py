"""Why an SQLite journal's path cannot be used, said before a byte is written there.

Each reason gets its own message naming the path and what to do: a missing or
unwritable directory, a read-only file system, a file this user may not write, an
owners folder (``<journal>-owners/``, where writers keep their lock files) that is not a
writable directory, and a file that is not an intact journal. SQLite itself would report most of these as
"unable to open database file", or open an intact journal read-only and then fail on
the first write, which reads like corruption.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from pydotcompute.coordinator.liveness import owners_folder
from pydotcompute.errors import JournalError

__all__ = ["check_sqlite_path", "open_error"]

SQLITE_MAGIC = b"SQLite format 3\x00"
SIDE_FILES = ("-wal", "-shm")  # what SQLite in WAL mode keeps beside the journal


def _user() -> str:
    return f"uid {os.geteuid()}" if hasattr(os, "geteuid") else "this user"


def _writable(path: str) -> bool:
    if os.access in os.supports_effective_ids:
        return os.access(path, os.W_OK, effective_ids=True)
    return os.access(path, os.W_OK)


def _mount_point(path: str) -> str:
    """The directory ``path``'s file system is mounted at (for messages)."""
    p = Path(path).resolve()
    try:  # Linux: the longest mount point above it (a bind mount shares its device)
        with open("/proc/self/mounts") as f:
            points = [line.split()[1].encode().decode("unicode_escape") for line in f]
        above = [m for m in points if p == Path(m) or Path(m) in p.parents]
        if above:
            return max(above, key=len)
    except (OSError, IndexError, UnicodeDecodeError):
        pass  # elsewhere: walk up while the device stays the same
    dev = p.stat().st_dev
    while p.parent != p and p.parent.stat().st_dev == dev:
        p = p.parent
    return str(p)


def read_only_fs(directory: str) -> bool:
    """Whether ``directory`` lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs (Windows): SQLite will say so
        return False


def check_header(path: str) -> None:
    """Refuse a file that is not an intact journal, reading only its first page header."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(100)
    except PermissionError as exc:
        raise JournalError(
            f"journal {path} cannot be read by {_user()}: give it read and write "
            "permission (chmod u+rw) or open it as its owner"
        ) from exc
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


def check_sqlite_path(path: str) -> None:
    """Raise ``JournalError`` if a journal cannot be created or opened for writing at
    ``path``, or if what is there is not an intact journal (its header: the full
    integrity check runs when the journal is opened). Writes nothing."""
    if os.path.isdir(path):
        raise JournalError(f"journal {path} is a directory: pass a file path such as {path}/app.db")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        above = directory
        while not os.path.exists(above):
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise JournalError(
                f"journal {path}: {above} is a file, not a directory; choose another path"
            )
        raise JournalError(
            f"journal {path}: directory {directory} does not exist; create it "
            f"(mkdir -p {directory}) or choose another path"
        )
    exists = os.path.exists(path)
    if exists:
        check_header(path)
    if read_only_fs(directory):
        what = (
            "an existing journal can only be read there" if exists else "nothing can be made there"
        )
        raise JournalError(
            f"journal {path} is on a read-only file system (mounted at "
            f"{_mount_point(directory)}; {what}): a journal is written, and SQLite keeps "
            f"{os.path.basename(path)}-wal and -shm beside it. Remount it read-write, or "
            "copy the journal to a writable directory and open the copy"
        )
    if not (_writable(directory) and os.access(directory, os.X_OK)):
        raise JournalError(
            f"journal {path}: directory {directory} is not writable by {_user()}, and SQLite "
            f"creates {os.path.basename(path)}-wal and -shm beside the journal; make it "
            "writable (chmod/chown) or choose another directory"
        )
    for target in (path, *(path + s for s in SIDE_FILES)):
        if os.path.exists(target) and not _writable(target):
            raise JournalError(
                f"journal {path}: {target} is read-only for {_user()}; make it writable "
                f"(chmod u+w {target}) or open the journal as its owner"
            )
    # Each process writing the journal holds a lock file in this folder (see
    # ``coordinator.liveness``); it is made on first use, like -wal and -shm.
    owners = owners_folder(path)
    if os.path.lexists(owners):
        if not os.path.isdir(owners):
            raise JournalError(
                f"journal {path}: {owners} is not a directory, and the processes writing "
                "the journal keep their lock files there; move it away"
            )
        if not (_writable(owners) and os.access(owners, os.X_OK)):
            raise JournalError(
                f"journal {path}: {owners} is not writable by {_user()}, and each process "
                f"writing the journal keeps a lock file there; make it writable (chmod "
                f"u+rwx {owners}) or open the journal as its owner"
            )


def open_error(path: str, exc: sqlite3.Error) -> JournalError:
    """The ``JournalError`` for an error SQLite raised while opening ``path``: the path
    check again (the file system may have changed since), else what SQLite's text means."""
    try:
        check_sqlite_path(path)
    except JournalError as found:
        return found
    text = str(exc)
    low = text.lower()
    if "readonly" in low or "read-only" in low:
        why = f"SQLite could not write it ({text}); check its permissions and mount"
    elif "disk is full" in low:
        why = f"the disk is full ({text}); free space and open it again"
    elif "unable to open" in low or "disk i/o error" in low:
        why = f"SQLite could not open it ({text}); check its permissions and mount"
    elif "locked" in low or "busy" in low:
        why = f"another process holds it locked ({text}); try again"
    else:
        return JournalError(
            f"journal {path} is corrupt or truncated: {text}; it was left untouched"
        )
    return JournalError(f"journal {path}: {why}; it was left untouched")
