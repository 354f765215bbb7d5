"""What runs one stage for one worker: a function, a child process, or a kernel."""

from __future__ import annotations

import abc
import asyncio
import importlib
import inspect
import multiprocessing
import sys
import traceback
from collections.abc import Callable
from typing import Any

from pydotcompute.coordinator.graph import Stage
from pydotcompute.coordinator.kernel_replies import KernelReplies, replies_for
from pydotcompute.errors import InvalidConfigurationError

__all__ = [
    "FunctionRunner",
    "KernelRunner",
    "PassRunner",
    "ProcessRunner",
    "Runner",
    "make_runner",
    "refuse_deploy_while_spawning",
]


class Runner(abc.ABC):
    """One worker's way of running a stage: ``await call(value)`` returns the output."""

    async def start(self) -> None:  # noqa: B027 - a hook; most runners need no set-up
        """Prepare (create per-worker state, start a process)."""

    async def ready(self) -> None:  # noqa: B027 - a hook; most runners are ready at once
        """Wait until ``start``'s work is done (a process has imported the stage), so
        that a deploy fails there, not on its first item."""

    @abc.abstractmethod
    async def call(self, value: Any) -> Any:
        """Run the stage on one value and return its output."""

    async def close(self) -> None:  # noqa: B027 - a hook; most runners hold nothing
        """Release what ``start`` took."""


class PassRunner(Runner):
    """A join without a merge function: the joined parts are the output."""

    async def call(self, value: Any) -> Any:
        return value


def wants_state(fn: Callable[..., Any]) -> bool:
    """True if ``fn`` takes a second positional argument (the per-worker state)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class FunctionRunner(Runner):
    """Calls a sync or async function on the event loop, with per-worker state."""

    def __init__(self, stage: Stage) -> None:
        fn = stage.target
        assert callable(fn)
        self._fn = fn
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
        )
        self._with_state = wants_state(fn)
        if stage.state is not None and not self._with_state:
            raise InvalidConfigurationError(
                f"stage {stage.name!r} has a state factory but its function takes one argument"
            )
        self._factory = stage.state or dict
        self._state: Any = None
        if self._is_async and not self._with_state:
            self.call = fn  # type: ignore[method-assign]  # an async fn(item) is its own call

    async def start(self) -> None:
        if self._with_state:
            made: Any = self._factory()
            self._state = await made if inspect.isawaitable(made) else made

    async def call(self, value: Any) -> Any:
        out = self._fn(value, self._state) if self._with_state else self._fn(value)
        # A sync function may still return an awaitable (e.g. functools.partial of an
        # async def): await whatever can be awaited.
        if self._is_async or inspect.isawaitable(out):
            return await out
        return out


def reference(obj: Callable[..., Any], what: str, stage: Stage) -> tuple[str, str]:
    """(module, qualified name) of a module-level callable, for a child process to import."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    if module is None or "<" in qualname:
        raise InvalidConfigurationError(
            f"stage {stage.name!r}: processes=True needs a module-level {what}, got {obj!r}"
        )
    return module, qualname


def resolve(ref: tuple[str, str]) -> Any:
    """Import what ``reference`` named; a Stage found there stands for its function."""
    module, qualname = ref
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        if module != "__main__":
            raise
        obj = importlib.import_module("__mp_main__")
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj.target if isinstance(obj, Stage) else obj


STAGE_PROCESS = "pydotcompute-stage"  # how a stage's worker processes are named
# Exit status of a stage's worker process that found the main module deploying a flow
# while it imported it: the main module has no ``if __name__ == "__main__":`` guard.
EXIT_UNGUARDED_MAIN = 86


def main_module_file() -> str | None:
    """The file of the program's main module (what a spawned process imports again; in
    such a process, while it does, the module is ``__mp_main__``)."""
    for name in ("__mp_main__", "__main__"):
        where = getattr(sys.modules.get(name), "__file__", None)
        if where:
            return str(where)
    return None


def unguarded_main(what: str) -> str:
    where = main_module_file() or "the main module"
    return (
        f'{where} has no `if __name__ == "__main__":` guard: {what}. With '
        "processes=True every worker process starts by importing the main module again "
        "(the 'spawn' start method), and this one deploys a flow as it is imported. Put "
        "the code that starts the flow (e.g. asyncio.run(main())) under "
        '`if __name__ == "__main__":`'
    )


def refuse_deploy_while_spawning() -> None:
    """Called by ``deploy``: refuse to run in a process that is importing its parent's
    main module (the import that ``spawn`` does before the process runs anything).
    Such a deploy comes from a main module without a ``__main__`` guard; it would start
    the whole program again in every worker process, journal writes included."""
    me = multiprocessing.current_process()
    if not getattr(me, "_inheriting", False):  # set by spawn while it imports the main module
        return
    text = unguarded_main("this worker process was about to deploy a flow again")
    if me.name.startswith(STAGE_PROCESS):
        # One of ours: the parent reads this exit status and says the same there.
        print(f"pydotcompute: {text}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_UNGUARDED_MAIN)
    raise InvalidConfigurationError(text)


def serve(conn: Any, fn_ref: tuple[str, str], state_ref: tuple[str, str] | None) -> None:
    """Child process main: say ready (or why not), then answer each value with
    (True, output) or (False, exc, text)."""
    try:
        fn = resolve(fn_ref)
        with_state = wants_state(fn)
        state = resolve(state_ref)() if state_ref else ({} if with_state else None)
    except Exception as exc:
        conn.send((False, exc, traceback.format_exc()))
        return
    conn.send((True, None, ""))
    while True:
        try:
            value = conn.recv()
        except EOFError:
            return
        try:
            out = fn(value, state) if with_state else fn(value)
            conn.send((True, out, ""))
        except Exception as exc:
            text = traceback.format_exc()
            try:
                conn.send((False, exc, text))
            except Exception:
                conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}"), text))


class ChildProcessDied(RuntimeError):
    """The worker process exited while it held an item (or while it started)."""


class ProcessRunner(Runner):
    """Runs a sync module-level function in one child process owned by this worker."""

    def __init__(self, stage: Stage) -> None:
        assert callable(stage.target)
        self._stage = stage
        self._fn_ref = reference(stage.target, "function", stage)
        self._state_ref = reference(stage.state, "state factory", stage) if stage.state else None
        # spawn, not fork: the parent has threads (journal writer) that fork would copy half-way.
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self._started = False  # the process said it imported the stage

    async def start(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=serve,
            args=(child, self._fn_ref, self._state_ref),
            daemon=True,
            name=f"{STAGE_PROCESS}-{self._stage.name}",
        )
        try:
            proc.start()
        finally:
            child.close()
        self._proc, self._conn, self._started = proc, parent, False

    async def ready(self) -> None:
        if self._started:
            return
        try:
            await self._readable()
            ok, exc, text = self._conn.recv()
        except (EOFError, OSError):
            # The exit status and stderr say why, not the pipe's EOF: no chain.
            raise InvalidConfigurationError(await self._died_starting()) from None
        if not ok:
            await self.close()
            raise InvalidConfigurationError(
                f"stage {self._stage.name!r}: its worker process cannot load the stage: "
                f"{type(exc).__name__}: {exc}\nin worker process:\n{text}"
            ) from exc
        self._started = True

    async def _died_starting(self) -> str:
        """Why the process ended before it said it was ready (it is reaped here)."""
        proc = self._proc
        await self.close()
        code = proc.exitcode if proc is not None else None
        name = self._stage.name
        if code == EXIT_UNGUARDED_MAIN:
            return f"stage {name!r}: " + unguarded_main(
                "the stage's worker process stopped while importing it"
            )
        where = main_module_file()
        return (
            f"worker process of stage {name!r} exited (status {code}) while starting, "
            "before it ran any item: it failed importing "
            + (
                f"the main module {where} (processes=True starts each worker with "
                "'spawn', which imports the main module again) or "
                if where
                else ""
            )
            + "the stage's function; its traceback is above, on stderr."
            + (
                f" If {where} runs code at import time, put that code under "
                '`if __name__ == "__main__":`'
                if where
                else ""
            )
        )

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self._conn.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            loop.remove_reader(fd)

    async def call(self, value: Any) -> Any:
        if self._proc is None or not self._proc.is_alive():
            await self.close()
            await self.start()
        if not self._started:
            try:
                await self.ready()
            except InvalidConfigurationError as exc:
                raise ChildProcessDied(str(exc)) from exc
        try:
            self._conn.send(value)
            await self._readable()
            ok, out, text = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError) as exc:
            await self.close()
            raise ChildProcessDied(f"worker process of stage {self._stage.name!r} died") from exc
        if ok:
            return out
        out.__notes__ = [*getattr(out, "__notes__", []), f"in worker process:\n{text}"]
        raise out

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        proc, self._proc = self._proc, None
        self._started = False
        if proc is not None:
            proc.join(0.5)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 2.0)


class KernelRunner(Runner):
    """Sends values to a launched kernel and waits for the reply to each.

    Replies are matched to requests by identity (``coordinator.kernel_replies``):
    compiled kernels between ``@message`` types, and host actors sent messages, get
    their values in one ring operation per batch (compiled) and their replies routed
    by correlation id; a request the kernel consumed without output comes back as
    ``FILTERED``. Plain values to a host actor (no ids) keep ``send_and_receive``."""

    def __init__(self, stage: Stage, runtime: Any, chain: tuple[str, ...] = ()) -> None:
        if runtime is None:
            raise InvalidConfigurationError(
                f"stage {stage.name!r} is a kernel id; deploy the graph through a runtime"
            )
        self._id: str = stage.target  # type: ignore[assignment]  # make_runner: a kernel id
        self._rt = runtime
        self._timeout = stage.timeout
        self._replies: KernelReplies | None = None
        self._chain = chain  # a linked chain of kernels, this one first (or empty)

    batches_in_flight = 4
    """Batches of one worker in the kernel at once (see ``Flow._work``)."""

    def _routed(self, value: Any) -> KernelReplies | None:
        """The kernel's reply table when ``value`` goes by identity, else None."""
        kr = self._replies
        if kr is None or not kr.current(self._rt):
            kr = self._replies = replies_for(self._rt, self._id, self._chain)
        if kr.records or (kr.backend == "host" and getattr(value, "message_id", None)):
            return kr
        return None

    async def call(self, value: Any) -> Any:
        kr = self._routed(value)
        if kr is None:
            # The stage's workers have their requests in flight together; a reply owed
            # to one that timed out goes to nobody (see ``send_and_receive``).
            return await self._rt.send_and_receive(self._id, value, timeout=self._timeout)
        [out] = await kr.request_many([value], self._timeout)
        if isinstance(out, Exception):
            raise out
        return out

    async def call_many(self, values: list[Any]) -> list[Any]:
        """Every value sent before any reply is awaited: one ring operation for records
        of a compiled kernel; on a cluster kernel the sends of one turn of the event loop
        travel in one Ray call and the replies come back in batch fetches. One result
        per value: its output, ``FILTERED``, or the exception its call raised (each item
        fails on its own)."""
        kr = self._routed(values[0]) if values else None
        if kr is not None:
            return await kr.request_many(values, self._timeout)
        send = self._rt.send_and_receive
        outs = await asyncio.gather(
            *(send(self._id, v, timeout=self._timeout) for v in values), return_exceptions=True
        )
        for out in outs:
            if isinstance(out, BaseException) and not isinstance(out, Exception):
                raise out  # a cancellation is not an item's failure
        return outs


def make_runner(stage: Stage | None, runtime: Any, chain: tuple[str, ...] = ()) -> Runner:
    """The runner of ``stage``; ``chain``: the kernels linked from its kernel on."""
    if stage is None:
        return PassRunner()
    if isinstance(stage.target, str):
        return KernelRunner(stage, runtime, chain)
    if stage.processes:
        return ProcessRunner(stage)
    return FunctionRunner(stage)
