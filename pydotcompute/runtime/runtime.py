"""``RingKernelRuntime``: launches ring kernels, moves their messages, owns their lives."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pydotcompute.backends.base import KernelBackend
from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.backends.handler_errors import describe_crash
from pydotcompute.backends.host import LATENCY_SAMPLE_EVERY
from pydotcompute.backends.registry import AUTO, backend_class, backend_entry, resolve_backend
from pydotcompute.cluster.placement import KernelPlacement
from pydotcompute.cluster.ray_cluster import RayCluster
from pydotcompute.errors import (
    InvalidConfigurationError,
    KernelAlreadyExistsError,
    KernelFailedError,
    KernelLinkError,
    KernelNotFoundError,
    KernelStateError,
    QueueFullError,
    QueueTimeoutError,
)
from pydotcompute.runtime.event_loop import get_loop_info
from pydotcompute.runtime.extension import RuntimeExtension
from pydotcompute.runtime.handle import KernelHandle
from pydotcompute.runtime.lifecycle import KernelState, check_transition
from pydotcompute.runtime.registry import (
    RingKernelSpec,
    check_backend_fits,
    default_backend,
    lookup_kernel,
)
from pydotcompute.runtime.replies import ReplyQueue
from pydotcompute.telemetry.snapshot import KernelTelemetry

if TYPE_CHECKING:
    from pydotcompute.workflows.engine import WorkflowEngine

__all__ = ["RingKernelRuntime"]

log = logging.getLogger("pydotcompute.runtime")
_perf_ns = time.perf_counter_ns
_SAMPLE_MASK = LATENCY_SAMPLE_EVERY - 1

_RUNNING = frozenset({KernelState.LAUNCHED, KernelState.ACTIVE, KernelState.DEACTIVATED})
# A restarting kernel keeps its queues: sends to it wait there for the restarted handler.
_SENDABLE = _RUNNING | {KernelState.RESTARTING}
_MISSING = object()
_IDLE = frozenset({KernelState.LAUNCHED, KernelState.DEACTIVATED})
_ACTIVE = KernelState.ACTIVE

INACTIVE_WAIT_WARNING_S = 5.0
"""A send or receive without a timeout that has waited this long on a kernel that is
not active logs one warning (once per kernel): such a wait usually never ends."""


class _Kernel:
    """The runtime's record of one launched kernel.

    Its state also decides whether the kernel is in the runtime's per-message
    tables, ``inputs`` (kernels that may be sent to) and ``outputs`` (kernels that
    may be received from: every one, since a FAILED kernel's outputs stay receivable
    and its backend raises once they are taken): send and receive look a kernel up there
    and check no state themselves. A record only leaves a final state by being
    replaced, so an old record never overwrites its successor's entries.
    """

    __slots__ = (
        "kernel_id",
        "spec",
        "_state",
        "_inputs",
        "_outputs",
        "_input_port",
        "input_type",
        "kernel_backend",
        "poll",
        "restarts",
        "error",
        "failed_input",
        "last_error",
        "resume",
        "restart_times",
        "restart_task",
        "replies",
        "error_watchers",
        "stop_task",
        "wait_warned",
        "link_to",
        "fed_by",
    )

    def __init__(
        self,
        spec: RingKernelSpec,
        restarts: int,
        inputs: dict[str, tuple[Callable[[Any], bool], type | None]],
        outputs: dict[str, Callable[[Any], Any] | None],
    ) -> None:
        self.kernel_id = spec.kernel_id
        self.spec = spec
        # Checked per send only when it is a class; a kernel typed by a numpy dtype
        # has its records checked by its ring backend, which names both dtypes.
        itype = spec.input_type
        self.input_type = itype if isinstance(itype, type) else None
        self._inputs = inputs
        self._outputs = outputs
        self.restarts = restarts
        self.error: BaseException | None = None  # what the handler last raised
        self.failed_input: Any = None  # the message it held then
        self.last_error: str | None = None  # the few lines that tell both
        self.resume = KernelState.LAUNCHED  # the state a restart returns to
        self.restart_times: list[float] = []  # crashes restarted, within the window
        self.restart_task: asyncio.Task[None] | None = None
        self.replies: ReplyQueue | None = None  # send_and_receive callers, once one came
        # Told of each message the handler raised on (see watch_handler_errors).
        self.error_watchers: list[Callable[[Any, KernelFailedError], None]] = []
        self.stop_task: asyncio.Task[None] | None = None
        self.wait_warned = False  # a wait on it while inactive was logged once
        # A link (rt.link): the kernel this one's outputs go to, the one feeding it.
        self.link_to: _Kernel | None = None
        self.fed_by: _Kernel | None = None

    def attach(self, kernel_backend: KernelBackend) -> None:
        """Take the kernel's backend, made with callbacks bound to this record."""
        self.kernel_backend = kernel_backend
        # The backend's no-wait paths, called inline by send and receive.
        self._input_port = (kernel_backend.try_put, self.input_type)
        self.poll = kernel_backend.poll
        self.state = KernelState.CREATED

    @property
    def state(self) -> KernelState:
        return self._state

    @state.setter
    def state(self, state: KernelState) -> None:
        self._state = state
        kid = self.kernel_id
        # The inner ends of a link take no sends (its input is the other's output) and
        # give no receives (its outputs went on): refused by ``_refusal``.
        if state in _SENDABLE and self.fed_by is None:
            self._inputs[kid] = self._input_port
        else:
            self._inputs.pop(kid, None)
        if self.link_to is None:
            self._outputs[kid] = self.poll
        else:
            self._outputs.pop(kid, None)

    def relinked(self) -> None:
        """Update the per-message tables after ``link_to`` or ``fed_by`` changed."""
        self.state = self._state


class RingKernelRuntime:
    """Runs ring kernels and carries their messages.

    Use it as ``async with RingKernelRuntime() as rt:``; leaving the block (or
    ``await rt.shutdown()``) terminates every kernel within the timeout and leaves no
    task or thread behind. Two runtimes share nothing.

    ``backend`` is where compiled handlers declared with ``backend="auto"`` run
    (``"auto"``: cuda when a GPU is usable, else cpu); ``async def`` actors always run
    on the host. ``default_queue_size`` applies to kernels launched from a plain
    function with no ``@ring_kernel`` configuration. With ``enable_telemetry=False``
    per-message latency is not measured and no snapshots are given
    (``get_telemetry`` returns None, ``get_all_telemetry`` ``{}``); counters are still
    kept, and ``get_summary`` totals them.

    With ``cluster`` (``"local"``, ``"auto"``, a Ray address or ``"ray://host:port"``)
    every kernel runs on a Ray actor of that cluster, placed by its ``num_gpus``,
    ``num_cpus`` and ``resources``; the API stays the same, and messages cross in
    batches (see ``docs/scale-out.md``). It needs Ray (``pip install
    "pydotcompute[ray]"``); the runtime joins the cluster on its first launch.
    """

    def __init__(
        self,
        *,
        enable_telemetry: bool = True,
        default_queue_size: int = 4096,
        backend: str = "auto",
        journal: Any = None,
        cluster: str | None = None,
    ) -> None:
        if backend != AUTO and backend_entry(backend).handler != "function":
            raise InvalidConfigurationError(
                f"runtime backend must be 'auto' or a backend of function handlers "
                f"('cpu', 'cuda' ...), got {backend!r}"
            )
        RingKernelConfig(queue_size=default_queue_size)  # validates
        self.enable_telemetry = enable_telemetry
        self.default_queue_size = default_queue_size
        self.backend = backend
        if journal is not None:
            from pydotcompute.coordinator.journal import open_journal  # the layer above

            open_journal(journal)  # a journal that cannot be written is refused now
        self.journal = journal
        self._cluster = RayCluster(cluster) if cluster is not None else None
        self._kernels: dict[str, _Kernel] = {}
        # Per-message lookups, kept by each kernel's state (see _Kernel).
        self._inputs: dict[str, tuple[Callable[[Any], bool], type | None]] = {}
        self._outputs: dict[str, Callable[[Any], Any] | None] = {}
        self._closers: list[Callable[[], Any]] = []
        self._flows: dict[str, Any] = {}
        self._metrics_server: Any = None
        self._closed = False
        self._started = False
        self._extensions: dict[str, RuntimeExtension] = {}

    def __repr__(self) -> str:
        states: dict[str, int] = {}
        for k in list(self._kernels.values()):
            states[k.state.name.lower()] = states.get(k.state.name.lower(), 0) + 1
        kernels = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
        parts = [f"backend={self.backend}", f"kernels: {kernels}"]
        if self._flows:
            parts.append(f"flows: {len(self._flows)}")
        if self.journal is not None:
            where = getattr(self.journal, "where", None) or str(self.journal)
            if "://" in where:  # never show a DSN's password
                from pydotcompute.coordinator.journal_postgres import redact

                where = redact(where)
            parts.append(f"journal {where}")
        if self._metrics_server is not None:
            parts.append(f"dashboard {self._metrics_server.dashboard_url}")
        if self._closed:
            parts.append("shut down")
        return f"<RingKernelRuntime {', '.join(parts)}>"

    # -- context manager -------------------------------------------------------------

    async def __aenter__(self) -> RingKernelRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Mark the runtime started (``async with`` does it); ``is_active`` turns True.

        Kernels may be launched without it. It starts nothing else: the runtime never
        changes the event loop. Idempotent; a runtime that was shut down cannot start
        again (``KernelStateError``).
        """
        self._check_open()
        self._started = True

    @property
    def is_active(self) -> bool:
        """True between ``start()`` (or entering ``async with``) and ``shutdown()``."""
        return self._started and not self._closed

    async def launch(
        self,
        kernel_id: str,
        kernel_func: Callable[..., Any] | None = None,
        **overrides: Any,
    ) -> KernelHandle:
        """Allocate a kernel's queues and start its handler, inactive (state LAUNCHED).

        Without ``kernel_func`` the kernel is looked up among ``@ring_kernel``
        definitions. The decorator's configuration applies either way; ``overrides``
        (``queue_size=``, ``backpressure=``, ``backend=``, ``workers=``, ``state=``,
        ``input_type=``, ``output_type=`` ...) replace single options for this launch,
        and ``config=`` (a ``RingKernelConfig``) replaces the whole configuration.
        Returns a ``KernelHandle`` on the new kernel.
        A kernel that fails to start (e.g. its handler does not compile) is kept in
        state FAILED and ``KernelFailedError`` is raised with the cause chained.
        ``restart="on-failure"`` is refused (``InvalidConfigurationError``) on a
        backend that cannot restart a handler on its queues (cuda, a Ray cluster).
        """
        self._check_open()
        old = self._kernels.get(kernel_id)
        if old is not None and not old.state.is_final:
            raise KernelAlreadyExistsError(
                f"kernel {kernel_id!r} is already launched (state {old.state.name})"
            )
        spec = self._resolve_spec(kernel_id, kernel_func, overrides)
        if old is not None and old.state is KernelState.FAILED:
            try:  # a failed actor may still be unwinding: it must be gone first
                await self.terminate(kernel_id, timeout=1.0)
            except Exception as exc:
                raise KernelStateError(
                    f"kernel {kernel_id!r} cannot be launched again: its failed "
                    f"predecessor is still running ({exc})"
                ) from exc
        restarts = old.restarts + (1 if old.state is KernelState.FAILED else 0) if old else 0
        if spec.config.restart != "never" and not self._backend_class(spec).restartable:
            where = "on a Ray cluster" if self._cluster is not None else f"on {spec.config.backend}"
            raise InvalidConfigurationError(
                f"kernel {kernel_id!r}: restart={spec.config.restart!r} is not supported "
                f"{where} (host and cpu kernels can be restarted); a kernel that fails "
                "stays FAILED, its outputs stay receivable, and launch() starts it again"
            )
        k = _Kernel(spec, restarts, self._inputs, self._outputs)
        kernel_backend = self._make_backend(spec, k)
        k.attach(kernel_backend)
        self._kernels[kernel_id] = k
        try:
            await kernel_backend.start()
        except BaseException as exc:
            # Raised to the caller, so logged below WARNING: it is told once, not twice.
            k.error = exc
            if isinstance(exc, KernelFailedError):  # the backend has explained it
                k.last_error = str(exc)
            else:
                k.last_error = f"kernel {kernel_id!r} failed to launch: {type(exc).__name__}: {exc}"
            self._fail_for_good(k, logging.INFO)
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, KernelFailedError):
                raise
            raise KernelFailedError(k.last_error, kernel_id=kernel_id) from exc
        if k.state is KernelState.CREATED:
            k.state = KernelState.LAUNCHED
        log.info("launched kernel %r on the %s backend", kernel_id, kernel_backend.backend)
        return KernelHandle(k)

    @contextlib.asynccontextmanager
    async def kernel_scope(
        self,
        kernel_id: str,
        kernel_func: Callable[..., Any] | None = None,
        **overrides: Any,
    ) -> AsyncIterator[KernelHandle]:
        """``async with rt.kernel_scope(id, func) as kernel:``: launch (as ``launch``
        does, with the same ``overrides``) and activate a kernel for the block, and
        terminate it when the block ends, however it ends."""
        handle = await self.launch(kernel_id, kernel_func, **overrides)
        launched = self._kernels[kernel_id]
        try:
            await self.activate(kernel_id)
            yield handle
        finally:
            if self._kernels.get(kernel_id) is launched:  # not replaced inside the block
                await self.terminate(kernel_id)

    async def activate(self, kernel_id: str) -> None:
        """Start delivering messages to a LAUNCHED kernel (state ACTIVE)."""
        self._transition(kernel_id, KernelState.ACTIVE, from_states=(KernelState.LAUNCHED,))

    async def deactivate(self, kernel_id: str) -> None:
        """Stop delivering messages (state DEACTIVATED); sends keep queueing."""
        self._transition(kernel_id, KernelState.DEACTIVATED, from_states=(KernelState.ACTIVE,))

    async def reactivate(self, kernel_id: str) -> None:
        """Resume delivery to a DEACTIVATED kernel; queued messages arrive in order."""
        self._transition(kernel_id, KernelState.ACTIVE, from_states=(KernelState.DEACTIVATED,))

    def _transition(
        self, kernel_id: str, target: KernelState, from_states: tuple[KernelState, ...]
    ) -> None:
        k = self._get(kernel_id)
        if k.state is KernelState.FAILED:
            raise self._failed_error(k)
        # While it restarts, a kernel is where its restart will return it to.
        restarting = k.state is KernelState.RESTARTING
        current = k.resume if restarting else k.state
        if current not in from_states:
            raise KernelStateError(
                f"kernel {kernel_id!r} cannot go from {current.name} to {target.name} "
                f"(allowed from {', '.join(s.name for s in from_states)})"
            )
        check_transition(kernel_id, current, target)
        if restarting:
            k.resume = target  # applied by the restart
            return
        k.kernel_backend.set_active(target is KernelState.ACTIVE)
        k.state = target

    async def terminate(self, kernel_id: str, timeout: float = 5.0) -> None:
        """Ask a kernel to exit and wait for it (state TERMINATED).

        Messages still queued are discarded and counted as dropped; the message the
        actor holds is finished and its outputs stay readable. A kernel that does not
        exit within ``timeout`` s is cancelled. Terminating a TERMINATED kernel does
        nothing; a FAILED kernel keeps its state and has its resources released; a
        RESTARTING one is not restarted. A second call (or ``shutdown``) waits for the
        stop already under way, and cancelling a call does not cancel the stop.
        """
        k = self._get(kernel_id)
        if k.state is KernelState.TERMINATED:
            return
        task = k.stop_task
        if task is None or (task.done() and k.state is KernelState.FAILED):
            if k.state is not KernelState.FAILED:
                check_transition(kernel_id, k.state, KernelState.TERMINATING)
                k.state = KernelState.TERMINATING
                if k.restart_task is not None:
                    k.restart_task.cancel()
            task = k.stop_task = asyncio.get_running_loop().create_task(
                self._stop(k, timeout), name=f"pydotcompute-stop-{kernel_id}"
            )
        await asyncio.shield(task)

    async def _stop(self, k: _Kernel, timeout: float) -> None:
        if k.restart_task is not None:  # cancelled by terminate: let it unwind first
            await asyncio.gather(k.restart_task, return_exceptions=True)
        try:
            await k.kernel_backend.stop(timeout)
        except Exception as exc:
            if not k.state.is_final:
                k.error, k.failed_input = exc, None
                k.last_error = f"kernel {k.kernel_id!r} did not stop cleanly: {exc}"
                self._fail_for_good(k, logging.ERROR)
            raise
        finally:
            if k.replies is not None:
                await k.replies.close()
            await self._cut_links(k)
        if k.state is KernelState.TERMINATING:
            k.state = KernelState.TERMINATED
            log.info("terminated kernel %r", k.kernel_id)

    # -- links (compiled kernels feeding each other without the host) ---------------

    async def link(self, producer: str, consumer: str) -> str:
        """Feed ``consumer``'s input straight from ``producer``'s compiled loop.

        Both are ``cpu`` kernels, or both ``cuda`` kernels, of this runtime (not placed
        on a cluster), running, and ``producer``'s output record dtype is
        ``consumer``'s input record dtype. From then on ``producer``'s loop places every
        output in ``consumer``'s input ring (``cpu``) or in a ring in device memory that
        ``consumer``'s loop reads (``cuda``: both loops are relaunched on it), under
        ``consumer``'s backpressure strategy (BLOCK: ``producer`` waits for room; the
        others drop or refuse and count it in that ring), with no Python per record. Outputs keep their input's ``message_id``, so ``consumer``'s reply
        correlates with the message sent to ``producer``. Outputs ``producer`` had
        queued move to ``consumer`` first, in order. While linked, sends to
        ``consumer`` and receives from ``producer`` raise ``KernelLinkError``; chains
        (``a`` to ``b``, ``b`` to ``c``) are allowed, cycles are not. Terminating
        either kernel, or ``unlink``, ends the link. Returns where the records go, in
        words (for ``cuda``: device memory of the GPU, peer memory between two GPUs, or
        pinned host memory between two GPUs without peer access). Raises
        ``KernelLinkError`` naming the kernels when they cannot be linked.
        """
        self._check_open()
        a, b = self._get(producer), self._get(consumer)
        why = self._link_problem(a, b)
        if why is not None:
            raise KernelLinkError(f"cannot link kernel {producer!r} to {consumer!r}: {why}")
        a.link_to, b.fed_by = b, a
        a.relinked()
        b.relinked()
        try:
            # Cancelling this call leaves the re-pointing to finish (and the link made).
            await a.kernel_backend.relink_output(b.kernel_backend)
        except Exception:
            a.link_to, b.fed_by = None, None
            a.relinked()
            b.relinked()
            raise
        path = a.kernel_backend.link_path() or "a link"
        log.info("linked kernel %r to %r through %s", producer, consumer, path)
        return path

    async def unlink(self, producer: str, consumer: str | None = None) -> None:
        """End the link from ``producer`` (to ``consumer``, when given, which must be the
        kernel it feeds): its workers finish the batch in hand, placing its outputs in
        the linked ring, and send later outputs to its own output ring again. What the
        linked ring holds stays there for its kernel. Raises ``KernelLinkError`` when
        there is no such link."""
        a = self._get(producer)
        b = a.link_to
        if b is None or (consumer is not None and b.kernel_id != consumer):
            to = "any kernel" if consumer is None else repr(consumer)
            raise KernelLinkError(f"kernel {producer!r} is not linked to {to}")
        await self._unlink(a, b)

    @property
    def links(self) -> dict[str, str]:
        """The links in place: producer id to consumer id."""
        return {
            kid: k.link_to.kernel_id for kid, k in self._kernels.items() if k.link_to is not None
        }

    async def _unlink(self, a: _Kernel, b: _Kernel) -> None:
        try:
            if a.state in _SENDABLE and not a.kernel_backend._stopped:
                await a.kernel_backend.relink_output(None)
        finally:
            if a.link_to is b:
                a.link_to, b.fed_by = None, None
                a.relinked()
                b.relinked()
                log.info("unlinked kernel %r from %r", a.kernel_id, b.kernel_id)

    async def _cut_links(self, k: _Kernel) -> None:
        """A kernel stopped: links from and to it end (what a stopped consumer's ring
        holds, or what its producer still places there, is discarded and counted)."""
        if k.link_to is not None:
            b = k.link_to
            k.link_to, b.fed_by = None, None
            k.relinked()
            b.relinked()
        if k.fed_by is not None:
            await self._unlink(k.fed_by, k)

    @staticmethod
    def _link_problem(a: _Kernel, b: _Kernel) -> str | None:
        """Why ``a`` cannot be linked to ``b``, or None."""
        if a is b:
            return "a kernel cannot feed itself"
        for k in (a, b):
            if k.kernel_backend.placement is not None:
                return f"{k.kernel_id!r} is placed on a cluster (links join kernels of one process)"
            if k.state not in _RUNNING:
                return f"{k.kernel_id!r} is {k.state.name}"
        refusal = a.kernel_backend.link_refusal(b.kernel_backend)
        if refusal is not None:
            return refusal
        if a.link_to is not None:
            return f"{a.kernel_id!r} already feeds {a.link_to.kernel_id!r}"
        if b.fed_by is not None:
            return f"{b.kernel_id!r} is already fed by {b.fed_by.kernel_id!r}"
        c: _Kernel | None = b
        while c is not None:
            if c is a:
                return "the link would close a cycle"
            c = c.link_to
        return None

    @staticmethod
    def _link_refusal(k: _Kernel, what: str) -> KernelLinkError | None:
        """The error for a send to a linked consumer or a receive from a producer."""
        kid = k.kernel_id
        if what == "send to" and k.fed_by is not None:
            src = k.fed_by.kernel_id
            return KernelLinkError(
                f"kernel {kid!r} is fed by kernel {src!r} through a link: send to {src!r}, "
                f"or rt.unlink({src!r}) first"
            )
        if what == "receive from" and k.link_to is not None:
            dst = k.link_to.kernel_id
            return KernelLinkError(
                f"kernel {kid!r} sends its outputs to kernel {dst!r} through a link: "
                f"receive from {dst!r}, or rt.unlink({kid!r}) first"
            )
        return None

    async def terminate_all(self, timeout: float = 10.0) -> None:
        """Terminate every kernel concurrently within ``timeout`` seconds."""
        ids = [kid for kid, k in self._kernels.items() if k.state is not KernelState.TERMINATED]
        results = await asyncio.gather(
            *(self.terminate(kid, timeout=timeout) for kid in ids), return_exceptions=True
        )
        for kid, res in zip(ids, results, strict=True):
            if isinstance(res, BaseException):
                log.error("kernel %r did not terminate cleanly: %r", kid, res)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Terminate all kernels and close everything the runtime started.

        Returns within about ``timeout`` seconds even when actors wait in ``receive()``
        without a timeout. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        for close in reversed(self._closers):
            try:
                res = close()
                if inspect.isawaitable(res):
                    await asyncio.wait_for(res, max(0.1, deadline - time.monotonic()))
            except Exception:
                log.exception("error while closing %r during shutdown", close)
        self._closers.clear()
        await self.terminate_all(timeout=max(0.1, deadline - time.monotonic()))
        if self._cluster is not None:
            await self._cluster.close()

    async def deploy(self, graph: Any, *, name: str, **options: Any) -> Any:
        """Run a coordinator graph on this runtime; see ``pydotcompute.coordinator.deploy``.

        ``journal=`` defaults to the runtime's journal; the flow closes at shutdown.
        """
        from pydotcompute.coordinator import deploy  # the layer above: imported on use

        flow = await deploy(self, graph, name=name, **options)
        self._flows[name] = flow
        return flow

    @property
    def flows(self) -> dict[str, Any]:
        """The flows deployed on this runtime, by name (a copy)."""
        return dict(self._flows)

    def get_flow_telemetry(self) -> dict[str, dict[str, int]]:
        """Counters of every flow deployed on this runtime, by flow name."""
        return {name: flow.counters() for name, flow in list(self._flows.items())}

    def get_fused_stage_telemetry(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per flow with fused stages: each fused stage's ``processed``, ``emitted`` and
        ``dropped`` records."""
        out = {}
        for name, flow in list(self._flows.items()):
            counts = flow.stage_counts()
            if counts:
                out[name] = counts
        return out

    def serve_metrics(
        self,
        port: int | None = None,
        addr: str = "127.0.0.1",
        registry: Any = None,
        *,
        actions: bool = False,
        history_interval: float | None = 1.0,
    ) -> tuple[str, int]:
        """Serve Prometheus metrics on ``/metrics`` and the dashboard on ``/`` from this
        runtime's event loop (call it there); returns the bound ``(host, port)``.

        ``port``: 9464 by default (``PYDOTCOMPUTE_METRICS_PORT`` overrides), where
        ``pydotcompute top`` and ``dashboard`` look; 0 picks a free one. ``addr``:
        loopback by default. The dashboard shows the kernels, the flows deployed here
        and the journal's flows, workflows and pending tasks, with an hour of history
        sampled every ``history_interval`` s; ``actions=True`` lets its retry buttons
        and answer forms change state. Nothing listens unless this is called; the server
        stops at shutdown. A second call returns the running server's address.
        ``registry`` may be your own ``CollectorRegistry``.
        """
        self._check_open()
        if self._metrics_server is None:
            from pydotcompute.cli.dashboard_views import RuntimeViews  # the layer above
            from pydotcompute.telemetry.server import serve_metrics

            views = RuntimeViews(self)
            self._metrics_server = serve_metrics(
                self,
                port=port,
                addr=addr,
                registry=registry,
                loop=asyncio.get_running_loop(),
                history_interval=history_interval,
                views=views,
                actions=actions,
            )
            self.add_closer(self._metrics_server.stop)
            self.add_closer(views.close)
        return self._metrics_server.address  # type: ignore[no-any-return]

    def serve_dashboard(
        self, port: int | None = None, addr: str = "127.0.0.1", *, actions: bool = False
    ) -> str:
        """Serve the live dashboard (with ``/metrics``, see ``serve_metrics``); returns
        the page's URL."""
        self.serve_metrics(port=port, addr=addr, actions=actions)
        return self._metrics_server.dashboard_url  # type: ignore[no-any-return]

    # -- workflows (pydotcompute.workflows.engine, on the runtime's journal) --

    def workflows(self) -> WorkflowEngine:
        """The ``WorkflowEngine`` on the runtime's journal (made on first use)."""
        from pydotcompute.workflows.engine import engine_for

        return engine_for(self)

    async def start_workflow(self, wf: Any, value: Any, *, key: Any = None) -> str:
        """Start a ``@workflow`` durably; idempotent per ``key``. Returns the key."""
        return await self.workflows().start(wf, value, key=key)

    async def workflow_result(self, key: Any, timeout: float | None = None) -> Any:
        """The workflow's return value once it ends (raises what it failed with)."""
        return await self.workflows().result(key, timeout)

    def workflow_status(self, key: Any) -> Any:
        """``WorkflowStatus``: state, calls recorded, the last step reached."""
        return self.workflows().status(key)

    def list_workflows(self, state: str | None = None) -> list[Any]:
        """Every workflow in the journal (only those in ``state`` if given)."""
        return self.workflows().list(state)

    async def cancel_workflow(self, key: Any, reason: str = "cancelled") -> bool:
        """Cancel a running workflow and its child workflows."""
        return await self.workflows().cancel(key, reason)

    async def restart_workflow(self, key: Any, wf: Any = None) -> None:
        """Forget what the workflow did (child records included) and run it again."""
        await self.workflows().restart(key, wf)

    async def delete_workflow(self, key: Any) -> bool:
        """Remove the workflow and its child records from the journal."""
        return await self.workflows().delete(key)

    async def resume_workflows(self, *workflows: Any) -> list[str]:
        """Resume running workflows left by a process that died; returns their keys."""
        return await self.workflows().resume(*workflows)

    def pending_tasks(self, task: Any) -> list[Any]:
        """``PendingTask`` items of a ``@task`` waiting for an answer."""
        return self.workflows().pending(task)

    async def complete_task(self, task: Any, key: str, answer: Any) -> bool:
        """Answer a pending task item; its workflow goes on. False if none is pending."""
        return await self.workflows().complete(task, key, answer)

    def add_closer(self, close: Callable[[], Any]) -> None:
        """Register something to close at shutdown (before kernels terminate)."""
        self._closers.append(close)

    # -- extensions (the layers above: workflows, ...) ------------------------------

    def attach(self, name: str, extension: RuntimeExtension) -> None:
        """Keep ``extension`` under ``name`` (replacing what was there) and close it at
        shutdown, before kernels terminate. Raises KernelStateError once shut down."""
        if not isinstance(extension, RuntimeExtension):
            raise TypeError(f"an extension has a close() method, got {type(extension).__name__}")
        self.check_open()
        self._extensions[name] = extension
        self.add_closer(extension.close)

    def extension(self, name: str) -> RuntimeExtension | None:
        """The extension attached under ``name``, or None."""
        return self._extensions.get(name)

    def watch_handler_errors(
        self, kernel_id: str, watcher: Callable[[Any, KernelFailedError], None]
    ) -> None:
        """Call ``watcher(message, error)`` each time the handler of the kernel now
        launched under ``kernel_id`` raises on ``message``: that message gets no output,
        whether the kernel then restarts or fails. ``error`` is the kernel's
        ``KernelFailedError``. The watcher ends with this launch."""
        self._get(kernel_id).error_watchers.append(watcher)

    def check_open(self) -> None:
        """Raise KernelStateError if the runtime is shut down."""
        self._check_open()

    # -- messages --------------------------------------------------------------------

    async def send(self, kernel_id: str, message: Any, timeout: float | None = None) -> None:
        """Queue ``message`` for a kernel under its backpressure strategy.

        BLOCK waits for room (``QueueFullError`` after ``timeout``), REJECT raises
        ``QueueFullError`` at once, DROP_* never wait and count what they drop.
        Allowed while LAUNCHED, ACTIVE, DEACTIVATED or RESTARTING (the message waits
        in the queue for the restarted handler).
        """
        try:
            offer, itype = self._inputs[kernel_id]
        except KeyError:
            err = self._refusal(kernel_id, "send to")
            raise err from err.__cause__
        if itype is not None and not isinstance(message, itype):
            raise TypeError(
                f"kernel {kernel_id!r} takes {itype.__name__}, got {type(message).__name__}"
            )
        if offer(message):  # queued without waiting (or dropped by its strategy)
            return
        k = self._kernels[kernel_id]
        if k._state is _ACTIVE:
            await k.kernel_backend.put(message, timeout)
        else:
            await self._wait_on(k, k.kernel_backend.put(message, timeout), timeout, "send to")

    async def receive(self, kernel_id: str, timeout: float | None = None) -> Any:
        """The kernel's next output message; ``QueueTimeoutError`` after ``timeout``.

        A FAILED kernel's outputs produced before it failed are still returned, then
        ``KernelFailedError`` is raised. On a kernel that is not active, a timeout
        error says so, and a wait without a timeout logs a warning once after
        ``INACTIVE_WAIT_WARNING_S`` seconds."""
        try:
            poll = self._outputs[kernel_id]
        except KeyError:
            err = self._refusal(kernel_id, "receive from")
            raise err from err.__cause__
        if poll is not None:
            msg = poll(_MISSING)
            if msg is not _MISSING:
                return msg
        k = self._kernels[kernel_id]
        waiting = k.kernel_backend.get(timeout)
        if k._state is _ACTIVE:
            return await waiting
        return await self._wait_on(k, waiting, timeout, "receive from")

    async def send_and_receive(
        self, kernel_id: str, message: Any, timeout: float | None = None
    ) -> Any:
        """Send one message and return the kernel's reply to it.

        Many calls may be in flight on one kernel: replies are matched to requests in
        the order the requests were sent, which is the order a kernel answers in when
        it gives one output per input. A caller that times out (``QueueTimeoutError``)
        or is cancelled keeps its place, so the reply owed to it goes to nobody. Do not
        mix with ``receive`` calls on the same kernel.
        """
        k = self._get(kernel_id)
        if k.replies is None:
            k.replies = ReplyQueue(kernel_id, lambda t: self.receive(kernel_id, t))
        replies = k.replies
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        async with replies.send_lock:
            await self.send(kernel_id, message, remaining())
            place = replies.expect()
        return await replies.wait(place, remaining(), timeout)

    async def send_batch(
        self, kernel_id: str, messages: np.ndarray | list[Any], timeout: float | None = None
    ) -> int:
        """Send many messages; returns how many were queued.

        A numpy record array goes to a ``cpu``/``cuda`` kernel's ring in one operation;
        a list is sent message by message.
        """
        if isinstance(messages, np.ndarray):
            k = self._kernels.get(kernel_id)
            if k is None or k.state not in _SENDABLE or k.fed_by is not None:
                raise self._refusal(kernel_id, "send to")
            return await k.kernel_backend.put_batch(messages, timeout)
        for m in messages:
            await self.send(kernel_id, m, timeout)
        return len(messages)

    async def receive_batch(
        self, kernel_id: str, max_items: int, timeout: float | None = None
    ) -> Any:
        """Up to ``max_items`` outputs: waits (up to ``timeout``) for the first, then
        takes what is ready. A record array from ring kernels, a list from host actors."""
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        k = self._kernels.get(kernel_id)
        if k is None or k.link_to is not None:
            raise self._refusal(kernel_id, "receive from")
        if k.state is KernelState.ACTIVE:
            return await k.kernel_backend.get_batch(max_items, timeout)
        return await self._wait_on(
            k, k.kernel_backend.get_batch(max_items, timeout), timeout, "receive from"
        )

    def read_state(self, kernel_id: str) -> np.ndarray:
        """A copy of a compiled kernel's ``state`` array, read while it runs."""
        k = self._get(kernel_id)
        return k.kernel_backend.read_state()

    # -- queries ---------------------------------------------------------------------

    def get_kernel_state(self, kernel_id: str) -> KernelState:
        """The kernel's lifecycle state."""
        return self._get(kernel_id).state

    get_state = get_kernel_state

    @property
    def kernel_ids(self) -> list[str]:
        """Ids of the kernels this runtime holds that are not TERMINATED."""
        return [kid for kid, k in self._kernels.items() if k.state is not KernelState.TERMINATED]

    @property
    def active_kernels(self) -> list[str]:
        """Ids of ACTIVE kernels."""
        return [kid for kid, k in self._kernels.items() if k.state is KernelState.ACTIVE]

    def is_kernel_active(self, kernel_id: str) -> bool:
        """True when the kernel is ACTIVE."""
        return self._get(kernel_id).state is KernelState.ACTIVE

    def get_placement(self, kernel_id: str) -> KernelPlacement | None:
        """Where a cluster kernel runs (Ray node, actor, GPUs); None without a cluster."""
        return self._get(kernel_id).kernel_backend.placement  # type: ignore[no-any-return]

    def kernel_handle(self, kernel_id: str) -> KernelHandle:
        """A live view of the kernel launched under ``kernel_id`` (what ``launch`` returned)."""
        return KernelHandle(self._get(kernel_id))

    def get_kernel_spec(self, kernel_id: str) -> RingKernelSpec:
        """What the kernel was launched with: function, message types, configuration."""
        return self._get(kernel_id).spec

    def get_error(self, kernel_id: str) -> BaseException | None:
        """The exception that made the kernel FAILED, if any."""
        return self._get(kernel_id).error

    def get_telemetry(self, kernel_id: str) -> KernelTelemetry | None:
        """A snapshot of the kernel's counters, throughput and latency; None when the
        runtime was made with ``enable_telemetry=False``."""
        k = self._get(kernel_id)
        return self._snapshot(k) if self.enable_telemetry else None

    def get_all_telemetry(self) -> dict[str, KernelTelemetry]:
        """Snapshots of every kernel the runtime holds, by id; ``{}`` when the runtime
        was made with ``enable_telemetry=False``."""
        if not self.enable_telemetry:
            return {}
        return {kid: self._snapshot(k) for kid, k in list(self._kernels.items())}

    def get_summary(self) -> dict[str, Any]:
        """Counts of kernels per state and message totals, with or without telemetry.

        ``kernels`` counts every kernel the runtime holds, ``kernel_count`` those not
        TERMINATED; ``total_messages_processed``, ``total_messages_dropped`` and
        ``total_errors`` (PyDotCompute's names) equal ``messages_processed``,
        ``messages_dropped`` and ``errors``.
        """
        tele = [self._snapshot(k) for k in list(self._kernels.values())]
        states: dict[str, int] = {}
        for t in tele:
            states[t.state] = states.get(t.state, 0) + 1
        processed = sum(t.messages_processed for t in tele)
        dropped = sum(t.messages_dropped for t in tele)
        errors = sum(t.errors for t in tele)
        return {
            "kernels": len(self._kernels),
            "states": states,
            "messages_processed": processed,
            "messages_dropped": dropped,
            "messages_rejected": sum(t.messages_rejected for t in tele),
            "errors": errors,
            "kernel_count": len(tele) - states.get(KernelState.TERMINATED.name, 0),
            "total_messages_processed": processed,
            "total_messages_dropped": dropped,
            "total_errors": errors,
        }

    def get_loop_info(self) -> dict[str, str | bool]:
        """The event loop this runtime runs on (see ``get_loop_info``); the
        ``runtime_*_installed`` keys are always False: the runtime never installs uvloop
        or an eager task factory."""
        info = get_loop_info()
        info["runtime_uvloop_installed"] = False
        info["runtime_eager_tasks_installed"] = False
        return info

    # -- internals -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise KernelStateError("the runtime is shut down")

    @staticmethod
    def _snapshot(k: _Kernel) -> KernelTelemetry:
        snap = k.kernel_backend.telemetry(k.state.name)
        if k.restarts or k.last_error is not None:
            snap = dataclasses.replace(snap, restarts=k.restarts, last_error=k.last_error)
        return snap

    def _get(self, kernel_id: str) -> _Kernel:
        k = self._kernels.get(kernel_id)
        if k is None:
            known = ", ".join(repr(x) for x in self._kernels) or "none"
            raise KernelNotFoundError(
                f"no kernel {kernel_id!r} in this runtime (launched: {known})"
            )
        return k

    async def _wait_on(
        self, k: _Kernel, waiting: Awaitable[Any], timeout: float | None, what: str
    ) -> Any:
        """Await a send or receive on a kernel that is not ACTIVE: its timeout error
        says why nothing moves, and a wait without a timeout warns once."""
        handle = None
        if timeout is None and not k.wait_warned and k.state in _IDLE:
            handle = asyncio.get_running_loop().call_later(
                INACTIVE_WAIT_WARNING_S, self._warn_idle_wait, k, what
            )
        try:
            return await waiting
        except (QueueTimeoutError, QueueFullError) as exc:
            why = self._why_idle(k)
            if why is None:
                raise
            raise type(exc)(f"{exc}; {why}") from None
        finally:
            if handle is not None:
                handle.cancel()

    @staticmethod
    def _why_idle(k: _Kernel) -> str | None:
        """Why a kernel moves no messages now, or None when it is not idle."""
        kid = k.kernel_id
        if k.state is KernelState.LAUNCHED:
            return (
                f"kernel {kid!r} is LAUNCHED but was never activated: nothing is "
                f"delivered to it until rt.activate({kid!r})"
            )
        if k.state is KernelState.DEACTIVATED:
            return (
                f"kernel {kid!r} is DEACTIVATED: nothing is delivered to it until "
                f"rt.reactivate({kid!r})"
            )
        if k.state is KernelState.RESTARTING:
            return f"kernel {kid!r} is RESTARTING after a crash ({k.error!r})"
        return None

    def _warn_idle_wait(self, k: _Kernel, what: str) -> None:
        why = self._why_idle(k)
        if why is None or k.wait_warned or k.state not in _IDLE:
            return
        k.wait_warned = True
        log.warning(
            "a call to %s kernel %r has waited %g s with no timeout: %s",
            what,
            k.kernel_id,
            INACTIVE_WAIT_WARNING_S,
            why,
        )

    def _refusal(self, kernel_id: str, what: str) -> Exception:
        """Why ``what`` (a send or a receive) is refused: no such kernel, or its state."""
        try:
            k = self._get(kernel_id)
        except KernelNotFoundError as exc:
            return exc
        link = self._link_refusal(k, what)
        if link is not None:
            return link
        if k.state is KernelState.FAILED:
            return self._failed_error(k)
        return KernelStateError(f"cannot {what} kernel {kernel_id!r} in state {k.state.name}")

    @staticmethod
    def _failed_error(k: _Kernel) -> KernelFailedError:
        text = k.last_error or f"kernel {k.kernel_id!r} failed: {k.error!r}"
        exc = KernelFailedError(text, kernel_id=k.kernel_id, failed_message=k.failed_input)
        exc.__cause__ = k.error
        return exc

    # -- supervision -----------------------------------------------------------------

    def _on_failure(self, k: _Kernel, exc: BaseException) -> None:
        """A running kernel's handler raised: restart it by its policy, or fail it.

        The message that raised is not handled again (it would likely raise again);
        it is reported: named in the log, in ``KernelFailedError.failed_message`` and
        ``get_telemetry().last_error``, and counted in ``errors``."""
        if k.state.is_final or k.state is KernelState.RESTARTING:
            return  # a second report of one crash (another worker of the same run)
        k.error = exc
        k.failed_input = k.kernel_backend.failed_input
        text = describe_crash(k.kernel_id, exc, k.spec.func, k.failed_input)
        cfg = k.spec.config
        if cfg.restart == "on-failure" and k.state in _RUNNING:
            now = time.monotonic()
            recent = [t for t in k.restart_times if now - t < cfg.restart_window]
            k.restart_times = recent
            if cfg.max_restarts < 0 or len(recent) < cfg.max_restarts:
                k.last_error = text
                if k.replies is not None and k.failed_input is not None:
                    # Outputs not yet read answer the requests before the one that
                    # raised (one reply per request): its caller is the next in line.
                    unread = k.kernel_backend.telemetry(k.state.name).output_queue_depth
                    k.replies.no_reply(unread, self._failed_error(k))
                self._schedule_restart(k, len(recent) + 1)
                self._tell_error_watchers(k)
                return
            text += (
                f"\ngave up restarting it: {len(recent)} restart(s) within the last "
                f"{cfg.restart_window:g} s (max_restarts={cfg.max_restarts})"
            )
        k.last_error = text
        self._fail_for_good(k, logging.ERROR)
        self._tell_error_watchers(k)

    def _tell_error_watchers(self, k: _Kernel) -> None:
        """After the kernel restarts or fails: the message that raised has no output."""
        if k.failed_input is None or not k.error_watchers:
            return
        error = self._failed_error(k)
        for watcher in k.error_watchers:
            watcher(k.failed_input, error)

    def _fail_for_good(self, k: _Kernel, level: int) -> None:
        """FAILED: the backend's queues close (outputs already produced stay receivable)."""
        if k.state.is_final:
            return
        check_transition(k.kernel_id, k.state, KernelState.FAILED)
        k.state = KernelState.FAILED
        discarded = k.kernel_backend.close_failed(functools.partial(self._failed_error, k))
        if discarded:
            k.last_error = f"{k.last_error}\n{discarded} queued message(s) discarded"
        log.log(level, "%s", k.last_error)
        # The whole traceback, for those who ask: the line above names the user's line.
        log.debug("traceback of kernel %r's failure", k.kernel_id, exc_info=k.error)

    def _schedule_restart(self, k: _Kernel, n: int) -> None:
        cfg = k.spec.config
        delay = cfg.restart_delay(n)
        k.restart_times.append(time.monotonic())
        check_transition(k.kernel_id, k.state, KernelState.RESTARTING)
        k.resume = k.state
        k.state = KernelState.RESTARTING
        limit = "unlimited" if cfg.max_restarts < 0 else str(cfg.max_restarts)
        log.warning(
            "%s\nrestarting it in %.3g s (restart %d of %s within %g s); queued "
            "messages wait for it",
            k.last_error,
            delay,
            n,
            limit,
            cfg.restart_window,
        )
        k.restart_task = asyncio.get_running_loop().create_task(
            self._restart(k, delay), name=f"pydotcompute-restart-{k.kernel_id}"
        )

    async def _restart(self, k: _Kernel, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await k.kernel_backend.restart()
        except Exception as exc:
            if k.state is KernelState.RESTARTING:
                k.error, k.failed_input = exc, None
                k.last_error = (
                    f"kernel {k.kernel_id!r} could not be restarted: {type(exc).__name__}: {exc}"
                )
                self._fail_for_good(k, logging.ERROR)
            return
        finally:
            k.restart_task = None
        if k.state is not KernelState.RESTARTING:
            return  # terminated meanwhile: its stop ends the restarted handler
        target = k.resume
        check_transition(k.kernel_id, KernelState.RESTARTING, target)
        k.restarts += 1
        k.state = target
        k.kernel_backend.set_active(target is KernelState.ACTIVE)
        log.info("kernel %r restarted (%d restart(s) since launch)", k.kernel_id, k.restarts)

    def _on_exit(self, k: _Kernel) -> None:
        if k.state in (KernelState.LAUNCHED, KernelState.ACTIVE, KernelState.DEACTIVATED):
            k.state = KernelState.TERMINATING
            k.state = KernelState.TERMINATED
            log.info("kernel %r returned; it is terminated", k.kernel_id)

    def _resolve_spec(
        self,
        kernel_id: str,
        func: Callable[..., Any] | None,
        overrides: dict[str, Any],
    ) -> RingKernelSpec:
        if func is None:
            spec = lookup_kernel(kernel_id)
        else:
            declared = getattr(func, "__ring_kernel__", None)
            if isinstance(declared, RingKernelSpec):
                spec = declared
            else:
                spec = RingKernelSpec(
                    kernel_id,
                    func,
                    None,
                    None,
                    RingKernelConfig(
                        queue_size=self.default_queue_size, backend=default_backend(func)
                    ),
                )
        overrides = dict(overrides)
        input_type = overrides.pop("input_type", spec.input_type)
        output_type = overrides.pop("output_type", spec.output_type)
        config = overrides.pop("config", None)
        if config is None:
            config = spec.config
        elif not isinstance(config, RingKernelConfig):
            raise InvalidConfigurationError(
                f"config must be a RingKernelConfig, got {type(config).__name__}"
            )
        config = config.replace(**overrides) if overrides else config
        # On a cluster, "auto" is left to the kernel's node (does its actor have a GPU?).
        if config.backend == "auto" and (self._cluster is None or self.backend != "auto"):
            chosen = resolve_backend(self.backend)
            log.info("kernel %r: backend 'auto' resolved to %r", kernel_id, chosen)
            config = config.replace(backend=chosen)
        check_backend_fits(kernel_id, spec.func, config.backend)
        return RingKernelSpec(kernel_id, spec.func, input_type, output_type, config)

    def _backend_class(self, spec: RingKernelSpec) -> type[KernelBackend]:
        """The class that will run ``spec``: the cluster's placement, or its backend's."""
        if self._cluster is not None:
            return self._cluster.backend_class()
        return backend_class(spec.config.backend)

    def _make_backend(self, spec: RingKernelSpec, k: _Kernel) -> KernelBackend:
        """The backend object of kernel record ``k``, told how to report to it."""
        links: dict[str, Any] = {
            "send_to": self.send,
            "on_exit": functools.partial(self._on_exit, k),  # this record, not the id's latest
            "telemetry": self.enable_telemetry,
        }
        on_failure = functools.partial(self._on_failure, k)
        args = (spec.kernel_id, spec.func, spec.config, spec.input_type, spec.output_type)
        if self._cluster is not None:
            return self._cluster.kernel_backend(*args, on_failure, **links)
        return backend_class(spec.config.backend)(*args, on_failure, **links)
