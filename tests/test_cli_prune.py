"""``pydotcompute prune``: finished work pruned by age and count from a journal written by
real flows and workflows (SQLite and PostgreSQL), unfinished work left to finish, and
every refusal naming the journal and the fix."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
from typing import Any

import pytest

from pydotcompute import RingKernelRuntime
from pydotcompute.cli.journal import parse_age
from pydotcompute.coordinator import deploy, stage
from pydotcompute.coordinator.journal_reader import JournalReader
from tests.test_cli_journal import cli, expense, signoff, write_journal
from tests.test_coordinator_journal import tamper

DAY = 86400.0
OPEN = {"slow": False}  # whether the "slow" flow's stage may finish


async def waits(x: int) -> int:
    while not OPEN["slow"]:
        await asyncio.sleep(0.01)
    return x


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


async def write(where: str) -> None:
    """``etl`` (a, b, d done; c dead), workflows c1 (done) and c2 (waiting on a task), and
    flow ``slow`` whose item ``pending`` its process left unfinished; a, b, c and c1
    finished eight days ago."""
    await write_journal(where)
    OPEN["slow"] = False
    flow = await deploy(None, stage(waits), name="slow", journal=where)
    await flow.submit(1, key="pending")
    await flow.cancel("stopped", timeout=1)  # stays active in the journal
    for key in ("a", "b", "c"):
        tamper(
            where, "UPDATE items SET finished=finished-? WHERE flow='etl' AND key=?", 8 * DAY, key
        )
    tamper(where, "UPDATE workflows SET updated=updated-? WHERE key='c1'", 8 * DAY)


@pytest.fixture
def journal(journal_at: Any) -> str:
    where = journal_at("prune")
    asyncio.run(write(where))
    return where


def items(reader: JournalReader, flow: str) -> dict[str, str]:
    return {i.key: i.state for i in reader.items(flow)}


def test_prune_by_age_then_by_count_leaves_unfinished_work_to_finish(
    journal: str, capsys: Any
) -> None:
    code, out, _ = cli(capsys, "prune", journal, "--finished-before", "7d")
    assert code == 0, out
    assert "pruned 2 finished items and 1 finished workflows" in out
    assert "finished more than 7d00h ago" in out
    assert "untouched: 1 unfinished items, 1 running workflows" in out
    with JournalReader(journal) as reader:
        assert items(reader, "etl") == {"c": "dead", "d": "done"}  # dead letters wait
        assert [d.key for d in reader.dead_letters("etl")] == ["c"]
        assert items(reader, "slow") == {"pending": "active"}
        states = {w[0]: w[2] for w in reader.read("SELECT key, name, state FROM workflows")}
        assert states == {"c2": "running"}
        assert reader.read("SELECT count(*) FROM workflow_calls WHERE workflow='c1'")[0][0] == 0

    code, out, _ = cli(
        capsys, "prune", journal, "--keep", "0", "--flow", "etl", "--dead-letters", "--json"
    )
    assert code == 0, out
    with JournalReader(journal) as reader:
        where = reader.where  # a DSN without its password
    assert json.loads(out) == {
        "journal": where,
        "pruned": {"items": 2, "workflows": 0},
        "rule": {"finished_before_s": None, "keep": 0, "flow": "etl", "dead_letters": True},
        "left_unfinished": {"items": 0, "workflows": None},
    }
    with JournalReader(journal) as reader:
        assert items(reader, "etl") == {} and reader.dead_letters("etl") == []
        [pending] = reader.items("slow")
        assert pending.state == "active" and len(pending.tokens) == 1

    # What was unfinished still finishes: the stopped flow's item and the workflow.
    async def finish() -> None:
        OPEN["slow"] = True
        async with await deploy(None, stage(waits), name="slow", journal=journal) as flow:
            assert await flow.result("pending", timeout=30) == 1
        async with RingKernelRuntime(journal=journal) as rt:
            assert await rt.resume_workflows(expense) == ["c2"]
            code, out, _ = await asyncio.to_thread(
                cli, capsys, "answer", journal, "approval", "c2/1", '"approved"', "--as-is"
            )
            assert code == 0, out
            while not rt.pending_tasks(signoff):
                await asyncio.sleep(0.01)
            [item] = rt.pending_tasks(signoff)
            code, out, _ = await asyncio.to_thread(
                cli, capsys, "answer", journal, signoff.name, item.key, '{"decision": "approve"}'
            )
            assert code == 0, out
            assert await rt.workflow_result("c2", timeout=30) == "approved; approved c2"

    asyncio.run(finish())
    code, out, _ = cli(capsys, "prune", journal, "--finished-before", "0", "--json")
    assert json.loads(out)["pruned"] == {"items": 1, "workflows": 1}  # now they may go


def test_prune_refusals_name_the_journal_and_the_fix(
    tmp_path: pathlib.Path, capsys: Any, postgres_dsn: str
) -> None:
    missing = str(tmp_path / "nothing.db")
    code, _, err = cli(capsys, "prune", missing, "--finished-before", "7d")
    assert code == 1 and f"no journal at {missing}" in err and "check the path" in err
    assert not os.path.exists(missing)
    path = str(tmp_path / "app.db")
    asyncio.run(write_journal(path))
    code, _, err = cli(capsys, "prune", path)
    assert code == 1 and "--finished-before AGE, --keep N" in err
    assert f"pydotcompute prune {path} --finished-before 7d" in err
    code, _, err = cli(capsys, "prune", path, "--keep", "1", "--flow", "nope")
    assert code == 1 and "has no flow 'nope' (its flows: 'etl')" in err
    code, _, err = cli(capsys, "prune", path + "-owners", "--keep", "1")
    assert code == 1 and "is a directory, not a journal" in err and f"pass {path}" in err
    code, _, err = cli(capsys, "prune", postgres_dsn, "--keep", "1")
    assert code == 1 and "holds no journal" in err
    for bad in (["--finished-before", "7x"], ["--finished-before", "-1"], ["--keep", "-2"]):
        with pytest.raises(SystemExit) as exited:
            cli(capsys, "prune", path, *bad)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "is not an age" in err or "is not a count" in err, err
    with JournalReader(path) as reader:  # nothing was pruned by any of them
        assert len(reader.items("etl")) == 4


def test_ages_are_written_as_people_write_them() -> None:
    assert parse_age("7d") == 7 * DAY
    assert parse_age("1d12h") == 1.5 * DAY
    assert parse_age("2w") == 14 * DAY
    assert parse_age("90m") == 5400 and parse_age("45s") == 45 and parse_age("0.5h") == 1800
    assert parse_age("3600") == 3600 and parse_age("0") == 0
    for bad in ("", "d", "7 d", "7days", "-1", "-1d", "1d-2h", "inf", "nan"):
        with pytest.raises(Exception, match="is not an age"):
            parse_age(bad)
