"""Durable workflows: ``@workflow`` functions that call ``@activity`` steps, kernels,
graphs, other workflows and ``@task`` items completed from outside the program.

These classes only describe steps; :mod:`pydotcompute.workflows.engine` runs
them on a journal.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydotcompute.coordinator.retry import RetryPolicy
from pydotcompute.errors import InvalidConfigurationError

__all__ = [
    "Activity",
    "PendingTask",
    "Task",
    "Workflow",
    "WorkflowStatus",
    "activity",
    "task",
    "workflow",
]


def qualified_name(fn: Callable[..., Any]) -> str:
    """``module:qualname``: the journal's name for a step, importable when module-level."""
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


class Activity:
    """A one-to-one step of a workflow: a sync or async function, retried by ``retry``.

    ``timeout`` bounds one run (a sync function with a timeout runs in a thread, which
    is abandoned, not stopped, when the timeout passes). Call it from a workflow with
    ``await ctx.call(act, *args)``; calling it directly runs the function (handy in tests).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        retry: RetryPolicy,
        timeout: float | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise InvalidConfigurationError(f"an activity wraps a function, got {fn!r}")
        if timeout is not None and timeout <= 0:
            raise InvalidConfigurationError(f"activity timeout must be > 0, got {timeout}")
        self.fn = fn
        self.retry = retry
        self.timeout = timeout
        self.name = name or qualified_name(fn)
        self.is_async = is_async(fn)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<activity {self.name}>"

    async def run(self, *args: Any, **kwargs: Any) -> Any:
        """One call with this activity's retries, back-off and timeout."""
        return await self.run_with(args, kwargs)

    async def run_with(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_retry: Callable[[int, BaseException, float], None] | None = None,
    ) -> Any:
        """``run``, telling ``on_retry(attempt, error, delay)`` before each retry."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._once(args, kwargs)
            except Exception as exc:
                if not self.retry.should_retry(attempt, exc):
                    raise
                delay = self.retry.delay(attempt)
                if on_retry is not None:
                    on_retry(attempt, exc, delay)
                await asyncio.sleep(delay)

    async def _once(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.timeout is None:
            out = self.fn(*args, **kwargs)
            return await out if inspect.isawaitable(out) else out
        run: Awaitable[Any] = (
            self.fn(*args, **kwargs)
            if self.is_async
            else asyncio.to_thread(self.fn, *args, **kwargs)
        )
        try:
            return await asyncio.wait_for(run, self.timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"activity {self.name} ran past {self.timeout} s") from None


def activity(
    fn: Callable[..., Any] | None = None,
    *,
    retries: int | RetryPolicy = 1,
    backoff: float = 0.05,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    timeout: float | None = None,
    name: str | None = None,
) -> Any:
    """Make a function an :class:`Activity`; usable as ``@activity`` or ``@activity(...)``.

    ``retries`` is the most runs a call gets (``retries=3``: three runs, then the call
    fails with the last error), or a full :class:`RetryPolicy`, as for stages.
    """
    policy = (
        retries
        if isinstance(retries, RetryPolicy)
        else RetryPolicy(attempts=retries, backoff=backoff, retry_on=retry_on)
    )

    def wrap(f: Callable[..., Any]) -> Activity:
        return Activity(f, retry=policy, timeout=timeout, name=name)

    return wrap if fn is None else wrap(fn)


class Workflow:
    """An ``async def wf(x, ctx)`` run durably: start it with ``rt.start_workflow``,
    or call it from another workflow with ``await ctx.call(wf, x)``."""

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise InvalidConfigurationError(f"a workflow is an async def wf(x, ctx), got {fn!r}")
        self.fn = fn
        self.name = name or qualified_name(fn)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __repr__(self) -> str:
        return f"<workflow {self.name}>"


def workflow(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Make ``async def wf(x, ctx)`` a :class:`Workflow`; ``@workflow`` or ``@workflow(name=...)``.

    ``name`` (default ``module:qualname``) is how the journal knows it: keep it stable
    across versions of the code, or workflows in the journal cannot be resumed.
    """

    def wrap(f: Callable[..., Any]) -> Workflow:
        return Workflow(f, name=name)

    return wrap if fn is None else wrap(fn)


class Task:
    """A step finished from outside the program (a person, another system).

    ``await ctx.call(t, request)`` records a pending item and waits; the item is listed by
    ``rt.pending_tasks(t)`` and finished by ``await rt.complete_task(t, key, answer)``.
    The call then returns ``fn(request, answer)`` (``answer`` itself without ``fn``); an
    exception from ``fn`` refuses the answer and leaves the item pending.
    """

    def __init__(self, fn: Callable[[Any, Any], Any] | None = None, *, name: str) -> None:
        self.fn = fn
        self.name = name

    def accept(self, request: Any, answer: Any) -> Any:
        return answer if self.fn is None else self.fn(request, answer)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def task(fn: Callable[[Any, Any], Any] | str | None = None, *, name: str | None = None) -> Any:
    """Declare a :class:`Task`: ``@task`` on ``fn(request, answer) -> result``, or
    ``task("approval")`` for a task whose result is the answer as given."""
    if isinstance(fn, str):
        return Task(None, name=fn)

    def wrap(f: Callable[[Any, Any], Any]) -> Task:
        if is_async(f):
            raise InvalidConfigurationError("a task's fn(request, answer) is a plain function")
        return Task(f, name=name or qualified_name(f))

    return wrap if fn is None else wrap(fn)


@dataclass(frozen=True)
class WorkflowStatus:
    """One workflow as the journal has it.

    ``state``: ``running``, ``done``, ``failed`` or ``cancelled``; ``calls``: calls
    recorded so far; ``step``: the step of the last one recorded; ``error``: why it
    failed or was cancelled; ``parent``: the workflow that called it, if any.
    """

    key: str
    name: str
    state: str
    calls: int
    step: str | None
    error: str | None
    parent: str | None
    created: float
    updated: float


@dataclass(frozen=True)
class PendingTask:
    """A task item waiting for its answer: ``key`` is what ``complete_task`` takes."""

    key: str
    workflow: str
    request: Any
    created: float
