"""kill -9 in the middle of durable workflows: committed calls never run again, on
SQLite and on PostgreSQL."""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import pathlib
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "crash" / "workflow_calls.py"
N = 3  # workflows per run, five calls each
sys.path.insert(0, str(SCRIPT.parent))
from workflow_calls import expected  # noqa: E402


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_journal(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> Iterator[Callable[[], str]]:
    """Makes an empty journal each call: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        numbers = itertools.count()
        yield lambda: str(tmp_path / f"j{next(numbers)}.db")
        return
    from tests import postgres_server as pg

    server = request.getfixturevalue("postgres_server")
    with contextlib.ExitStack() as schemas:
        yield lambda: schemas.enter_context(pg.fresh_schema(server))


def spawn(journal: str, log: pathlib.Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), journal, str(log), str(N), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def lines(log: pathlib.Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


DONE_CALLS = "SELECT workflow, pos FROM workflow_calls WHERE state='done'"


def committed(journal: str) -> set[tuple[str, int]]:
    if journal.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(journal, autocommit=True) as pg:
            try:
                return {tuple(row) for row in pg.execute(DONE_CALLS)}  # type: ignore[misc]
            except psycopg.errors.UndefinedTable:  # the child has not made the tables yet
                return set()
    if not os.path.exists(journal):
        return set()
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)  # never creates the file
    try:
        return set(conn.execute(DONE_CALLS))
    except sqlite3.OperationalError:  # the child has not made the tables yet
        return set()
    finally:
        conn.close()


def kill_when(proc: subprocess.Popen[str], ready: object, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not ready():  # type: ignore[operator]
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the child never got there"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def finish(journal: str, log: pathlib.Path) -> list[int]:
    proc = spawn(journal, log)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out)


def test_kill_at_random_points_never_reruns_committed_calls(
    tmp_path: pathlib.Path, fresh_journal: Callable[[], str]
) -> None:
    rng = random.Random(7)
    mid_run = 0
    for run in range(10):
        journal, log = fresh_journal(), tmp_path / f"log{run}"
        target = rng.randint(1, 5 * N - 2)  # activity runs started before the kill
        proc = spawn(journal, log)
        kill_when(proc, lambda log=log, target=target: len(lines(log)) >= target)
        time.sleep(rng.uniform(0, 0.006))
        before = committed(journal)
        mid_run += len(before) < 5 * N
        assert finish(journal, log) == [expected(j) for j in range(N)]
        runs = collections.Counter(tuple(line.split()) for line in lines(log))
        for key, pos in before:
            assert runs[(key, str(pos))] == 1, f"run {run}: committed {key}#{pos} ran again"
        assert set(runs) == {(f"w{j}", str(p)) for j in range(N) for p in range(5)}
    assert mid_run >= 8  # the kills landed while calls were still to be made


def test_all_completes_after_a_crash_between_its_calls(
    tmp_path: pathlib.Path, fresh_journal: Callable[[], str]
) -> None:
    journal, log = fresh_journal(), tmp_path / "log"
    proc = spawn(journal, log, "3")  # call #3, the second call of ctx.all, hangs
    kill_when(proc, lambda: ("w0", 2) in committed(journal) and "w0 3" in lines(log))
    assert ("w0", 3) not in committed(journal)
    assert finish(journal, log) == [expected(j) for j in range(N)]
    runs = collections.Counter(lines(log))
    assert runs["w0 2"] == 1  # the committed half of ctx.all was not run again
    assert runs["w0 3"] == 2  # the half that was cut off ran once more
