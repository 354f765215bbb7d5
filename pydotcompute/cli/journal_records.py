"""What a journal holds, as plain JSON-ready records: the journal commands print them
as tables (or as JSON with ``--json``) and the dashboard's pages show the same ones.

Stored values (item inputs, workflow arguments and results) are pickles behind a
checksum (``coordinator.records``): they are decoded here only to be shown, and one that
cannot be decoded in this process (damaged, or its class is not importable here) is
shown as such instead of failing the whole listing. Decoding
a pickle can run code: point these tools only at journals you trust, as the flows that
wrote them do.
"""

from __future__ import annotations

from typing import Any

from pydotcompute.coordinator.journal_reader import JournalReader
from pydotcompute.coordinator.records import decode
from pydotcompute.errors import JournalError
from pydotcompute.workflows.store import (
    STATES as WORKFLOW_STATES,
)
from pydotcompute.workflows.store import (
    read_calls,
    read_pending_tasks,
    read_workflow,
    read_workflows,
)

__all__ = [
    "ITEM_STATES",
    "WORKFLOW_STATES",
    "dead_letter_records",
    "flow_detail",
    "flow_records",
    "item_records",
    "shown",
    "task_records",
    "workflow_detail",
    "workflow_records",
]

ITEM_STATES = ("active", "done", "dead", "cancelled", "filtered")
# Counted in every flow's listing; other states (``filtered``) only where items have them.
COUNTED_STATES = ITEM_STATES[:4]
SHOWN_CHARS = 300  # a value's repr is cut after this many characters in listings


def shown(blob: bytes | None, limit: int | None = SHOWN_CHARS) -> str | None:
    """A stored value as text (its ``repr``), or why it cannot be shown here."""
    if blob is None:
        return None
    try:
        value = decode(blob)  # as the journal's writers stored it: checksum, then pickle
    except JournalError as exc:  # damaged, or its class is not importable here
        return f"<{len(blob)} bytes that cannot be decoded here: {exc}>"
    text = repr(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return text


def _decoded(blob: bytes | None) -> tuple[bool, Any]:
    if blob is None:
        return True, None
    try:
        return True, decode(blob)
    except JournalError as exc:
        return False, f"<cannot be decoded here: {exc}>"


def first_line(text: str | None) -> str:
    """An error's text in one line: ``ValueError: bad input``, with ``…`` when its
    message goes on over more lines."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0].strip() + (" …" if len(lines) > 1 else "")


def _since(now: float, then: float | None) -> float | None:
    return None if then is None else max(0.0, now - then)


# ---- flows --------------------------------------------------------------------------
def flow_records(reader: JournalReader) -> list[dict[str, Any]]:
    """Each flow: stages, items by state, dead letters, the oldest unfinished item."""
    now = reader.now()
    out = []
    for f in reader.flows():
        out.append(
            {
                "flow": f.name,
                "stages": f.stages,
                "created": f.created,
                "items": {s: f.items.get(s, 0) for s in COUNTED_STATES}
                | {s: n for s, n in f.items.items() if s not in COUNTED_STATES},
                "dead_letters": f.dead_letters,
                "oldest_active": f.oldest_active,
                "oldest_active_age_s": _since(now, f.oldest_active_since),
                "processes": [
                    {"host": h, "pid": p, "seen_ago_s": _since(now, seen)}
                    for h, p, seen in f.processes
                ],
            }
        )
    return out


DEAD_SHOWN = 500  # dead letters a flow's page shows in full (the newest)


def flow_detail(reader: JournalReader, flow: str) -> dict[str, Any]:
    """One flow: its summary, what waits at each stage, and its dead letters in full
    (traceback and input; the newest ``DEAD_SHOWN``)."""
    summary = next((f for f in flow_records(reader) if f["flow"] == flow), None)
    if summary is None:
        reader.node_names(flow)  # raises, naming the flows there are
        raise JournalError(f"journal {reader.where} has no flow {flow!r}")
    summary["stage_counts"] = [
        {
            "stage": s.stage,
            "node": s.node,
            "waiting": s.waiting,
            "running": s.running,
            "retrying": s.retrying,
            "join_parts": s.join_parts,
            "dead_letters": s.dead_letters,
        }
        for s in reader.stages(flow)
    ]
    summary["dead"] = dead_letter_records(reader, flow, full=True, newest=DEAD_SHOWN)
    return summary


def item_records(
    reader: JournalReader,
    flow: str,
    states: list[str] | None = None,
    keys: list[str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Items of a flow in submission order, with the stages where active ones wait."""
    now = reader.now()
    out = []
    for item in reader.items(flow, states, keys, limit):
        out.append(
            {
                "key": item.key,
                "state": item.state,
                "submitted": item.submitted,
                "finished": item.finished,
                "age_s": _since(now, item.submitted),
                "at": [
                    {
                        "stage": t.stage,
                        "join_part": t.port or None,
                        "attempts": t.failures,
                        "running": t.owner is not None and t.lease_until >= now,
                        "retry_in_s": t.not_before - now if t.not_before > now else None,
                    }
                    for t in item.tokens
                ],
            }
        )
    return out


def dead_letter_records(
    reader: JournalReader,
    flow: str | None = None,
    key: str | None = None,
    *,
    full: bool = False,
    newest: int | None = None,
) -> list[dict[str, Any]]:
    """Dead letters, oldest first: stage, attempts, the error in one line; ``full`` adds
    the stored traceback and the input the stage had; ``newest``: only that many."""
    out = []
    rows = reader.dead_letters(flow, key)
    for d in rows[-newest:] if newest else rows:
        rec: dict[str, Any] = {
            "flow": d.flow,
            "key": d.key,
            "stage": d.stage,
            "attempts": d.attempts,
            "failed_at": d.failed_at,
            "error": first_line(d.error),
        }
        if full:
            rec["traceback"] = d.traceback
            rec["input"] = shown(d.value, None)
        out.append(rec)
    return out


# ---- workflows ----------------------------------------------------------------------
def _has_workflows(reader: JournalReader) -> bool:
    return reader.has_table("workflows")


def workflow_records(
    reader: JournalReader, states: list[str] | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Workflows, oldest first: state, calls recorded, last step, error."""
    if not _has_workflows(reader):
        return []
    now = reader.now()
    return [
        {
            "key": key,
            "workflow": name,
            "state": state,
            "calls": int(calls),
            "step": step,
            "error": first_line(error) or None,
            "parent": parent,
            "created": float(created),
            "updated": float(updated),
            "age_s": _since(now, float(created)),
        }
        for key, name, state, calls, step, error, parent, created, updated in read_workflows(
            reader.read, states, limit
        )
    ]


def _call_args(blob: bytes) -> str:
    ok, value = _decoded(blob)
    if not ok:
        return str(value)
    try:
        args, kwargs = value
        parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    except (TypeError, ValueError):
        return repr(value)
    text = ", ".join(parts)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


def workflow_detail(reader: JournalReader, key: str) -> dict[str, Any]:
    """One workflow with its calls in order: each call's step, arguments, result or
    error, when it started and how long it took (tasks: how long the answer took)."""
    row = read_workflow(reader.read, key) if _has_workflows(reader) else None
    if row is None:
        raise JournalError(
            f"journal {reader.where} has no workflow {key!r}: list them with "
            f"`pydotcompute workflows {reader.where}`"
        )
    k, name, state, calls, step, error, parent, created, updated, blob, result = row
    rec: dict[str, Any] = {
        "key": k,
        "workflow": name,
        "state": state,
        "calls": int(calls),
        "step": step,
        "error": error,
        "parent": parent,
        "created": float(created),
        "updated": float(updated),
        "input": shown(blob, None),
        # A failed workflow's result column holds its pickled exception.
        "result": shown(result, None) if state == "done" else None,
        "steps": [],
    }
    for pos, kind, cstep, args, cstate, cres, cerr, task_key, started, finished in read_calls(
        reader.read, key
    ):
        rec["steps"].append(
            {
                "pos": int(pos),
                "kind": kind,
                "step": cstep,
                "args": _call_args(args),
                "state": cstate,
                "result": shown(cres) if cstate == "done" else None,
                "error": first_line(cerr) or None,
                "task_key": task_key,
                "started": float(started),
                "finished": None if finished is None else float(finished),
                "took_s": None if finished is None else max(0.0, float(finished) - float(started)),
            }
        )
    return rec


def task_records(reader: JournalReader, task: str | None = None) -> list[dict[str, Any]]:
    """Task items waiting for an answer in running workflows, oldest first."""
    if not _has_workflows(reader):
        return []
    now = reader.now()
    out = []
    for task_key, step, wf, args, created in read_pending_tasks(reader.read, task):
        ok, value = _decoded(args)
        request: Any = value
        if ok:
            try:
                request = repr(value[0][0])
            except (TypeError, IndexError, KeyError):
                request = repr(value)
        out.append(
            {
                "task": step,
                "key": task_key,
                "workflow": wf,
                "request": request,
                "waiting_since": float(created),
                "age_s": _since(now, float(created)),
            }
        )
    return out
