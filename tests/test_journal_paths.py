"""A journal path that cannot be used is refused when it is given, with its own reason.

Missing directory, unwritable directory, read-only file system, read-only file and a
damaged file each raise their own ``JournalError`` naming the path and the fix, from
``RingKernelRuntime(journal=...)``, ``deploy`` and ``WorkflowEngine`` alike, and nothing
is written there. Running as root, permissions do not stop this process: those cases run
in a child process in a user namespace (``unshare``), where the file's owner is not
mapped and its mode bits count; the read-only file system is a read-only bind mount in a
mount namespace. Where the platform cannot do that, they skip, and the logic is still
covered by the tests that pretend the file system's answers.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pydotcompute import RingKernelRuntime, WorkflowEngine
from pydotcompute.coordinator import deploy, journal_path, stage
from pydotcompute.errors import JournalError

ROOT = Path(__file__).resolve().parent.parent

# Opens the journal at argv[1] the three ways a user gives one; one line per way.
PROBE = """
import asyncio, sys
from pydotcompute import RingKernelRuntime, WorkflowEngine
from pydotcompute.coordinator import deploy, stage
from pydotcompute.errors import JournalError

async def flow(path):
    async with await deploy(None, stage(abs), name="t", journal=path) as f:
        await f.submit(-1, key="a")

path = sys.argv[1]
for how, run in [
    ("runtime", lambda: RingKernelRuntime(journal=path)),
    ("deploy", lambda: asyncio.run(flow(path))),
    ("workflows", lambda: WorkflowEngine(None, path)),
]:
    try:
        run()
    except JournalError as exc:
        print(how, "JournalError:", exc, flush=True)
    else:
        print(how, "opened", flush=True)
"""


def snapshot(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def make_journal(path: Path) -> None:
    """An intact journal with one finished item, closed (no -wal or -shm left)."""
    import asyncio

    async def main() -> None:
        async with await deploy(None, stage(abs), name="t", journal=path) as f:
            await f.submit(-1, key="a")
            assert await f.result("a", timeout=10) == 1

    asyncio.run(main())


@functools.cache
def namespaces(*flags: str) -> str | None:
    """Why ``unshare flags`` cannot run here, or None if it can."""
    if shutil.which("unshare") is None:
        return "the unshare program is not installed"
    try:
        proc = subprocess.run(
            ["unshare", *flags, "true"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare {' '.join(flags)} failed: {exc}"
    if proc.returncode != 0:
        return f"unshare {' '.join(flags)} is refused here: {proc.stderr.strip()}"
    return None


def probe(path: Path, *, wrap: list[str] | None = None, shell: str = "") -> list[str]:
    """Run PROBE on ``path`` in a child (inside ``wrap``, after ``shell`` commands)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", PROBE, str(path)]
    if shell:
        cmd = ["sh", "-c", f'{shell} && exec "$@"', "sh", *cmd]
    proc = subprocess.run(
        [*(wrap or []), *cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["runtime", "deploy", "workflows"], proc.stdout
    return lines


def as_unprivileged(tmp: Path) -> list[str] | None:
    """How to run a child for which mode bits count: nothing if we are not root, else a
    user namespace whose root is not mapped (skips if the platform refuses)."""
    if os.geteuid() != 0:
        return None
    why = namespaces("--user")
    if why:
        pytest.skip(f"running as root and {why}: mode bits cannot be tested")
    return ["unshare", "--user"]


def refused(lines: list[str], *words: str) -> None:
    for line in lines:
        assert "JournalError:" in line, line
        for w in words:
            assert w in line, line


# ---- in this process: the file system as it is --------------------------------------


async def test_a_missing_directory_is_refused_by_each_way_of_giving_a_journal(tmp_path):
    path = tmp_path / "nope" / "deeper" / "app.db"
    for attempt in (
        lambda: RingKernelRuntime(journal=path),
        lambda: WorkflowEngine(None, str(path)),
    ):
        with pytest.raises(JournalError, match="does not exist") as err:
            attempt()
        assert str(tmp_path / "nope" / "deeper") in str(err.value)
        assert "mkdir -p" in str(err.value)
    with pytest.raises(JournalError, match="does not exist"):
        await deploy(None, stage(abs), name="t", journal=str(path))
    assert list(tmp_path.iterdir()) == []  # nothing made on the way


async def test_a_directory_or_a_file_in_the_way_is_refused(tmp_path):
    with pytest.raises(JournalError, match="is a directory"):
        RingKernelRuntime(journal=tmp_path)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(JournalError, match="is a file, not a directory"):
        await deploy(None, stage(abs), name="t", journal=tmp_path / "plain" / "app.db")


def test_a_damaged_journal_is_refused_by_the_runtime_before_first_use(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not sqlite at all" * 20)
    with pytest.raises(JournalError, match="not a journal"):
        RingKernelRuntime(journal=str(bad))
    short = tmp_path / "short.db"
    short.write_bytes(b"SQLite format 3\x00")
    with pytest.raises(JournalError, match="truncated"):
        RingKernelRuntime(journal=short)
    assert bad.read_bytes() == b"not sqlite at all" * 20


# ---- in a child: permissions and mounts for real --------------------------------------


def test_an_unwritable_directory_is_refused_and_nothing_is_written(tmp_path):
    wrap = as_unprivileged(tmp_path)
    fresh = tmp_path / "ro-dir"
    fresh.mkdir()
    existing = tmp_path / "ro-dir-existing"
    existing.mkdir()
    make_journal(existing / "app.db")
    before = snapshot(existing)
    fresh.chmod(0o555)
    existing.chmod(0o555)
    try:
        for d in (fresh, existing):
            lines = probe(d / "app.db", wrap=wrap)
            refused(lines, str(d), "is not writable", "-wal")
    finally:
        fresh.chmod(0o755)
        existing.chmod(0o755)
    assert list(fresh.iterdir()) == []
    assert snapshot(existing) == before


def test_a_read_only_journal_file_is_refused_not_opened_read_only(tmp_path):
    wrap = as_unprivileged(tmp_path)
    make_journal(tmp_path / "app.db")
    (tmp_path / "app.db").chmod(0o444)
    before = snapshot(tmp_path)
    lines = probe(tmp_path / "app.db", wrap=wrap)
    refused(lines, "app.db is read-only", "chmod u+w")
    assert snapshot(tmp_path) == before  # no -wal or -shm appeared beside it


def test_an_intact_journal_on_a_read_only_file_system_is_not_called_corrupt(tmp_path):
    why = namespaces("--user", "--map-root-user", "--mount")
    if why:
        pytest.skip(f"a read-only mount needs a user and mount namespace: {why}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    make_journal(mnt / "app.db")
    truncated = mnt / "short.db"
    truncated.write_bytes((mnt / "app.db").read_bytes()[:4096])
    before = snapshot(mnt)
    ro = f"mount --bind {mnt} {mnt} && mount -o remount,bind,ro {mnt}"
    wrap = ["unshare", "--user", "--map-root-user", "--mount"]
    lines = probe(mnt / "app.db", wrap=wrap, shell=ro)
    refused(lines, "read-only file system", f"mounted at {mnt}", "Remount it read-write")
    assert not any("corrupt" in line for line in lines)
    refused(probe(mnt / "new.db", wrap=wrap, shell=ro), "read-only file system")
    # A damaged file is still called damaged there: that is the first thing to fix.
    refused(probe(truncated, wrap=wrap, shell=ro), "truncated")
    assert snapshot(mnt) == before


# ---- everywhere: the same decisions, the file system's answers pretended -------------


def test_each_reason_has_its_own_message_when_the_file_system_says_so(tmp_path, monkeypatch):
    path = tmp_path / "app.db"
    monkeypatch.setattr(journal_path, "read_only_fs", lambda d: True)
    with pytest.raises(JournalError, match="read-only file system"):
        journal_path.check_sqlite_path(str(path))
    monkeypatch.setattr(journal_path, "read_only_fs", lambda d: False)
    monkeypatch.setattr(journal_path, "_writable", lambda p: p != str(tmp_path))
    with pytest.raises(JournalError, match=f"directory {tmp_path} is not writable"):
        journal_path.check_sqlite_path(str(path))
    path.write_bytes(b"")
    monkeypatch.setattr(journal_path, "_writable", lambda p: p != str(path))
    # a damaged file is named first: no permission change would make it usable
    with pytest.raises(JournalError, match="truncated"):
        journal_path.check_sqlite_path(str(path))
    path.unlink()
    make_journal(path)
    with pytest.raises(JournalError, match="app.db is read-only"):
        journal_path.check_sqlite_path(str(path))
    monkeypatch.undo()
    journal_path.check_sqlite_path(str(path))  # and as it really is: fine


def test_sqlites_own_open_errors_are_told_apart(tmp_path, monkeypatch):
    path = str(tmp_path / "app.db")
    make_journal(Path(path))
    cases = {
        "attempt to write a readonly database": "could not write it",
        "unable to open database file": "could not open it",
        "database or disk is full": "disk is full",
        "database is locked": "holds it locked",
        "database disk image is malformed": "is corrupt",
        "file is not a database": "is corrupt",
    }
    for text, words in cases.items():
        err = journal_path.open_error(path, sqlite3.OperationalError(text))
        assert isinstance(err, JournalError) and words in str(err) and path in str(err), text
    # the file system changed since the first look: the path's own reason wins
    monkeypatch.setattr(journal_path, "read_only_fs", lambda d: True)
    err = journal_path.open_error(path, sqlite3.OperationalError("unable to open database file"))
    assert "read-only file system" in str(err)


# ---- the owners' lock folder beside an SQLite journal ---------------------------------


def test_the_owners_lock_folder_is_accepted_and_a_bad_one_is_named(tmp_path, monkeypatch):
    path = tmp_path / "app.db"
    make_journal(path)
    owners = tmp_path / "app.db-owners"
    assert owners.is_dir()  # made by the flow's writer for its liveness lock
    assert list(owners.iterdir()) == []  # and its lock file gone with it
    journal_path.check_sqlite_path(str(path))
    make_journal(path)  # a second run on the same journal: the folder is reused
    monkeypatch.setattr(journal_path, "_writable", lambda p: p != str(owners))
    with pytest.raises(JournalError, match="app.db-owners is not writable") as err:
        journal_path.check_sqlite_path(str(path))
    assert "chmod u+rwx" in str(err.value)
    monkeypatch.undo()
    owners.rmdir()
    owners.write_text("in the way")
    for attempt in (
        lambda: RingKernelRuntime(journal=path),
        lambda: WorkflowEngine(None, str(path)),
    ):
        with pytest.raises(JournalError, match="app.db-owners is not a directory"):
            attempt()


def test_an_unwritable_owners_folder_is_refused_before_the_journal_is_written(tmp_path):
    wrap = as_unprivileged(tmp_path)
    make_journal(tmp_path / "app.db")
    owners = tmp_path / "app.db-owners"
    before = snapshot(tmp_path)
    owners.chmod(0o555)
    try:
        lines = probe(tmp_path / "app.db", wrap=wrap)
    finally:
        owners.chmod(0o755)
    refused(lines, "app.db-owners is not writable", "lock file")
    assert snapshot(tmp_path) == before


def look(path: Path, shell: str) -> subprocess.CompletedProcess[str]:
    """``pydotcompute flows path --json`` in a mount namespace prepared by ``shell``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pydotcompute", "flows", str(path), "--json"]
    wrap = ["unshare", "--user", "--map-root-user", "--mount"]
    return subprocess.run(
        [*wrap, "sh", "-c", f'{shell} && exec "$@"', "sh", *cmd],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip


def test_a_journal_on_a_read_only_file_system_can_still_be_looked_at(tmp_path):
    """The journal commands only read: the checks for writing do not stop them, and
    SQLite is told that the file cannot change (it could not make its -shm file there)."""
    why = namespaces("--user", "--map-root-user", "--mount")
    if why:
        pytest.skip(f"a read-only mount needs a user and mount namespace: {why}")
    import json

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    make_journal(mnt / "app.db")
    before = snapshot(mnt)
    ro = f"mount --bind {mnt} {mnt} && mount -o remount,bind,ro {mnt}"
    proc = look(mnt / "app.db", ro)
    assert proc.returncode == 0, proc.stderr
    [flow] = json.loads(proc.stdout)
    assert flow["flow"] == "t" and flow["items"]["done"] == 1
    assert snapshot(mnt) == before
    # Commits still in the log cannot be read there: said, never silently left out.
    keep = sqlite3.connect(mnt / "app.db", isolation_level=None)
    try:
        keep.execute("PRAGMA wal_autocheckpoint=0")
        keep.execute("UPDATE items SET submitted=submitted + 1")
        assert (mnt / "app.db-wal").stat().st_size > 0
        proc = look(mnt / "app.db", ro)
    finally:
        keep.close()
    assert proc.returncode == 1 and "app.db-wal" in proc.stderr and "copy" in proc.stderr
