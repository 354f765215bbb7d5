"""The journal commands: look at durable work and repair it without writing SQL.

``flows``, ``items``, ``dead-letters``, ``workflows``, ``workflow`` and ``tasks`` only
read (an SQLite journal is opened read-only; a missing path is an error, never a new
journal). ``retry``, ``cancel`` and ``answer`` change the journal through the same ops
the API uses (``Flow.retry``'s, and ``WorkflowEngine.complete``), so their guarantees
hold: nothing runs twice, and an item a live process holds is left alone unless
``--force``. ``prune`` removes finished work by age or count (``prune_journal``), never
what is unfinished. Every command takes an SQLite path or a ``postgresql://`` DSN,
prints a table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pydotcompute.cli import journal_records as rec
from pydotcompute.cli.fit import Column, fit_table
from pydotcompute.coordinator.journal_reader import JournalReader
from pydotcompute.errors import InvalidConfigurationError, JournalError, PyDotComputeError
from pydotcompute.workflows.store import count_workflows

__all__ = ["register"]

JOURNAL_HELP = "the journal: an SQLite file path or a postgresql:// DSN"


def register(sub: Any) -> None:
    """Add the journal commands to the ``pydotcompute`` command's subparsers."""
    for name, help_text, example, arguments, run in VERBS:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog="example:\n" + "\n".join(f"  {line}" for line in example),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("journal", metavar="JOURNAL", help=JOURNAL_HELP)
        arguments(p)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(run=_guarded(run))


def _guarded(run: Callable[[argparse.Namespace, Console], int]) -> Callable[..., int]:
    def main(args: argparse.Namespace, *, console: Console | None = None) -> int:
        console = console or Console(highlight=False)
        try:
            return run(args, console)
        except PyDotComputeError as exc:
            err = Console(stderr=True, highlight=False)
            err.print(f"[red]error:[/red] {escape(str(exc))}")
            return 1

    return main


# ---- formatting -----------------------------------------------------------------------
def _when(ts: float | None) -> str:
    return "–" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(title: str, columns: list[tuple[str, str]], rows: list[list[str]]) -> Table:
    """A table that fits the terminal: text columns (``"t"``) fold, number columns
    (``"n"``) never narrow below their widest value; the last text columns are dropped
    when even that does not fit."""
    cols = [
        Column(name, number=kind == "n", drop=i if kind == "t" and i > 1 else 0)
        for i, (name, kind) in enumerate(columns)
    ]
    width = Console().width
    return fit_table(
        cols,
        rows,
        width,
        title=title,
        title_justify="left",
        highlight=False,
        box=box.SIMPLE_HEAD,
        caption=None if rows else "none",
    )


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _reader(args: argparse.Namespace) -> JournalReader:
    return JournalReader(args.journal)


# ---- flows, items, dead letters ----------------------------------------------------------
def _flows_args(p: argparse.ArgumentParser) -> None:
    pass


def _flows(args: argparse.Namespace, console: Console) -> int:
    with _reader(args) as reader:
        flows = rec.flow_records(reader)
        where = reader.where
    if args.json:
        _print_json(flows)
        return 0
    filtered = any(f["items"].get("filtered") for f in flows)  # a column only when used
    rows = []
    for f in flows:
        items = f["items"]
        oldest = (
            f"{f['oldest_active']} ({_age(f['oldest_active_age_s'])})"
            if f["oldest_active"] is not None
            else "–"
        )
        procs = ", ".join(f"{p['pid']}@{p['host']}" for p in f["processes"]) or "–"
        rows.append(
            [
                f["flow"],
                f"{', '.join(f['stages'])} ({len(f['stages'])})",
                str(items["active"]),
                str(items["done"]),
                str(items["dead"]),
                str(items["cancelled"]),
                *([str(items.get("filtered", 0))] if filtered else []),
                str(f["dead_letters"]),
                oldest,
                procs,
            ]
        )
    columns = [
        ("flow", "t"),
        ("stages (hops)", "t"),
        ("active", "n"),
        ("done", "n"),
        ("dead", "n"),
        ("cancelled", "n"),
        *([("filtered", "n")] if filtered else []),
        ("dead letters", "n"),
        ("oldest unfinished", "t"),
        ("processes", "t"),
    ]
    console.print(_table(f"flows in {where}", columns, rows))
    return 0


def _items_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("flow", metavar="FLOW", help="the flow's name (see `pydotcompute flows`)")
    p.add_argument(
        "--status",
        action="append",
        choices=rec.ITEM_STATES,
        help="only items in this state (repeat for several)",
    )
    p.add_argument("--key", action="append", help="only this item (repeat for several)")
    p.add_argument(
        "--limit", type=int, default=1000, help="at most this many items (default 1000; 0: all)"
    )


def _items(args: argparse.Namespace, console: Console) -> int:
    with _reader(args) as reader:
        items = rec.item_records(
            reader, args.flow, args.status, args.key, args.limit if args.limit > 0 else None
        )
    if args.json:
        _print_json(items)
        return 0
    rows = []
    for it in items:
        at = []
        for t in it["at"]:
            where = t["stage"] + (f" (part {t['join_part']})" if t["join_part"] else "")
            if t["running"]:
                where += " running"
            elif t["retry_in_s"] is not None:
                where += f" retry in {_age(t['retry_in_s'])}"
            at.append(where)
        attempts = max((t["attempts"] for t in it["at"]), default=0)
        rows.append(
            [
                it["key"],
                it["state"],
                _when(it["submitted"]),
                _when(it["finished"]),
                ", ".join(at) or "–",
                str(attempts),
            ]
        )
    columns = [
        ("key", "t"),
        ("state", "t"),
        ("submitted", "n"),
        ("finished", "n"),
        ("at", "t"),
        ("failed attempts", "n"),
    ]
    console.print(_table(f"items of {args.flow}", columns, rows))
    if args.limit > 0 and len(items) == args.limit:
        console.print(f"(the first {args.limit}; --limit 0 lists all)")
    return 0


def _dead_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("flow", metavar="FLOW", nargs="?", help="only this flow's dead letters")
    p.add_argument(
        "--show", metavar="KEY", help="print this item's stored traceback and input in full"
    )


def _dead_letters(args: argparse.Namespace, console: Console) -> int:
    with _reader(args) as reader:
        records = rec.dead_letter_records(reader, args.flow, args.show, full=bool(args.show))
        where = reader.where
    if args.show and not records:
        raise JournalError(
            f"journal {where} has no dead letter for item {args.show!r}"
            + (f" of flow {args.flow!r}" if args.flow else "")
            + ": list them with `pydotcompute dead-letters JOURNAL`"
        )
    if args.json:
        _print_json(records)
        return 0
    if args.show:
        for d in records:
            console.print(
                f"[bold]{escape(d['flow'])} / {escape(d['key'])}[/bold] failed at stage "
                f"{escape(d['stage'])} after {d['attempts']} attempt(s), {_when(d['failed_at'])}"
            )
            console.print("[dim]input:[/dim] " + escape(str(d["input"])))
            console.print("[dim]traceback:[/dim]")
            console.print(escape(d["traceback"].rstrip()), soft_wrap=True)
            console.print()
        return 0
    rows = [
        [d["flow"], d["key"], d["stage"], str(d["attempts"]), _when(d["failed_at"]), d["error"]]
        for d in records
    ]
    columns = [
        ("flow", "t"),
        ("key", "t"),
        ("stage", "t"),
        ("attempts", "n"),
        ("failed at", "n"),
        ("error", "t"),
    ]
    console.print(_table(f"dead letters in {where}", columns, rows))
    return 0


# ---- retry, cancel -------------------------------------------------------------------
def _retry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("flow", metavar="FLOW", help="the flow's name")
    p.add_argument("keys", metavar="KEY", nargs="*", help="items to retry")
    p.add_argument("--all-dead", action="store_true", help="retry every dead item of the flow")
    p.add_argument(
        "--force",
        action="store_true",
        help="retry even while a live process holds a lease on part of the item",
    )


def _outcomes(outcomes: list[Any], args: argparse.Namespace, console: Console) -> int:
    if args.json:
        _print_json(
            [
                {
                    "key": o.key,
                    "changed": o.changed,
                    "detail": o.detail,
                    "held_by": [
                        {"stage": h.stage, "host": h.host, "pid": h.pid, "owner": h.owner}
                        for h in o.held
                    ],
                }
                for o in outcomes
            ]
        )
    else:
        for o in outcomes:
            mark = "[green]ok[/green]  " if o.changed else "[red]not[/red] "
            console.print(f"{mark}{escape(o.key)}: {escape(o.detail)}")
        if any(o.held and not o.changed for o in outcomes):
            console.print("(--force takes an item from the process that holds it)")
    return 0 if outcomes and all(o.changed for o in outcomes) else 1


def _retry(args: argparse.Namespace, console: Console) -> int:
    from pydotcompute.coordinator.journal_repair import retry_items

    if bool(args.keys) == bool(args.all_dead):
        raise InvalidConfigurationError("give the keys of the items to retry, or --all-dead")
    outcomes = asyncio.run(
        retry_items(args.journal, args.flow, None if args.all_dead else args.keys, force=args.force)
    )
    if not outcomes and not args.json:
        console.print(f"flow {args.flow!r} has no dead items")
        return 0
    return _outcomes(outcomes, args, console)


def _cancel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("flow", metavar="FLOW", help="the flow's name")
    p.add_argument("keys", metavar="KEY", nargs="+", help="items to cancel")
    p.add_argument(
        "--force",
        action="store_true",
        help="cancel even an item a live process is running (it then writes nothing more)",
    )


def _cancel(args: argparse.Namespace, console: Console) -> int:
    from pydotcompute.coordinator.journal_repair import cancel_items

    outcomes = asyncio.run(cancel_items(args.journal, args.flow, args.keys, force=args.force))
    return _outcomes(outcomes, args, console)


# ---- prune ---------------------------------------------------------------------------
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
AGE_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_age(text: str) -> float:
    """Seconds of an age written ``7d``, ``12h``, ``30m``, ``45s``, ``2w``, a sum of those
    (``1d12h``) or a bare number of seconds."""
    t = text.strip().lower()
    try:
        value = float(t)
    except ValueError:
        parts = AGE_PART.findall(t)
        if not t or "".join(n + u for n, u in parts) != t:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an age: write it as 7d, 12h, 30m, 45s or 2w, a sum such "
                "as 1d12h, or a number of seconds"
            ) from None
        return sum(float(n) * AGE_UNITS[u] for n, u in parts)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an age: it must be 0 or more")
    return value


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: give a whole number >= 0")
    return n


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--finished-before",
        metavar="AGE",
        type=parse_age,
        help="prune what finished more than AGE ago: 7d, 12h, 30m, 45s, 2w, 1d12h",
    )
    p.add_argument(
        "--keep",
        metavar="N",
        type=_count,
        help="always keep the newest N finished items of each flow, and N workflows",
    )
    p.add_argument(
        "--flow",
        metavar="FLOW",
        help="only this flow's items (workflows are then left alone)",
    )
    p.add_argument(
        "--dead-letters",
        action="store_true",
        help="also prune dead-lettered items with their dead letters (kept by default)",
    )


def _prune(args: argparse.Namespace, console: Console) -> int:
    from pydotcompute.coordinator.retention import prune_journal

    if args.finished_before is None and args.keep is None:
        raise InvalidConfigurationError(
            "prune needs --finished-before AGE, --keep N or both, e.g. "
            f"`pydotcompute prune {args.journal} --finished-before 7d`"
        )
    # Checked read-only first: a wrong path is never made into a new journal, and an
    # unknown flow is named with the flows there are.
    with _reader(args) as reader:
        if args.flow is not None:
            reader.node_names(args.flow)
        config = reader.journal
    pruned = prune_journal(
        config,
        older_than=args.finished_before,
        keep=args.keep,
        flow=args.flow,
        workflows=args.flow is None,
        dead_letters=args.dead_letters,
    )
    with _reader(args) as reader:
        flows = [f for f in reader.flows() if args.flow is None or f.name == args.flow]
        active = sum(f.items.get("active", 0) for f in flows)
        running = (
            count_workflows(reader.read, "running")
            if args.flow is None and reader.has_table("workflows")
            else None
        )
    rule = {
        "finished_before_s": args.finished_before,
        "keep": args.keep,
        "flow": args.flow,
        "dead_letters": args.dead_letters,
    }
    if args.json:
        _print_json(
            {
                "journal": config.where,
                "pruned": {"items": pruned.items, "workflows": pruned.workflows},
                "rule": rule,
                "left_unfinished": {"items": active, "workflows": running},
            }
        )
        return 0
    what = []
    if args.finished_before is not None:
        what.append(f"finished more than {_age(args.finished_before)} ago")
    if args.keep is not None:
        what.append(f"beyond the newest {args.keep}")
    scope = f"flow {args.flow}" if args.flow is not None else "every flow and workflow"
    console.print(
        f"pruned {pruned.items} finished items"
        + ("" if args.flow is not None else f" and {pruned.workflows} finished workflows")
        + f" from {escape(config.where)} ({escape(scope)}: {' and '.join(what)}"
        + (", dead-lettered items included" if args.dead_letters else "")
        + ")",
        soft_wrap=True,
    )
    console.print(
        f"untouched: {active} unfinished items"
        + ("" if running is None else f", {running} running workflows"),
        soft_wrap=True,
    )
    return 0


# ---- workflows, tasks ------------------------------------------------------------------
def _workflows_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state",
        action="append",
        choices=rec.WORKFLOW_STATES,
        help="only workflows in this state (repeat for several)",
    )
    p.add_argument(
        "--limit", type=int, default=1000, help="at most this many (default 1000; 0: all)"
    )


def _workflows(args: argparse.Namespace, console: Console) -> int:
    with _reader(args) as reader:
        wfs = rec.workflow_records(reader, args.state, args.limit if args.limit > 0 else None)
        where = reader.where
    if args.json:
        _print_json(wfs)
        return 0
    rows = [
        [
            w["key"],
            w["workflow"],
            w["state"],
            str(w["calls"]),
            w["step"] or "–",
            _when(w["created"]),
            _age(w["age_s"]),
            w["error"] or "",
        ]
        for w in wfs
    ]
    columns = [
        ("key", "t"),
        ("workflow", "t"),
        ("state", "t"),
        ("calls", "n"),
        ("last step", "t"),
        ("started", "n"),
        ("age", "n"),
        ("error", "t"),
    ]
    console.print(_table(f"workflows in {where}", columns, rows))
    return 0


def _workflow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("key", metavar="KEY", help="the workflow's key")


def _workflow(args: argparse.Namespace, console: Console) -> int:
    with _reader(args) as reader:
        wf = rec.workflow_detail(reader, args.key)
    if args.json:
        _print_json(wf)
        return 0
    console.print(
        f"[bold]{escape(wf['key'])}[/bold] ({escape(wf['workflow'])}): {wf['state']}, "
        f"{wf['calls']} call(s), started {_when(wf['created'])}, "
        f"last change {_when(wf['updated'])}"
    )
    if wf["parent"]:
        console.print(f"called by workflow {escape(wf['parent'])}")
    console.print("[dim]input:[/dim] " + escape(str(wf["input"])))
    if wf["state"] == "done":
        console.print("[dim]result:[/dim] " + escape(str(wf["result"])))
    elif wf["error"]:
        console.print("[dim]error:[/dim] " + escape(wf["error"]))
    start = wf["created"]
    rows = []
    for s in wf["steps"]:
        outcome = s["result"] if s["state"] == "done" else s["error"] or s["state"]
        if s["task_key"] and s["state"] == "waiting":
            outcome = f"waiting for an answer to task item {s['task_key']}"
        rows.append(
            [
                str(s["pos"]),
                s["kind"],
                s["step"],
                s["args"],
                s["state"],
                str(outcome if outcome is not None else ""),
                f"+{_age(s['started'] - start)}",
                _age(s["took_s"]),
            ]
        )
    columns = [
        ("#", "n"),
        ("kind", "t"),
        ("step", "t"),
        ("arguments", "t"),
        ("state", "t"),
        ("result or error", "t"),
        ("at", "n"),
        ("took", "n"),
    ]
    console.print(_table("steps", columns, rows))
    return 0


def _tasks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", metavar="NAME", help="only items of this task")


def _tasks(args: argparse.Namespace, console: Console) -> int:
    with _reader(args) as reader:
        tasks = rec.task_records(reader, args.task)
        where = reader.where
    if args.json:
        _print_json(tasks)
        return 0
    rows = [
        [t["task"], t["key"], t["workflow"], str(t["request"]), _age(t["age_s"])] for t in tasks
    ]
    columns = [("task", "t"), ("key", "t"), ("workflow", "t"), ("request", "t"), ("waiting", "n")]
    console.print(_table(f"tasks waiting for an answer in {where}", columns, rows))
    return 0


def _answer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", metavar="TASK", help="the task's name, as `pydotcompute tasks` lists it")
    p.add_argument("key", metavar="KEY", help="the task item's key")
    p.add_argument("answer", metavar="JSON", help="the answer, as JSON (quote it in the shell)")
    p.add_argument(
        "--from",
        dest="source",
        metavar="MODULE_OR_FILE",
        help="the module or .py file declaring the task (its function checks the answer)",
    )
    p.add_argument(
        "--as-is",
        action="store_true",
        help="for a task declared without a function: the answer is its result, unchecked",
    )


def _answer(args: argparse.Namespace, console: Console) -> int:
    from pydotcompute.workflows.engine import WorkflowEngine, find_task
    from pydotcompute.workflows.steps import Task

    try:
        answer = json.loads(args.answer)
    except json.JSONDecodeError as exc:
        raise InvalidConfigurationError(
            f"the answer is not JSON ({exc}): quote it in the shell, e.g. "
            """'{"decision": "approve"}'"""
        ) from None
    if args.as_is:
        task = Task(None, name=args.task)
    else:
        try:
            task = find_task(args.task, args.source)
        except InvalidConfigurationError as exc:
            raise InvalidConfigurationError(
                f"{exc} (--from MODULE_OR_FILE names where the task is declared; --as-is "
                "takes the answer as the result of a task declared without a function)"
            ) from None
    with _reader(args) as reader:  # checked read-only first: never makes a new journal
        pending = rec.task_records(reader, args.task)
        config = reader.journal
    if not any(t["key"] == args.key for t in pending):
        raise JournalError(
            f"task {args.task!r} has no item {args.key!r} waiting for an answer in "
            f"{config.where} (unknown, answered already, or its workflow ended): "
            f"see `pydotcompute tasks {config.where}`"
        )

    async def complete() -> bool:
        async with WorkflowEngine(None, config) as engine:
            return await engine.complete(task, args.key, answer)

    try:
        done = asyncio.run(complete())
    except PyDotComputeError:
        raise
    except Exception as exc:  # the task's own function refused the answer
        raise InvalidConfigurationError(
            f"task {args.task!r} refused the answer: {type(exc).__name__}: {exc}"
        ) from exc
    if args.json:
        _print_json({"task": args.task, "key": args.key, "answered": done})
    elif done:
        console.print(f"[green]ok[/green]  answered {escape(args.key)}; its workflow goes on")
    else:
        console.print(f"[red]not[/red] {escape(args.key)}: another answer came first")
    return 0 if done else 1


# (name, help, example lines, arguments, run)
VERBS: list[
    tuple[
        str,
        str,
        list[str],
        Callable[[argparse.ArgumentParser], None],
        Callable[[argparse.Namespace, Console], int],
    ]
] = [
    (
        "flows",
        "list the flows of a journal: items by state, dead letters, the oldest unfinished",
        ["pydotcompute flows app.db", "pydotcompute flows postgresql://me@db/jobs --json"],
        _flows_args,
        _flows,
    ),
    (
        "items",
        "list a flow's items with their state and the stage where each waits",
        [
            "pydotcompute items app.db etl --status active --status dead",
            "pydotcompute items app.db etl --key line-7",
        ],
        _items_args,
        _items,
    ),
    (
        "dead-letters",
        "list dead letters (stage, attempts, the error's last line), or show one in full",
        [
            "pydotcompute dead-letters app.db etl",
            "pydotcompute dead-letters app.db etl --show line-7",
        ],
        _dead_args,
        _dead_letters,
    ),
    (
        "retry",
        "send dead-lettered items back to the stage that failed, with fresh attempts",
        ["pydotcompute retry app.db etl line-7 line-9", "pydotcompute retry app.db etl --all-dead"],
        _retry_args,
        _retry,
    ),
    (
        "cancel",
        "cancel unfinished items: their pending work and dead letters go",
        ["pydotcompute cancel app.db etl line-7", "pydotcompute cancel app.db etl line-7 --force"],
        _cancel_args,
        _cancel,
    ),
    (
        "prune",
        "prune finished items and workflows by age or count; unfinished work is never touched",
        [
            "pydotcompute prune app.db --finished-before 7d",
            "pydotcompute prune postgresql://me@db/jobs --finished-before 12h --keep 1000 "
            "--flow etl --dead-letters",
        ],
        _prune_args,
        _prune,
    ),
    (
        "workflows",
        "list the workflows of a journal with their state and last step",
        ["pydotcompute workflows app.db --state running --state failed"],
        _workflows_args,
        _workflows,
    ),
    (
        "workflow",
        "show one workflow: its steps with arguments, results and timings",
        ["pydotcompute workflow app.db claim-42"],
        _workflow_args,
        _workflow,
    ),
    (
        "tasks",
        "list task items waiting for an answer",
        ["pydotcompute tasks app.db", "pydotcompute tasks app.db --task expenses:approval"],
        _tasks_args,
        _tasks,
    ),
    (
        "answer",
        "answer a waiting task item; its workflow goes on",
        [
            """pydotcompute answer app.db expenses:approval c2/1 '{"decision": "approve", "by": "ada"}'""",
            """pydotcompute answer app.db __main__:approval c2/1 '{"decision": "approve", "by": "ada"}' --from examples/approval_server.py""",
        ],
        _answer_args,
        _answer,
    ),
]
