"""The dashboard's drill-down pages and actions: what ``/api/view/...`` and
``POST /api/action/...`` answer (see ``telemetry.server.DashboardViews``).

``RuntimeViews`` serves a runtime's own dashboard: its kernels (configuration, state,
error with its traceback, restarts), the flows deployed on it and the flows and
workflows of its journal. ``JournalViews`` serves a journal alone, for
``pydotcompute dashboard URL --journal PATH``. Both show the records the journal
commands print (``journal_records``) and act through the same code paths as the API:
a retry is ``Flow.retry`` for a flow deployed in this process, else the journal's
``retry_items``; an answer is ``WorkflowEngine.complete``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import traceback
from collections.abc import Mapping
from typing import Any

import numpy as np

from pydotcompute.cli import journal_records as rec
from pydotcompute.coordinator.journal import JournalConfig, open_journal
from pydotcompute.coordinator.journal_reader import JournalReader
from pydotcompute.errors import InvalidConfigurationError, JournalError, KernelNotFoundError

__all__ = ["JournalViews", "RuntimeViews"]

# Fields a supervised kernel's telemetry may carry beside ``restarts``; shown first on
# the kernel page when present. The snapshot's other fields are shown as they are.
SUPERVISION_FIELDS = (
    "restarts",
    "last_error",
    "last_failure_at",
    "last_restart_at",
    "restart_policy",
    "supervisor",
)


def _plain(value: Any) -> Any:
    """A configuration or telemetry value as JSON can carry it."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        return f"array{value.shape} of {value.dtype}"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    name = getattr(value, "name", None)  # enums
    if isinstance(name, str) and type(value).__module__ != "builtins":
        return name
    return repr(value)


def _type_name(t: Any) -> str | None:
    if t is None:
        return None
    return getattr(t, "__qualname__", None) or repr(t)


def _error_record(exc: BaseException | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def _form_keys(form: Mapping[str, Any]) -> list[str] | None:
    """The keys a retry names: ``key``, ``keys`` or ``all`` (None: every dead item)."""
    if form.get("all"):
        return None
    keys = form.get("keys")
    if keys is None and form.get("key") is not None:
        keys = [form["key"]]
    if not keys or not all(isinstance(k, str) for k in keys):
        raise InvalidConfigurationError("a retry names its items: key, keys or all")
    return list(keys)


def _outcome(o: Any) -> dict[str, Any]:
    return {"key": o.key, "changed": o.changed, "detail": o.detail}


class _JournalPages:
    """Reads journals for the pages, one read-only reader per journal, opened on use."""

    def __init__(self) -> None:
        self._readers: dict[str, JournalReader] = {}
        self._lock = threading.Lock()

    def reader(self, journal: Any) -> JournalReader:
        cfg = open_journal(journal)
        if cfg is None:
            raise JournalError("this dashboard has no journal")
        with self._lock:
            r = self._readers.get(cfg.where)
            if r is None:
                r = self._readers[cfg.where] = JournalReader(cfg)
            return r

    def close(self) -> None:
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers.clear()

    @staticmethod
    def _state(query: Mapping[str, str]) -> list[str] | None:
        state = query.get("state")
        if not state:
            return None
        states = state.split(",")
        bad = [s for s in states if s not in rec.WORKFLOW_STATES]
        if bad:
            raise InvalidConfigurationError(f"workflow state is one of {rec.WORKFLOW_STATES}")
        return states

    def journal_view(self, journal: Any, what: str, query: Mapping[str, str]) -> Any:
        """A page that only reads the journal (blocking: call it off the event loop)."""
        reader = self.reader(journal)
        if what == "flows":
            return rec.flow_records(reader)
        if what == "flow":
            try:
                return rec.flow_detail(reader, _need(query, "name"))
            except JournalError as exc:
                if "has no flow" in str(exc):
                    raise LookupError(str(exc)) from None
                raise
        if what == "workflows":
            return rec.workflow_records(reader, self._state(query), 1000)
        if what == "workflow":
            try:
                return rec.workflow_detail(reader, _need(query, "key"))
            except JournalError as exc:
                raise LookupError(str(exc)) from None
        if what == "tasks":
            return rec.task_records(reader, query.get("task") or None)
        raise LookupError(f"no page {what!r}")


def _need(query: Mapping[str, Any], name: str) -> Any:
    value = query.get(name)
    if value is None or value == "":
        raise InvalidConfigurationError(f"missing {name!r}")
    return value


async def _answer(engine: Any, task: Any, key: str, answer: Any) -> dict[str, Any]:
    try:
        done = await engine.complete(task, key, answer)
    except (InvalidConfigurationError, JournalError):
        raise
    except Exception as exc:  # the task's function refused the answer
        raise InvalidConfigurationError(
            f"task {task.name!r} refused the answer: {type(exc).__name__}: {exc}"
        ) from exc
    if not done:
        raise LookupError(
            f"task {task.name!r} has no item {key!r} waiting for an answer "
            "(answered already, or its workflow ended)"
        )
    return {"task": task.name, "key": key, "answered": True}


def _task_of(form: Mapping[str, Any], find: Any) -> Any:
    from pydotcompute.workflows.steps import Task

    name = _need(form, "task")
    return Task(None, name=name) if form.get("as_is") else find(name)


class RuntimeViews(_JournalPages):
    """The drill-down pages of one runtime (build it on the runtime's event loop)."""

    def __init__(self, runtime: Any) -> None:
        super().__init__()
        self.runtime = runtime
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None

    def info(self) -> dict[str, Any]:
        journal = open_journal(self.runtime.journal)
        return {
            "kernels": True,
            "journal": None if journal is None else journal.where,
            "workflows": journal is not None,
        }

    # ---- pages ----------------------------------------------------------------------
    def get(self, what: str, query: Mapping[str, str]) -> Any:
        if what == "kernel":
            return self._kernel(_need(query, "id"))
        if what == "flows":
            return self._flows()
        if what == "flow":
            return self._flow(_need(query, "name"))
        if what in ("workflows", "workflow", "tasks"):
            journal = self.runtime.journal
            if journal is None:
                if what == "workflows" or what == "tasks":
                    return []
                raise LookupError("this runtime has no journal, so no workflows")
            return asyncio.to_thread(self.journal_view, journal, what, query)
        raise LookupError(f"no page {what!r}")

    def _kernel(self, kid: str) -> dict[str, Any]:
        rt = self.runtime
        try:
            t = rt.get_telemetry(kid)
            spec = rt.get_kernel_spec(kid)
            error = rt.get_error(kid)
        except KernelNotFoundError as exc:
            raise LookupError(str(exc)) from None
        snapshot = {
            f.name: _plain(getattr(t, f.name))
            for f in dataclasses.fields(t)
            if f.name != "latency_buckets"
        }
        placement = rt.get_placement(kid)
        if placement is not None:
            placement = (
                _plain(dataclasses.asdict(placement))
                if dataclasses.is_dataclass(placement) and not isinstance(placement, type)
                else repr(placement)
            )
        return {
            "kernel": kid,
            "state": t.state,
            "backend": t.backend,
            "handler": getattr(spec.func, "__qualname__", repr(spec.func)),
            "module": getattr(spec.func, "__module__", None),
            "input_type": _type_name(spec.input_type),
            "output_type": _type_name(spec.output_type),
            "config": {
                f.name: _plain(getattr(spec.config, f.name))
                for f in dataclasses.fields(spec.config)
            },
            "supervision": {n: snapshot[n] for n in SUPERVISION_FIELDS if n in snapshot},
            "telemetry": snapshot,
            "error": _error_record(error),
            "placement": placement,
        }

    def _journals(self) -> list[Any]:
        """The journals this runtime's flows and workflows use, each once."""
        seen: dict[str, Any] = {}
        for j in [self.runtime.journal, *(f.journal.journal for f in self._local() if f.journal)]:
            cfg = open_journal(j)
            if cfg is not None:
                seen.setdefault(cfg.where, cfg)
        return list(seen.values())

    def _local(self) -> list[Any]:
        return list(self.runtime.flows.values())

    async def _flows(self) -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for cfg in self._journals():
            try:
                rows = await asyncio.to_thread(self.journal_view, cfg, "flows", {})
            except JournalError as exc:
                if "no journal at" in str(exc):
                    continue  # nothing written there yet
                raise
            for row in rows:
                row["journal"] = cfg.where
                out.setdefault(row["flow"], row)
        for flow in self._local():
            row = out.setdefault(flow.name, {"flow": flow.name, "items": flow.status()})
            row["deployed_here"] = True
            row["durable"] = flow.journal is not None
            row["counters"] = flow.counters()
        return sorted(out.values(), key=lambda r: r["flow"])

    async def _flow(self, name: str) -> dict[str, Any]:
        flow = self.runtime.flows.get(name)
        if flow is not None and flow.journal is None:
            dead = flow.dead_letters()
            detail: dict[str, Any] = {
                "flow": name,
                "durable": False,
                "items": flow.status(),
                "stage_counts": [
                    {"stage": stage, **counts} for stage, counts in flow.stage_load().items()
                ],
                "dead": [
                    {
                        "flow": name,
                        "key": d.key,
                        "stage": d.stage,
                        "attempts": d.attempts,
                        "failed_at": d.failed_at,
                        "error": rec.first_line(d.error),
                        "traceback": d.traceback,
                        "input": repr(d.value)[: rec.SHOWN_CHARS],
                    }
                    for d in dead
                ],
            }
        else:
            journal = flow.journal.journal if flow is not None else self.runtime.journal
            if journal is None:
                raise LookupError(f"no flow {name!r} here")
            detail = await asyncio.to_thread(self.journal_view, journal, "flow", {"name": name})
            detail["durable"] = True
            detail["journal"] = open_journal(journal).where  # type: ignore[union-attr]
        if flow is not None:
            detail["deployed_here"] = True
            detail["counters"] = flow.counters()
            detail["load"] = flow.stage_load()
        return detail

    # ---- actions ----------------------------------------------------------------------
    def act(self, what: str, form: Mapping[str, Any]) -> Any:
        if what == "retry":
            return self._retry(_need(form, "flow"), _form_keys(form))
        if what == "answer":
            return self._answer(form)
        raise LookupError(f"no action {what!r}")

    async def _retry(self, name: str, keys: list[str] | None) -> list[dict[str, Any]]:
        flow = self.runtime.flows.get(name)
        if flow is not None:  # the API itself, on the flow's own process
            if keys is None:
                keys = list(dict.fromkeys(d.key for d in flow.dead_letters()))
            out = []
            for key in keys:
                done = await flow.retry(key)
                out.append(
                    {
                        "key": key,
                        "changed": done,
                        "detail": "re-queued" if done else "no dead letters",
                    }
                )
            return out
        if self.runtime.journal is None:
            raise LookupError(f"no flow {name!r} here")
        from pydotcompute.coordinator.journal_repair import retry_items

        return [_outcome(o) for o in await retry_items(self.runtime.journal, name, keys)]

    async def _answer(self, form: Mapping[str, Any]) -> dict[str, Any]:
        if self.runtime.journal is None:
            raise LookupError("this runtime has no journal, so no tasks")
        engine = self.runtime.workflows()
        task = _task_of(form, engine.task)
        return await _answer(engine, task, _need(form, "key"), form.get("answer"))


class JournalViews(_JournalPages):
    """The drill-down pages of a journal, for a dashboard watching another process."""

    loop: asyncio.AbstractEventLoop | None = None

    def __init__(self, journal: Any) -> None:
        super().__init__()
        cfg = open_journal(journal)
        if cfg is None:
            raise JournalError("no journal given: pass an SQLite path or a postgresql:// DSN")
        self.journal: JournalConfig = cfg
        self.reader(cfg)  # refuses a missing or foreign journal now

    def info(self) -> dict[str, Any]:
        return {"kernels": False, "journal": self.journal.where, "workflows": True}

    def get(self, what: str, query: Mapping[str, str]) -> Any:
        if what == "kernel":
            raise LookupError(
                "kernel details come from the runtime's own dashboard (serve_metrics on the "
                "runtime); this one watches its /metrics"
            )
        return self.journal_view(self.journal, what, query)

    def act(self, what: str, form: Mapping[str, Any]) -> Any:
        if what == "retry":
            from pydotcompute.coordinator.journal_repair import retry_items

            keys = _form_keys(form)

            async def retry() -> list[dict[str, Any]]:
                outcomes = await retry_items(self.journal, _need(form, "flow"), keys)
                return [_outcome(o) for o in outcomes]

            return retry()
        if what == "answer":
            from pydotcompute.workflows.engine import WorkflowEngine, find_task

            task = _task_of(form, find_task)

            async def answer() -> dict[str, Any]:
                async with WorkflowEngine(None, self.journal) as engine:
                    return await _answer(engine, task, _need(form, "key"), form.get("answer"))

            return answer()
        raise LookupError(f"no action {what!r}")
