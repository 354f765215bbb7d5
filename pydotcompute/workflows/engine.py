"""Running workflows durably: each call is journaled, and a workflow resumed after a crash
runs again from the top, getting every recorded call's result back without running it.

A call is identified by its *position* (the n-th call the workflow made, counted when
``ctx.call`` is invoked, so ``ctx.all`` numbers its calls in argument order), its step
and its arguments. A replay that makes another call at a recorded position raises
:class:`~pydotcompute.errors.NonDeterminismError`.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import hashlib
import importlib
import importlib.util
import logging
import os
import pickle
import random
import sys
import time
import uuid
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

from pydotcompute.coordinator.flow import Flow, check_key
from pydotcompute.coordinator.graph import Graph
from pydotcompute.coordinator.journal import JournalConfig, open_journal
from pydotcompute.coordinator.log_throttle import LogThrottle
from pydotcompute.coordinator.plan import compile_graph
from pydotcompute.coordinator.records import decode, encode
from pydotcompute.coordinator.retention import Retention, seconds
from pydotcompute.errors import (
    FlowClosedError,
    InvalidConfigurationError,
    MessageSerializationError,
    NonDeterminismError,
    WorkflowFailedError,
    WorkflowNotFoundError,
)
from pydotcompute.workflows.steps import (
    Activity,
    PendingTask,
    Task,
    Workflow,
    WorkflowStatus,
    activity,
    qualified_name,
)
from pydotcompute.workflows.store import (
    CANCELLED,
    DONE,
    FAILED,
    STATES,
    CallRow,
    LostOwnership,
    WorkflowStore,
    read_pending_tasks,
    read_workflows,
)

__all__ = ["WorkflowContext", "WorkflowEngine", "engine_for", "find_task"]

log = logging.getLogger("pydotcompute.workflows")

NO_ARGS = encode(((), {}))
TASK_POLL = 0.25  # how often a waiting task looks for an answer given by another process


def pack(value: Any, what: str) -> bytes:
    try:
        return encode(value)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise MessageSerializationError(f"{what} cannot be stored in the journal: {exc}") from exc


def pack_error(exc: BaseException) -> tuple[bytes | None, str]:
    """The exception pickled (None if it does not survive a round trip) and as text."""
    text = f"{type(exc).__name__}: {exc}"
    try:
        blob = encode(exc)
        decode(blob)
    except Exception:
        blob = None
    return blob, text


def unpack_error(blob: bytes | None, text: str | None, where: str) -> BaseException:
    if blob is not None:
        exc = decode(blob)
        if isinstance(exc, BaseException):
            return exc
    return WorkflowFailedError(f"{where} failed: {text}")


def comparable(value: Any) -> Any:
    """What must match in a replayed call's arguments: messages without their fresh ids."""
    if isinstance(value, (tuple, list)):
        return type(value)(comparable(v) for v in value)
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and hasattr(value, "message_id"):
        fields = {
            f.name: getattr(value, f.name)
            for f in dataclasses.fields(value)
            if f.name not in ("message_id", "correlation_id")
        }
        return type(value), comparable(fields)
    return value


def code_identity(fn: Any) -> str:
    """A function as the journal can recognise it in another process: its name, and
    for functions without a unique name (lambdas, nested ones) the code it runs."""
    if fn is None or isinstance(fn, str):
        return repr(fn)
    name = qualified_name(fn)
    code = getattr(fn, "__code__", None)
    if "<" in name and code is not None:
        name += ":" + hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:12]
    return name


def graph_identity(graph: Graph) -> str:
    """A graph's journal name: its structure and what each stage runs, stable across
    runs and processes (a workflow may build its graph again on every run)."""
    plan = compile_graph(graph)
    parts = [plan.fingerprint]
    for node in plan.nodes:
        parts.append(code_identity(node.stage.target if node.stage is not None else None))
        parts.append(code_identity(node.predicate))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def describe_call(kind: str, step: str, args: Any) -> str:
    a, kw = args
    shown = ", ".join([*(repr(v) for v in a), *(f"{k}={v!r}" for k, v in kw.items())])
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return f"{kind} {step}({shown})"


class WorkflowContext:
    """What a running workflow calls through: ``ctx.call``, ``ctx.all``, ``ctx.sleep``,
    ``ctx.now`` and ``ctx.random``. ``ctx.key`` is the workflow's key."""

    def __init__(self, engine: WorkflowEngine, key: str, history: dict[int, CallRow]) -> None:
        self.key = key
        self._engine = engine
        self._history = history
        self._pos = 0
        self.lost = False

    def _next(self) -> int:
        pos = self._pos
        self._pos += 1
        return pos

    def _replayed(self, pos: int, kind: str, step: str, blob: bytes, args: Any) -> CallRow | None:
        """The recorded call at ``pos``, after checking that it is the call made now."""
        row = self._history.pop(pos, None)
        if row is None:
            return None
        if row[0] == kind and row[1] == step:
            if row[2] == blob:
                return row
            try:
                if comparable(decode(row[2])) == comparable(args):
                    return row
            except Exception:  # noqa: S110 - an unreadable record simply does not match
                pass
        try:
            old = describe_call(row[0], row[1], decode(row[2]))
        except Exception:
            old = f"{row[0]} {row[1]}(<unreadable arguments>)"
        raise NonDeterminismError(
            f"workflow {self.key!r}, call #{pos}: the replay made "
            f"{describe_call(kind, step, args)} but the journal has {old}"
        )

    def call(self, step: Any, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """Call a step and return an awaitable of its result.

        ``step``: an activity (any arguments), or with exactly one argument a kernel id,
        a graph, another workflow or a task. The call's position is taken now, so
        ``ctx.all(ctx.call(a, 1), ctx.call(b, 2))`` is numbered in argument order.
        """
        kind, name, target = self._engine.identify(step)
        if kind != "activity" and (len(args) != 1 or kwargs):
            raise InvalidConfigurationError(f"a {kind} step takes exactly one value")
        return self._call(self._next(), kind, name, target, args, kwargs)

    async def _call(
        self,
        pos: int,
        kind: str,
        name: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        eng = self._engine
        blob = pack((args, kwargs), f"arguments of {kind} {name}")
        row = self._replayed(pos, kind, name, blob, (args, kwargs))
        call_key = f"{self.key}/{pos}"
        if row is not None:
            state, result, error = row[3], row[4], row[5]
            if state == DONE:
                return decode(result) if result is not None else None
            if state == FAILED:
                raise unpack_error(result, error, f"{kind} {name}")
            return await eng.wait_task(call_key)  # a task still waiting for its answer
        if kind == "task":
            await eng.record(self, pos, kind, name, blob, "waiting", None, None, call_key)
            return await eng.wait_task(call_key)
        started = time.monotonic()
        try:
            out = await eng.run_step(kind, target, args, kwargs, call_key, self.key)
        except Exception as exc:
            if isinstance(exc, LostOwnership):
                raise
            err_blob, text = pack_error(exc)
            took = time.monotonic() - started
            await eng.record(self, pos, kind, name, blob, FAILED, err_blob, text, None, took)
            raise
        out_blob = pack(out, f"result of {kind} {name}")
        took = time.monotonic() - started
        await eng.record(self, pos, kind, name, blob, DONE, out_blob, None, None, took)
        return out

    async def all(self, *calls: Awaitable[Any]) -> list[Any]:
        """Run calls concurrently; their results in argument order. If one fails, the
        others are cancelled (what they committed stays committed) and its error raised."""
        tasks = [asyncio.ensure_future(c) for c in calls]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
            raise

    async def sleep(self, seconds: float) -> None:
        """Sleep durably: the wake-up time is journaled, so a workflow resumed after a
        crash sleeps only what is left."""
        pos = self._next()
        args: tuple[tuple[float], dict[str, Any]] = ((float(seconds),), {})
        blob = encode(args)
        row = self._replayed(pos, "sleep", "sleep", blob, args)
        if row is not None:
            wake = decode(row[4]) if row[4] is not None else 0.0
        else:
            wake = time.time() + seconds
            await self._engine.record(
                self, pos, "sleep", "sleep", blob, DONE, encode(wake), None, None
            )
        await asyncio.sleep(max(0.0, wake - time.time()))

    def _recorded(self, kind: str, make: Any) -> Any:
        pos = self._next()
        row = self._replayed(pos, kind, kind, NO_ARGS, ((), {}))
        if row is not None:
            return decode(row[4]) if row[4] is not None else make()
        value = make()
        # Not awaited: commits are ordered, so any later call that depends on the value
        # is durable only after it.
        self._engine.note(self, pos, kind, encode(value))
        return value

    def now(self) -> float:
        """``time.time()`` on the first run; the same value on every replay."""
        return float(self._recorded("now", time.time))

    def random(self) -> float:
        """``random.random()`` on the first run; the same value on every replay."""
        return float(self._recorded("random", random.random))

    def check_replayed(self) -> None:
        """At the end of a run: every recorded call must have been made again."""
        if self._history:
            pos = min(self._history)
            row = self._history[pos]
            raise NonDeterminismError(
                f"workflow {self.key!r} returned without making call #{pos}, which the "
                f"journal has: {describe_call(row[0], row[1], decode(row[2]))}"
            )


class WorkflowEngine:
    """Starts, runs, resumes and controls workflows on one journal.

    ``runtime`` (optional) runs kernel-id and graph steps. Usually reached through the
    runtime (``rt.start_workflow`` ...), which makes one on its journal; usable on its own
    as ``async with WorkflowEngine(None, "app.db") as engine:``.
    """

    def __init__(self, runtime: Any, journal: Any) -> None:
        cfg = open_journal(journal)
        if cfg is None:
            raise InvalidConfigurationError(
                "workflows need a journal: RingKernelRuntime(journal='app.db')"
            )
        self.runtime = runtime
        self.journal: JournalConfig = cfg
        self.owner = uuid.uuid4().hex
        self.store = WorkflowStore(cfg, self.owner)
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._known: dict[str, Workflow] = {}
        self._tasks: dict[str, Task] = {}  # tasks this engine's workflows called
        self._answers: dict[str, asyncio.Future[bytes]] = {}
        self._flows: dict[str, Flow] = {}
        self._flow_lock = asyncio.Lock()
        self._retention: asyncio.Task[None] | None = None
        self._log = LogThrottle(log)  # retries, failures, takeovers: not one line per workflow
        self._closed = False

    # ---- lifetime -------------------------------------------------------------------
    async def open(self) -> WorkflowEngine:
        await self.store.open()
        self._opened()
        return self

    def open_now(self) -> WorkflowEngine:
        """``open`` from synchronous code running on the event loop."""
        self.store.open_now()
        self._opened()
        return self

    def _opened(self) -> None:
        rule = self.journal.retention
        if rule is not None:
            self._retention = asyncio.create_task(self._retention_loop(rule))

    async def __aenter__(self) -> WorkflowEngine:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop running workflows (they stay resumable in the journal) and close."""
        if self._closed:
            return
        self._closed = True
        if self._retention is not None:
            self._retention.cancel()
            await asyncio.wait([self._retention])
        await self._stop([*self._runs])
        for flow in self._flows.values():
            await flow.close()
        await self.store.close()
        self._log.flush()

    async def _stop(self, keys: list[str]) -> None:
        tasks = [t for k in keys if (t := self._runs.get(k)) is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _check_open(self) -> None:
        if self._closed:
            raise FlowClosedError("the workflow engine is closed")

    # ---- starting and running ------------------------------------------------------
    async def start(
        self, wf: Workflow, value: Any, *, key: str | int | None = None, parent: str | None = None
    ) -> str:
        """Start ``wf(value)`` under ``key`` (default: a new one) and return the key.

        Idempotent per key: a known key is not started again; if its workflow is running
        and nobody holds it (its process died), it resumes here from its journal.
        """
        self._check_open()
        if not isinstance(wf, Workflow):
            raise InvalidConfigurationError(f"not a @workflow: {wf!r}")
        key = uuid.uuid4().hex if key is None else check_key(key)
        self._known[wf.name] = wf
        if key in self._runs:
            return key
        blob = pack(value, f"input of workflow {key!r}")
        try:
            state, claimed, history, stored = await self.store.call(
                self.store.op_start, key, wf.name, parent, blob
            )
        except ValueError as exc:
            raise InvalidConfigurationError(str(exc)) from None
        if claimed and key not in self._runs:
            if stored is not None:
                self._log.log(
                    logging.INFO,
                    "took over",
                    "workflow %r (%s) taken over here from a process that is gone or whose "
                    "lease ran out; replaying its %d recorded calls",
                    key,
                    wf.name,
                    len(history),
                )
            self._drive(wf, key, value if stored is None else decode(stored), history)
        return key

    def _drive(self, wf: Workflow, key: str, value: Any, history: dict[int, CallRow]) -> None:
        ctx = WorkflowContext(self, key, history)
        task = asyncio.create_task(self._execute(wf, key, value, ctx))
        self._runs[key] = task
        task.add_done_callback(lambda t: self._ended(key, t))

    def _ended(self, key: str, task: asyncio.Task[None]) -> None:
        if self._runs.get(key) is task:
            del self._runs[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("workflow %r stopped: %r", key, task.exception())

    async def _execute(self, wf: Workflow, key: str, value: Any, ctx: WorkflowContext) -> None:
        try:
            try:
                out = await wf.fn(value, ctx)
                ctx.check_replayed()
                blob = pack(out, f"result of workflow {key!r}")
            except Exception as exc:
                if ctx.lost or isinstance(exc, LostOwnership):
                    return
                self._log.log(
                    logging.WARNING,
                    ("failed", wf.name),
                    "workflow %r (%s) failed, %s: %s",
                    key,
                    wf.name,
                    type(exc).__name__,
                    exc,
                )
                err_blob, text = pack_error(exc)
                await self.store.call(self.store.op_finish, key, FAILED, err_blob, text)
                return
            await self.store.call(self.store.op_finish, key, DONE, blob, None)
        except LostOwnership:
            pass  # cancelled, restarted or taken over: someone else decides what it becomes

    def identify(self, step: Any) -> tuple[str, str, Any]:
        """(kind, journal name, runnable) of a step."""
        if isinstance(step, Activity):
            return "activity", step.name, step
        if isinstance(step, Workflow):
            return "workflow", step.name, step
        if isinstance(step, Task):
            self._tasks[step.name] = step
            return "task", step.name, step
        if isinstance(step, str):
            return "kernel", step, step
        if isinstance(step, Graph):
            return "graph", graph_identity(step), step
        if callable(step):
            act = activity(step)
            return "activity", act.name, act
        raise InvalidConfigurationError(f"not a workflow step: {step!r}")

    async def run_step(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        call_key: str,
        parent: str,
    ) -> Any:
        if kind == "activity":

            def retrying(attempt: int, exc: BaseException, delay: float) -> None:
                self._log.log(
                    logging.WARNING,
                    ("retry", target.name),
                    "workflow %r: activity %s failed (attempt %d of %d), %s: %s; retrying "
                    "in %.3f s",
                    parent,
                    target.name,
                    attempt,
                    target.retry.attempts,
                    type(exc).__name__,
                    exc,
                    delay,
                )

            return await target.run_with(args, kwargs, retrying)
        if kind == "workflow":
            await self.start(target, args[0], key=call_key, parent=parent)
            return await self.result(call_key)
        if kind == "kernel":
            if self.runtime is None:
                raise InvalidConfigurationError(
                    f"kernel step {target!r}: start the workflow through a runtime"
                )
            return await self.runtime.send_and_receive(target, args[0])
        flow = await self._flow(target)
        # Keyed by the call: a replay after a crash finds the item the first run submitted.
        await flow.submit(args[0], key=call_key)
        return await flow.result(call_key)

    async def _flow(self, graph: Graph) -> Flow:
        from pydotcompute.coordinator import deploy  # the package imports this module

        name = f"workflow-graph-{graph_identity(graph)}"
        async with self._flow_lock:
            flow = self._flows.get(name)
            if flow is None:
                flow = await deploy(self.runtime, graph, name=name, journal=self.journal)
                self._flows[name] = flow
        return flow

    async def record(
        self,
        ctx: WorkflowContext,
        pos: int,
        kind: str,
        step: str,
        args: bytes,
        state: str,
        result: bytes | None,
        error: str | None,
        task_key: str | None,
        took: float = 0.0,
    ) -> None:
        """Journal one call; ``took``: seconds it ran (its record starts that long ago)."""
        try:
            await self.store.call(
                self.store.op_call,
                ctx.key,
                pos,
                kind,
                step,
                args,
                state,
                result,
                error,
                task_key,
                took,
            )
        except LostOwnership:
            ctx.lost = True
            raise

    def note(self, ctx: WorkflowContext, pos: int, kind: str, result: bytes) -> None:
        fut = self.store.post(
            self.store.op_call, ctx.key, pos, kind, kind, NO_ARGS, DONE, result, None, None
        )

        def seen(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and isinstance(f.exception(), LostOwnership):
                ctx.lost = True  # later writes fail the same way; nothing to report

        fut.add_done_callback(seen)

    # ---- tasks ------------------------------------------------------------------------
    async def wait_task(self, task_key: str) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._answers[task_key] = fut
        try:
            while True:
                outcome = await self.store.acall_outcome(task_key)
                if outcome is not None and outcome[0] == DONE:
                    return decode(outcome[1])
                try:
                    return decode(await asyncio.wait_for(asyncio.shield(fut), TASK_POLL))
                except asyncio.TimeoutError:
                    continue
        finally:
            self._answers.pop(task_key, None)

    def task(self, name: str) -> Task:
        """The task called ``name`` in the journal: one this engine's workflows called,
        else found by its ``module:qualname`` (see :func:`find_task`)."""
        known = self._tasks.get(name)
        return known if known is not None else find_task(name)

    def pending(self, task: Task) -> list[PendingTask]:
        """Items of ``task`` waiting for an answer, oldest first (running workflows only)."""
        rows = read_pending_tasks(self.store.read, task.name)
        return [PendingTask(k, wf, decode(a)[0][0], t) for k, _, wf, a, t in rows]

    async def complete(self, task: Task, key: str, answer: Any) -> bool:
        """Answer the pending item ``key`` of ``task``; its workflow goes on with the
        result. False if no such item is pending (unknown, already answered, or its
        workflow ended). An exception from the task's function is raised here and the
        item stays pending."""
        self._check_open()
        args = await self.store.awaiting_args(key, task.name)
        if args is None:
            return False
        result = task.accept(decode(args)[0][0], answer)
        blob = pack(result, f"result of task item {key!r}")
        done = await self.store.call(self.store.op_complete, task.name, key, blob)
        if done is None:
            return False
        fut = self._answers.get(key)
        if fut is not None and not fut.done():
            fut.set_result(blob)
        return True

    # ---- inspecting and controlling --------------------------------------------------
    async def result(self, key: Any, timeout: float | None = None) -> Any:
        """The workflow's return value once it ends. Raises the workflow's own exception
        if it failed (``WorkflowFailedError`` with its text if that could not be stored,
        or if it was cancelled) and ``TimeoutError`` after ``timeout``."""
        key = check_key(key)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            outcome = await self.store.aoutcome(key)
            if outcome is None:
                raise WorkflowNotFoundError(f"no workflow {key!r} in the journal")
            state, blob, error = outcome
            if state == DONE:
                return decode(blob)
            if state == FAILED:
                raise unpack_error(blob, error, f"workflow {key!r}")
            if state == CANCELLED:
                raise WorkflowFailedError(f"workflow {key!r} was cancelled: {error}")
            wait = self.journal.poll * 4  # it may run in another process
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"workflow {key!r} not finished within {timeout} s")
                wait = min(wait, left)
            run = self._runs.get(key)
            if run is not None:
                await asyncio.wait({run}, timeout=None if deadline is None else wait)
            else:
                self._check_open()
                await asyncio.sleep(wait)

    def status(self, key: Any) -> WorkflowStatus:
        """Where the workflow is: state, calls recorded, the last step reached."""
        row = self.store.workflow(check_key(key))
        if row is None:
            raise WorkflowNotFoundError(f"no workflow {key!r} in the journal")
        return WorkflowStatus(*row)

    def list(self, state: str | None = None) -> list[WorkflowStatus]:
        """Every workflow (children included), oldest first; only ``state`` if given."""
        if state is not None and state not in STATES:
            raise InvalidConfigurationError(f"workflow state is one of {STATES}, got {state!r}")
        rows = read_workflows(self.store.read, None if state is None else [state])
        return [WorkflowStatus(*r) for r in rows]

    async def cancel(self, key: Any, reason: str = "cancelled") -> bool:
        """Cancel a running workflow and the workflows it started. False if not running."""
        self._check_open()
        key = check_key(key)
        keys = await self.store.call(self.store.op_cancel, key, reason)
        await self._stop(keys)
        return bool(keys)

    async def restart(self, key: Any, wf: Workflow | None = None) -> None:
        """Run the workflow again from the top with its input, whatever its state; its
        recorded calls, child workflows and graph items are deleted first. ``wf`` names
        the workflow function when this engine has not started one of its kind yet."""
        self._check_open()
        if wf is not None:
            self._known[wf.name] = wf
        key = check_key(key)
        await self._stop([k for k in self._runs if k == key or k.startswith(key + "/")])
        try:
            name, blob = await self.store.call(self.store.op_restart, key)
        except LookupError:
            raise WorkflowNotFoundError(f"no workflow {key!r} in the journal") from None
        self._drive(self._resolve(name), key, decode(blob), {})

    async def delete(self, key: Any) -> bool:
        """Remove the workflow with its calls, child workflows and graph items."""
        self._check_open()
        key = check_key(key)
        await self._stop([k for k in self._runs if k == key or k.startswith(key + "/")])
        return bool(await self.store.call(self.store.op_delete, key))

    async def resume(self, *workflows: Workflow) -> builtins.list[str]:
        """Resume running top-level workflows nobody holds (their process died).

        Given workflows are matched by name; with none, every workflow found in the
        journal is imported by its ``module:qualname``. Returns the keys resumed here.
        """
        self._check_open()
        for wf in workflows:
            self._known[wf.name] = wf
        names = {wf.name for wf in workflows}
        resumed = []
        for key, name in await self.store.arunning_top_level():
            if (names and name not in names) or key in self._runs:
                continue
            wf = self._resolve(name)
            state, claimed, history, blob = await self.store.call(
                self.store.op_start, key, name, None, b""
            )
            if claimed and key not in self._runs:
                self._drive(wf, key, decode(blob), history)
                resumed.append(key)
        if resumed:
            log.info(
                "workflows: resumed %d running workflows that no process held (%s%s)",
                len(resumed),
                ", ".join(repr(k) for k in resumed[:5]),
                ", ..." if len(resumed) > 5 else "",
            )
        return resumed

    async def prune(
        self, older_than: float | timedelta | None = None, keep: int | None = None
    ) -> int:
        """Forget finished top-level workflows (done, failed or cancelled) that ended
        more than ``older_than`` seconds ago (or a ``timedelta``), and beyond the newest
        ``keep``; give one or both. Each goes with its calls, child workflows and graph
        items; one with a workflow still running below it stays. Returns how many went."""
        self._check_open()
        rule = Retention(seconds(older_than, "older_than"), keep)
        total: int = 0
        after = None
        while True:  # a few hundred per transaction: other writes go on in between
            n, after = await self.store.call(self.store.op_prune, rule, after)
            total += n
            if after is None:
                return total

    async def _retention_loop(self, rule: Retention) -> None:
        """Prune by the journal's retention rule now and every ``rule.every`` seconds."""
        while True:
            try:
                n = await self.prune(rule.older_than, rule.keep)
            except FlowClosedError:
                return
            if n:
                log.info("workflows: pruned %d finished workflows (%s)", n, rule)
            await asyncio.sleep(rule.every)

    def _resolve(self, name: str) -> Workflow:
        wf = self._known.get(name)
        if wf is not None:
            return wf
        module, _, qualname = name.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise InvalidConfigurationError(
                f"workflow {name!r} is not known here: pass it to start, resume or restart"
            ) from exc
        if not isinstance(obj, Workflow):
            raise InvalidConfigurationError(f"{name!r} is not a @workflow")
        self._known[name] = obj
        return obj


def find_task(name: str, where: str | None = None) -> Task:
    """The :class:`Task` the journal calls ``name``, whose function checks an answer.

    ``where``: the module (``pkg.mod``) or the file (``path/to/app.py``) that declares
    it; by default the module of a ``module:qualname`` name is imported (``__main__``
    is the running program). A task whose script ran as ``__main__`` is found in that
    file by its qualname. Raises ``InvalidConfigurationError`` saying what to give.
    """
    module_name, sep, qualname = name.partition(":")
    if where is not None:
        module = _load_module(where)
        tasks = [v for v in vars(module).values() if isinstance(v, Task)]
        for t in tasks:
            if t.name == name:
                return t
        obj = _attribute(module, qualname) if sep else None
        if isinstance(obj, Task):  # the same function, loaded under another module name
            return Task(obj.fn, name=name)
        names = ", ".join(sorted(t.name for t in tasks)) or "none"
        raise InvalidConfigurationError(
            f"{where} declares no task named {name!r} (its tasks: {names})"
        )
    if not sep:
        raise InvalidConfigurationError(
            f"task {name!r} does not say which module declares it: give the module or file "
            f"that does, or, for a task declared without a function (task({name!r})), "
            "take the answer as it is"
        )
    try:
        module = sys.modules["__main__"] if module_name == "__main__" else None
        module = module or importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidConfigurationError(
            f"task {name!r}: module {module_name!r} cannot be imported here ({exc}); "
            "run where it can (PYTHONPATH), or give the file that declares the task"
        ) from exc
    obj = _attribute(module, qualname)
    if not isinstance(obj, Task):
        hint = (
            "it was declared in a script run as the main program: give that script's file"
            if module_name == "__main__"
            else f"{module_name} has no task {qualname!r}"
        )
        raise InvalidConfigurationError(f"task {name!r} is not found here: {hint}")
    return obj


def _attribute(module: Any, qualname: str) -> Any:
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _load_module(where: str) -> Any:
    """A module by name, or a Python file loaded as a module of its own (its
    ``if __name__ == "__main__"`` part does not run)."""
    if where.endswith(".py") or os.sep in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise InvalidConfigurationError(f"no Python file at {where}")
        stem = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(f"_pydotcompute_tasks_{stem}", path)
        if spec is None or spec.loader is None:
            raise InvalidConfigurationError(f"{where} cannot be loaded as Python")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise InvalidConfigurationError(f"{where} failed to load: {exc!r}") from exc
        return module
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise InvalidConfigurationError(f"module {where!r} cannot be imported: {exc}") from exc


WORKFLOWS = "workflows"  # the name the engine is attached to a runtime under


def engine_for(runtime: Any) -> WorkflowEngine:
    """The runtime's engine on its journal, made on first use and closed at shutdown."""
    engine = runtime.extension(WORKFLOWS)
    if not isinstance(engine, WorkflowEngine) or engine._closed:
        runtime.check_open()
        engine = WorkflowEngine(runtime, runtime.journal).open_now()
        runtime.attach(WORKFLOWS, engine)
    return engine
