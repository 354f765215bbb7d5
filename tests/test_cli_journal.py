"""The journal commands, on journals written by real flows and workflows (SQLite and
PostgreSQL): listing, dead letters, retry, cancel with a live lease holder, answers."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from pydotcompute import RingKernelRuntime
from pydotcompute.cli.main import main
from pydotcompute.coordinator import deploy, stage
from pydotcompute.coordinator.journal_reader import JournalReader
from pydotcompute.errors import FlowClosedError
from pydotcompute.workflows import activity, task, workflow

ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse(text: str) -> int:
    if text == "bad":
        raise ValueError(f"cannot parse {text!r}\nsecond line of the message")
    return int(text)


def double(x: int) -> int:
    return 2 * x


@activity
async def check(claim: dict) -> dict:
    return {**claim, "big": claim["amount"] > 100}


approval = task("approval")  # no function: the answer is the result


@task
def signoff(claim: dict, answer: dict) -> str:
    """A task whose function checks the answer."""
    if answer.get("decision") not in ("approve", "reject"):
        raise ValueError("decision must be approve or reject")
    return f"{answer['decision']}d {claim['id']}"


@workflow(name="expense")
async def expense(claim: dict, ctx: Any) -> str:
    claim = await ctx.call(check, claim)
    if not claim["big"]:
        return f"auto {claim['id']}"
    verdict = await ctx.call(approval, claim)
    signed = await ctx.call(signoff, claim)
    return f"{verdict}; {signed}"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


async def write_journal(path: str) -> None:
    """A flow with done and dead items, a finished workflow and one waiting on a task."""
    async with RingKernelRuntime(journal=path) as rt:
        flow = await rt.deploy(stage(parse, retries=2, backoff=0.001) >> stage(double), name="etl")
        await flow.submit_many(["1", "2", "bad", "4"], keys=["a", "b", "c", "d"])
        await flow.drain(timeout=30)
        for claim in ({"id": "c1", "amount": 5}, {"id": "c2", "amount": 500}):
            await rt.start_workflow(expense, claim, key=claim["id"])
        assert await rt.workflow_result("c1", timeout=30) == "auto c1"
        while not rt.pending_tasks(approval):
            await asyncio.sleep(0.01)


@pytest.fixture
def journal(journal_at: Any) -> str:
    where = journal_at("ops")
    asyncio.run(write_journal(where))
    return where


def test_flows_lists_items_by_state_and_dead_letters(journal: str, capsys: Any) -> None:
    code, out, _ = cli(capsys, "flows", journal)
    assert code == 0
    assert "etl" in out and "parse, double (2)" in out
    code, out, _ = cli(capsys, "flows", journal, "--json")
    [etl] = [f for f in json.loads(out) if f["flow"] == "etl"]
    assert etl["items"] == {"active": 0, "done": 3, "dead": 1, "cancelled": 0}
    assert etl["dead_letters"] == 1
    assert etl["stages"] == ["parse", "double"]
    assert etl["oldest_active"] is None


def test_items_filter_by_state_and_key(journal: str, capsys: Any) -> None:
    code, out, _ = cli(capsys, "items", journal, "etl", "--status", "dead", "--json")
    assert code == 0
    assert [i["key"] for i in json.loads(out)] == ["c"]
    code, out, _ = cli(capsys, "items", journal, "etl", "--key", "a", "--key", "d", "--json")
    assert [(i["key"], i["state"]) for i in json.loads(out)] == [("a", "done"), ("d", "done")]
    code, out, _ = cli(capsys, "items", journal, "etl")
    assert code == 0 and "dead" in out and "done" in out


def test_dead_letters_list_and_show(journal: str, capsys: Any) -> None:
    code, out, _ = cli(capsys, "dead-letters", journal)
    assert code == 0
    assert "ValueError: cannot parse 'bad' …" in out
    assert "second line" not in out  # the listing shows one line per error
    code, out, _ = cli(capsys, "dead-letters", journal, "etl", "--json")
    [rec] = json.loads(out)
    assert (rec["key"], rec["stage"], rec["attempts"]) == ("c", "parse", 2)
    code, out, _ = cli(capsys, "dead-letters", journal, "etl", "--show", "c")
    assert code == 0
    assert "input: 'bad'" in out
    assert "Traceback (most recent call last)" in out and "second line of the message" in out
    assert 'raise ValueError(f"cannot parse' in out
    code, _, err = cli(capsys, "dead-letters", journal, "etl", "--show", "a")
    assert code == 1 and "no dead letter for item 'a'" in err


def test_retry_sends_a_dead_item_back_and_it_finishes(journal: str, capsys: Any) -> None:
    code, out, _ = cli(capsys, "retry", journal, "etl", "c", "a", "zz")
    assert code == 1  # not every key could be retried
    assert "ok  c: re-queued at parse" in out
    assert "a: no dead letters (it is done)" in out and "zz: no such item" in out
    code, out, _ = cli(capsys, "retry", journal, "etl", "c")
    assert code == 1 and "no dead letters (it is active)" in out  # never re-queued twice
    code, out, _ = cli(capsys, "flows", journal, "--json")
    [etl] = [f for f in json.loads(out) if f["flow"] == "etl"]
    assert etl["oldest_active"] == "c" and etl["oldest_active_age_s"] >= 0
    code, out, _ = cli(capsys, "items", journal, "etl", "--key", "c", "--json")
    [item] = json.loads(out)
    assert item["state"] == "active" and [t["stage"] for t in item["at"]] == ["parse"]

    async def finish() -> Any:
        # The flow's own process picks the retried item up; parse now fails again, so
        # the item is dead again, with a fresh record of two attempts.
        async with await deploy(
            None,
            stage(parse, retries=2, backoff=0.001) >> stage(double),
            name="etl",
            journal=journal,
        ) as flow:
            await flow.drain(timeout=30)
            return flow.status(), flow.counters()["retried"]

    status, retried = asyncio.run(finish())
    assert status == {"done": 3, "dead": 1}
    assert retried == 1  # the retried item ran parse twice more
    code, out, _ = cli(capsys, "retry", journal, "etl", "--all-dead", "--json")
    assert code == 0 and [o["key"] for o in json.loads(out)] == ["c"]


def test_cancel_an_item_and_result_raises(journal: str, capsys: Any) -> None:
    code, out, _ = cli(capsys, "cancel", journal, "etl", "c", "a")
    assert code == 1
    assert "ok  c: cancelled" in out and "a: it finished already" in out
    with JournalReader(journal) as reader:
        assert reader.dead_letters("etl") == []  # its dead letters went with it
    code, out, _ = cli(capsys, "items", journal, "etl", "--status", "cancelled", "--json")
    assert [i["key"] for i in json.loads(out)] == ["c"]

    async def result() -> None:
        async with await deploy(
            None, stage(parse) >> stage(double), name="etl", journal=journal
        ) as flow:
            with pytest.raises(FlowClosedError, match="cancelled"):
                await flow.result("c", timeout=10)
            await flow.drain(timeout=10)  # a cancelled item is not waited for

    asyncio.run(result())


def test_workflows_workflow_and_tasks(journal: str, capsys: Any) -> None:
    code, out, _ = cli(capsys, "workflows", journal, "--json")
    assert code == 0
    states = {w["key"]: w["state"] for w in json.loads(out)}
    assert states == {"c1": "done", "c2": "running"}
    code, out, _ = cli(capsys, "workflows", journal, "--state", "running")
    # Keys are read from the table's rows: the title line holds the journal's
    # name, which for PostgreSQL carries a random schema that may contain "c1".
    keys = [line.split()[0] for line in out.splitlines() if line.startswith("  c")]
    assert keys == ["c2"], out
    code, out, _ = cli(capsys, "workflow", journal, "c1", "--json")
    wf = json.loads(out)
    assert wf["result"] == "'auto c1'"
    [step] = wf["steps"]
    assert step["kind"] == "activity" and step["state"] == "done"
    assert "'amount': 5" in step["args"] and "'big': False" in step["result"]
    assert step["took_s"] is not None and step["took_s"] >= 0
    code, out, _ = cli(capsys, "workflow", journal, "c2")
    assert "waiting for an answer to task item c2/1" in out
    code, out, _ = cli(capsys, "tasks", journal, "--json")
    [pending] = json.loads(out)
    assert (pending["task"], pending["key"], pending["workflow"]) == ("approval", "c2/1", "c2")
    assert "'amount': 500" in pending["request"]
    code, _, err = cli(capsys, "workflow", journal, "nope")
    assert code == 1 and "no workflow 'nope'" in err


async def test_answer_goes_through_the_engine_and_the_workflow_goes_on(
    journal: str, capsys: Any
) -> None:
    def run(*args: str) -> tuple[int, str, str]:
        return cli(capsys, *args)

    async with RingKernelRuntime(journal=journal) as rt:
        assert await rt.resume_workflows(expense) == ["c2"]  # waits on its task again
        # A task without a function needs --as-is: the CLI cannot know there is none.
        code, _, err = await asyncio.to_thread(run, "answer", journal, "approval", "c2/1", '"ok"')
        assert code == 1 and "--as-is" in err
        code, out, _ = await asyncio.to_thread(
            run, "answer", journal, "approval", "c2/1", '"approved"', "--as-is"
        )
        assert code == 0, out
        code, out, _ = await asyncio.to_thread(
            run, "answer", journal, "approval", "c2/1", '"again"', "--as-is"
        )
        assert code == 1  # answered already
        while not rt.pending_tasks(signoff):
            await asyncio.sleep(0.01)
        [item] = rt.pending_tasks(signoff)
        # The task's own function checks the answer, found by the name the journal has.
        code, _, err = await asyncio.to_thread(
            run, "answer", journal, signoff.name, item.key, '{"decision": "maybe"}'
        )
        assert code == 1 and "refused the answer: ValueError" in err
        code, _, err = await asyncio.to_thread(
            run, "answer", journal, signoff.name, item.key, "{not json"
        )
        assert code == 1 and "not JSON" in err
        code, out, _ = await asyncio.to_thread(
            run, "answer", journal, signoff.name, item.key, '{"decision": "approve"}'
        )
        assert code == 0, out
        assert await rt.workflow_result("c2", timeout=30) == "approved; approved c2"


def test_answer_finds_a_task_of_a_script_by_its_file(tmp_path: pathlib.Path) -> None:
    from pydotcompute.workflows.engine import find_task

    script = tmp_path / "claims.py"
    script.write_text(
        textwrap.dedent(
            """
            from pydotcompute.workflows import task

            @task
            def approval(request, answer):
                return f"{answer} for {request}"

            if __name__ == "__main__":
                raise SystemExit("the main part must not run when the file is loaded")
            """
        )
    )
    found = find_task("__main__:approval", str(script))
    assert found.name == "__main__:approval"
    assert found.accept("claim", "yes") == "yes for claim"
    with pytest.raises(Exception, match="declares no task named '__main__:other'"):
        find_task("__main__:other", str(script))
    with pytest.raises(Exception, match="script run as the main program"):
        find_task("__main__:approval")


def test_errors_name_the_path_and_the_fix(tmp_path: pathlib.Path, capsys: Any) -> None:
    missing = str(tmp_path / "nothing.db")
    code, _, err = cli(capsys, "flows", missing)
    assert code == 1 and missing in err and "check the path" in err
    assert not os.path.exists(missing)  # never created by a look
    code, _, err = cli(capsys, "retry", missing, "etl", "k")
    assert code == 1 and "no journal at" in err and not os.path.exists(missing)
    other = tmp_path / "notes.txt"
    other.write_text("not a database, just notes\n" * 20)
    code, _, err = cli(capsys, "flows", str(other))
    assert code == 1 and "not a journal" in err
    code, _, err = cli(capsys, "retry", missing, "etl")
    assert code == 1 and "--all-dead" in err


def test_postgres_dsn_without_a_journal_is_refused(postgres_dsn: str, capsys: Any) -> None:
    code, _, err = cli(capsys, "flows", postgres_dsn)
    assert code == 1 and "holds no journal" in err and "search_path" in err


def test_every_command_has_help_with_an_example(capsys: Any) -> None:
    from pydotcompute.cli.journal import VERBS

    for name, *_ in VERBS:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert "example:" in out and f"pydotcompute {name} " in out
        assert "JOURNAL" in out and "--json" in out


HOLDER = """
import asyncio, os, sys
from pydotcompute.coordinator import FanIn, FanOut, deploy, stage

release = sys.argv[2]

def fail_fast(x):
    raise RuntimeError("branch a fails")

async def slow(x):
    while not os.path.exists(release):
        await asyncio.sleep(0.02)
    return x

def merge(parts):
    return parts

async def main():
    graph = FanOut(stage(fail_fast), stage(slow), mode="broadcast") >> FanIn(merge)
    async with await deploy(None, graph, name="held", journal=sys.argv[1]) as flow:
        await flow.submit("v", key="x")
        while not os.path.exists(release):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # let the slow hop try to commit
        print("counters", flow.counters(), flow.status(), flush=True)

asyncio.run(main())
"""


def test_retry_and_cancel_refuse_an_item_a_live_process_holds(
    journal_at: Any, tmp_path: pathlib.Path, capsys: Any
) -> None:
    journal = journal_at("held")
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    release = tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), journal, str(release)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # until branch a is dead and branch b is leased by the process
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the item never reached the slow stage"
            try:
                with JournalReader(journal) as reader:
                    [item] = reader.items("held") or [None]
                    if item is not None and item.state == "dead" and item.tokens:
                        if item.tokens[0].owner and reader.dead_letters("held"):
                            break
            except Exception as exc:  # the journal may not exist yet
                if "no journal" not in str(exc) and "no flow" not in str(exc):
                    raise
            time.sleep(0.05)
        code, out, _ = cli(capsys, "retry", journal, "held", "x")
        assert code == 1
        assert f"process {proc.pid} on {socket.gethostname()}" in out, out
        assert "--force" in out
        code, out, _ = cli(capsys, "cancel", journal, "held", "x", "--json")
        [outcome] = json.loads(out)
        assert code == 1 and not outcome["changed"]
        assert outcome["held_by"][0]["pid"] == proc.pid
        assert outcome["held_by"][0]["stage"] == "slow"
        code, out, _ = cli(capsys, "cancel", journal, "held", "x", "--force")
        assert code == 0 and "cancelled (taken from process" in out
        release.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    # The process's hop found its token gone: it wrote nothing and counted a lost lease.
    assert "'lost_leases': 1" in out and "'cancelled': 1" in out, out
    with JournalReader(journal) as reader:
        [item] = reader.items("held")
        assert item.state == "cancelled" and item.tokens == []
        assert reader.read("SELECT count(*) FROM results WHERE flow='held'")[0][0] == 0


def test_a_lease_of_a_dead_process_does_not_hold_an_item(journal_at: Any, capsys: Any) -> None:
    """Who holds an item is judged by the owners' liveness locks (not a host and pid):
    a live holder is named; once it is killed, its lease (30 s more) no longer counts,
    and looking at it leaves its lock file for the flows' reaper."""
    from tests.test_coordinator_journal import start_holder

    journal = journal_at("dead-holder")
    proc = start_holder(journal, lease=30.0)  # holds item "five" of flow "g" at "slow"
    try:
        with JournalReader(journal) as reader:
            [held] = reader.holders("g", ["five"])
            assert held.pid == proc.pid and held.stage == "slow"
            owner = held.owner
    finally:
        proc.kill()
        proc.wait()
    lock = pathlib.Path(f"{journal}-owners") / owner
    deadline = time.monotonic() + 10
    with JournalReader(journal) as reader:
        while reader.holders("g", ["five"]):  # PostgreSQL: until the server sees it gone
            assert time.monotonic() < deadline, "a killed process still holds the item"
            time.sleep(0.05)
        [token] = reader.items("g", keys=["five"])[0].tokens
        assert token.owner == owner and token.lease_until > time.time() + 10
    if not journal.startswith("postgresql://"):
        assert lock.exists()  # looked at, not taken: the reaper's to remove
    code, out, _ = cli(capsys, "cancel", journal, "g", "five")
    assert code == 0 and "cancelled" in out and "taken from" not in out, out


def test_a_look_is_not_confused_by_the_owners_folder_or_a_missing_directory(
    tmp_path: pathlib.Path, capsys: Any
) -> None:
    path = str(tmp_path / "app.db")
    asyncio.run(write_journal(path))
    assert os.path.isdir(path + "-owners")  # the writers' liveness locks, beside it
    code, out, _ = cli(capsys, "flows", path)
    assert code == 0 and "etl" in out
    code, _, err = cli(capsys, "flows", path + "-owners")
    assert code == 1 and "is a directory, not a journal" in err and f"pass {path}" in err
    code, _, err = cli(capsys, "items", str(tmp_path), "etl")
    assert code == 1 and "is a directory, not a journal" in err
    missing = tmp_path / "no" / "such" / "app.db"
    code, _, err = cli(capsys, "flows", str(missing))
    # A look says there is no journal; it does not advise making the directory.
    assert code == 1 and "no journal at" in err and "mkdir" not in err, err
    assert not (tmp_path / "no").exists()


async def test_a_repair_session_that_reconnects_does_not_become_an_owner(journal: str) -> None:
    """After an outage the writer rejoins on a new connection; a flow's session then
    takes its liveness lock and owners row again, but an operator's repair session holds
    no items: were it listed, flows would later say they took over from it."""
    from pydotcompute.coordinator.journal_repair import RepairSession

    with JournalReader(journal) as reader:
        config = reader.journal
        before = reader.read("SELECT owner FROM owners ORDER BY owner")
    session = RepairSession(config, "etl")
    await session.open()
    try:
        fresh = await session._off_loop(session._rejoin)  # what a reconnect runs
        fresh.close()
    finally:
        await session.close()
    with JournalReader(journal) as reader:
        assert reader.read("SELECT owner FROM owners ORDER BY owner") == before
