"""What only the PostgreSQL journal has: its DSN, its optional driver, its schema checks.

Everything a journal does is tested on both engines in the journal, crash and workflow
tests (``journal_at``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pydotcompute import RingKernelRuntime
from pydotcompute.coordinator import FanIn, FanOut, PostgresJournal, SQLiteJournal, deploy, stage
from pydotcompute.coordinator.journal import open_journal
from pydotcompute.errors import JournalError, JournalUnavailableError
from pydotcompute.workflows import WorkflowEngine, task, workflow

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_package_and_naming_a_dsn_does_not_import_psycopg():
    code = (
        "import sys, pydotcompute\n"
        "from pydotcompute.coordinator import deploy\n"
        "from pydotcompute.coordinator.journal import open_journal\n"
        "open_journal('postgresql://u@h/db')\n"
        "assert 'psycopg' not in sys.modules, 'psycopg imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


async def test_a_dsn_without_psycopg_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
    with pytest.raises(JournalError, match=r'pip install "pydotcompute\[postgres\]"'):
        await deploy(None, stage(lambda x: x), name="f", journal="postgresql://u@127.0.0.1/db")


def test_dsn_strings_and_configs_are_normalised_and_passwords_stay_hidden():
    j = open_journal("postgresql://app:s3cret@db.example:5432/jobs?sslmode=require")
    assert isinstance(j, PostgresJournal) and j.lease == 30.0
    assert "s3cret" not in repr(j) and "db.example" in repr(j)
    assert isinstance(open_journal("postgres://h/db"), PostgresJournal)
    assert isinstance(open_journal("jobs.db"), SQLiteJournal)
    cfg = PostgresJournal("postgresql://h/db", lease=5, poll=0.1)
    assert open_journal(cfg) is cfg
    with pytest.raises(JournalError, match="postgresql://"):
        PostgresJournal("jobs.db")


async def test_an_unreachable_server_is_waited_for_then_named_without_the_password(caplog):
    dsn = "postgresql://app:s3cret@127.0.0.1:1/jobs?connect_timeout=2"
    t0 = time.monotonic()
    with pytest.raises(JournalUnavailableError, match="could not be reached") as err:
        await deploy(
            None, stage(lambda x: x), name="f", journal=PostgresJournal(dsn, reconnect_timeout=1)
        )
    assert time.monotonic() - t0 >= 1.0  # tried for the whole reconnect_timeout
    text = str(err.value)
    assert "127.0.0.1:1/jobs" in text and "s3cret" not in text
    assert "deploy the flow again" in text and "reconnect_timeout" in text
    tries = [r for r in caplog.records if r.name == "pydotcompute.coordinator.journal"]
    assert len(tries) >= 3 and all("s3cret" not in r.getMessage() for r in tries)


async def test_a_server_that_refuses_the_connection_for_good_is_not_waited_for(postgres_dsn):
    """Up, but no such database: trying again for reconnect_timeout would not help."""
    missing = postgres_dsn.split("?")[0].rsplit("/", 1)[0] + "/no_such_database"
    t0 = time.monotonic()
    with pytest.raises(JournalError, match="does not exist") as err:
        await deploy(None, stage(lambda x: x), name="f", journal=missing)
    assert not isinstance(err.value, JournalUnavailableError)
    assert time.monotonic() - t0 < 30


async def test_a_schema_with_other_tables_of_the_same_names_is_left_alone(postgres_dsn):
    import psycopg

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE tokens(id int)")
    with pytest.raises(JournalError, match=r"not a journal.*left untouched"):
        await deploy(None, stage(lambda x: x), name="f", journal=postgres_dsn)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema=current_schema()"
        ).fetchall()
    assert tables == [("tokens",)]


def parse(x: int) -> int:
    return x


def square(x: int) -> int:
    return x * x


def negate(x: int) -> int:
    return -x


async def test_flows_of_two_runtimes_share_one_database(postgres_dsn):
    """Two runtimes on one DSN (as two hosts would be): each takes part of the items,
    every join completes and every key is done once."""
    graph = stage(parse) >> FanOut(square, negate, mode="broadcast") >> FanIn(sum)
    journal = PostgresJournal(postgres_dsn, lease=5, poll=0.01)
    async with (
        RingKernelRuntime(journal=journal) as a,
        RingKernelRuntime(journal=postgres_dsn) as b,
    ):
        fa = await a.deploy(graph, name="g")
        fb = await b.deploy(graph, name="g")
        await fa.submit_many(range(400), keys=[str(i) for i in range(400)])
        await fb.drain(timeout=60)
        await fa.drain(timeout=60)
        assert fa.status() == {"done": 400}
        done = [kv async for kv in fb.results()]
        assert sorted(int(k) for k, _ in done) == list(range(400))
        assert all(v == int(k) ** 2 - int(k) for k, v in done)
        assert fa.counters()["completed"] > 0 and fb.counters()["completed"] > 0
        assert fa.journal.read("SELECT count(*) FROM tokens") == [(0,)]


@task
def sign_off(request: str, answer: str) -> str:
    return f"{request}: {answer}"


@workflow(name="pg-sign-off")
async def needs_sign_off(what: str, ctx: Any) -> str:
    return await ctx.call(sign_off, what)


async def test_two_answers_to_one_task_at_the_same_time_only_one_is_taken(postgres_dsn):
    """Two engines (as two hosts) answer one pending task at once: one answer counts."""
    import psycopg

    async with WorkflowEngine(None, postgres_dsn) as a, WorkflowEngine(None, postgres_dsn) as b:
        await a.start(needs_sign_off, "desk", key="d")
        deadline = time.monotonic() + 10
        while not a.pending(sign_off):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        with psycopg.connect(postgres_dsn) as hold:  # holds the row: both answers queue up
            hold.execute("SELECT 1 FROM workflow_calls WHERE task_key='d/0' FOR UPDATE")
            answers = [
                asyncio.create_task(a.complete(sign_off, "d/0", "yes")),
                asyncio.create_task(b.complete(sign_off, "d/0", "no")),
            ]
            await asyncio.sleep(0.5)  # both found it waiting and wait on the lock
            assert not any(t.done() for t in answers)
            hold.rollback()
        assert sorted(await asyncio.gather(*answers)) == [False, True]
        assert await a.result("d", timeout=10) in ("desk: yes", "desk: no")


def close_from_the_server(dsn: str, conn: Any) -> int:
    """Have the server end ``conn``'s session (as a restart or failover would); its pid."""
    import psycopg

    pid = conn.raw.info.backend_pid
    with psycopg.connect(dsn, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
    return pid


async def test_reads_survive_the_server_closing_the_reader(postgres_dsn):
    """A server restart or an idle timeout closes connections; reads reconnect once."""

    async with await deploy(None, stage(lambda x: x + 1), name="f", journal=postgres_dsn) as flow:
        await flow.submit(1, key="one")
        assert await flow.result("one", timeout=10) == 2
        pid = close_from_the_server(postgres_dsn, flow.journal._reader)
        assert [kv async for kv in flow.results()] == [("one", 2)]
        assert flow.journal._reader.raw.info.backend_pid != pid
        # The writer was not touched: the flow goes on.
        await flow.submit(2, key="two")
        assert await flow.result("two", timeout=10) == 3


async def test_a_writer_whose_server_closed_the_connection_reconnects(postgres_dsn):

    async with await deploy(None, stage(lambda x: x + 1), name="f", journal=postgres_dsn) as flow:
        await flow.submit(1, key="one")
        assert await flow.result("one", timeout=10) == 2
        pid = close_from_the_server(postgres_dsn, flow.journal._writer)
        # The next transaction finds the connection gone, reconnects and runs again.
        await flow.submit(2, key="two")
        assert await flow.result("two", timeout=10) == 3
        assert flow.journal._writer.raw.info.backend_pid != pid
        assert [kv async for kv in flow.results()] == [("one", 2), ("two", 3)]


async def test_a_commit_whose_answer_was_lost_is_looked_up_not_guessed(postgres_dsn):
    """The connection goes while COMMIT is on its way: the server is asked (by the
    transaction's id) whether it committed. Committed: the results stand and the batch is
    not run again; not committed: it runs again. Either way the flow goes on."""
    import psycopg

    async with await deploy(None, stage(lambda x: x + 1), name="f", journal=postgres_dsn) as flow:
        dialect = flow.journal.dialect
        commit = dialect.commit

        def committed_then_lost(conn: Any) -> None:
            dialect.commit = commit
            commit(conn)
            conn.raw.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

        def lost_before_commit(conn: Any) -> None:
            dialect.commit = commit
            conn.raw.close()
            commit(conn)

        dialect.commit = committed_then_lost
        assert await flow.submit_many([1, 2], keys=["one", "two"]) == ["one", "two"]
        assert flow.counters()["submitted"] == 2  # the results of the committed batch
        dialect.commit = lost_before_commit
        await flow.submit(3, key="three")
        assert flow.counters()["submitted"] == 3  # run again, and counted once
        assert [await flow.result(k, timeout=10) for k in ("one", "two", "three")] == [2, 3, 4]
        assert flow.status() == {"done": 3}


async def test_a_writer_that_keeps_losing_its_server_gives_up_after_reconnect_timeout(
    postgres_dsn,
):
    journal = PostgresJournal(postgres_dsn, reconnect_timeout=1.0)
    async with await deploy(None, stage(lambda x: x + 1), name="f", journal=journal) as flow:
        dialect = flow.journal.dialect
        begin = dialect.try_begin

        def begin_on_a_lost_connection(conn: Any) -> float:
            conn.raw.close()
            return begin(conn)

        dialect.try_begin = begin_on_a_lost_connection
        with pytest.raises(JournalUnavailableError, match="could not be reached"):
            await flow.submit(1, key="one")
        dialect.try_begin = begin
        # The flow has stopped, saying why; its journal is intact and a new deploy resumes.
        with pytest.raises(JournalError, match="stopped: journal .* could not be reached"):
            await flow.submit(2, key="two")
    async with await deploy(None, stage(lambda x: x + 1), name="f", journal=journal) as flow:
        await flow.submit(2, key="two")
        assert await flow.result("two", timeout=10) == 3
        assert flow.status() == {"done": 1}  # "one" never reached the journal


async def test_a_writer_that_cannot_reconnect_yet_keeps_trying_its_batch(postgres_dsn, caplog):
    async with await deploy(None, stage(lambda x: x + 1), name="f", journal=postgres_dsn) as flow:
        dialect = flow.journal.dialect
        close_from_the_server(postgres_dsn, flow.journal._writer)
        dsn, dialect.dsn = dialect.dsn, "postgresql://app:s3cret@127.0.0.1:1/x?connect_timeout=2"
        submitted = asyncio.create_task(flow.submit(1, key="one"))
        await asyncio.sleep(1.0)
        assert not submitted.done()  # waiting for the server, not failed
        dialect.dsn = dsn  # the server is back
        assert await submitted == "one"
        assert await flow.result("one", timeout=10) == 2
    tries = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(tries) >= 2 and not any("s3cret" in t for t in tries)


async def test_a_read_with_the_server_gone_past_reconnect_timeout_is_a_journal_error(
    postgres_dsn,
):
    async with await deploy(None, stage(lambda x: x), name="f", journal=postgres_dsn) as flow:
        reader = flow.journal._reader
        close_from_the_server(postgres_dsn, reader)
        dialect = flow.journal.dialect
        dsn, dialect.dsn = dialect.dsn, "postgresql://app:s3cret@127.0.0.1:1/x?connect_timeout=2"
        dialect.reconnect_timeout = 0.5
        with pytest.raises(JournalUnavailableError, match="could not be reached") as err:
            flow.dead_letters()
        assert "s3cret" not in str(err.value)
        assert flow.journal._reader is reader  # kept, so the next read tries again
        dialect.dsn = dsn
        assert flow.dead_letters() == []
