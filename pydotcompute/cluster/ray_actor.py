"""The far side of a kernel placed on a Ray cluster: one ``KernelBackend`` in a Ray actor.

``RayKernelBackend`` (the caller's side) starts one ``KernelActor`` per kernel. The actor
runs the kernel's real backend (``cpu``, ``cuda`` or ``host``) on its own event loop and
moves whole batches: records as numpy arrays, which Ray carries through its object
store, and a host actor's messages as lists. The lifecycle state machine stays with
the caller's runtime; the actor follows its calls and reports a crash through
``watch``.

A host actor's ``ctx.send_to`` reaches the runtime's other kernels through the driver:
the message waits in the actor's bounded outbox, which the driver's side
(``RayKernelBackend``) long-polls with ``outbox`` and delivers from with the runtime's
``send``, in order. The first message to each target waits for its delivery, so a
target the runtime does not know fails that ``send_to`` at once; a later delivery that
fails is raised by the sender's next ``send_to``.

This module does not import Ray: ``RayCluster`` turns the class into a Ray actor class
when a runtime first needs one, so the package imports without Ray installed.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from pydotcompute.backends.base import KernelBackend, kernel_failed
from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.backends.registry import backend_class, resolve_backend
from pydotcompute.errors import (
    KernelStateError,
    QueueFullError,
    QueueTimeoutError,
)
from pydotcompute.telemetry.snapshot import KernelTelemetry

__all__ = ["RELAY_BATCH", "KernelActor", "OutboxItem", "picklable"]

RELAY_BATCH = 1024
"""Most messages one ``outbox`` call hands over."""

OutboxItem = tuple[int, str, Any, float | None, bool]
"""One message for the driver to deliver: sequence number, target kernel, message,
the sender's timeout, and whether the sender waits for the delivery's outcome."""


def picklable(exc: BaseException) -> BaseException:
    """``exc``, or its text in a ``RuntimeError`` when it does not pickle."""
    try:
        pickle.dumps(exc)
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


class KernelActor:
    """Hosts one kernel's backend in a Ray actor process; every method is one Ray call.

    Compiled kernels are given their record dtypes, not their message classes, so only
    the handler has to be importable (or picklable) on the node.
    """

    def __init__(
        self,
        kernel_id: str,
        func: Callable[..., Any],
        config: RingKernelConfig,
        input_type: Any,
        output_type: Any,
    ) -> None:
        self._args = (kernel_id, func, config, input_type, output_type)
        self._backend: KernelBackend | None = None
        self._crashed: asyncio.Event | None = None
        self._failure: BaseException | None = None
        # The relay outbox (see the module): at most queue_size messages wait here.
        self._outbox: collections.deque[OutboxItem] = collections.deque()
        self._outbox_room: asyncio.Event | None = None
        self._outbox_ready: asyncio.Event | None = None
        self._outbox_closed = False  # the handler is over: what is queued is all there is
        self._next_seq = 0
        self._confirming: dict[int, asyncio.Future[None]] = {}
        self._reachable: set[str] = set()  # targets a delivery has reached
        self._relay_error: BaseException | None = None

    def __repr__(self) -> str:
        # Ray records this name with the actor: what another driver's failed placement
        # names as holding the resources it waited for.
        return f"KernelActor({self._args[0]!r})"

    def placed(self) -> None:
        """Answers as soon as the actor runs: it has its resources and its process."""

    async def start(self) -> dict[str, Any]:
        """Start the backend, inactive; returns where it runs (``KernelPlacement`` fields)."""
        import ray  # present: this runs inside a Ray worker

        kernel_id, func, config, input_type, output_type = self._args
        backend = resolve_backend(config.backend)  # "auto" means this node's GPU, if any
        config = config.replace(backend=backend)
        self._crashed = asyncio.Event()
        self._outbox_room = asyncio.Event()
        self._outbox_ready = asyncio.Event()
        # A host actor that returns on its own ends the kernel: ``watch`` says so.
        kernel_backend = backend_class(backend)(
            kernel_id,
            func,
            config,
            input_type,
            output_type,
            self._on_failure,
            send_to=self._send_to,
            on_exit=self._crashed.set,
        )
        self._backend = kernel_backend
        await kernel_backend.start()
        ctx = ray.get_runtime_context()
        gpus = ctx.get_accelerator_ids().get("GPU", [])
        return {
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "actor_id": ctx.get_actor_id(),
            "pid": os.getpid(),
            "gpu_ids": tuple(str(g) for g in gpus),
            "backend": backend,
        }

    def _on_failure(self, exc: BaseException) -> None:
        self._failure = exc
        assert self._crashed is not None
        if self._backend is not None:  # no supervision here: the kernel is over
            self._backend.close_failed(functools.partial(kernel_failed, self._args[0], exc))
        self._close_outbox()
        self._crashed.set()

    def _close_outbox(self) -> None:
        self._outbox_closed = True
        if self._outbox_ready is not None:
            self._outbox_ready.set()  # a waiting ``outbox`` call answers now

    async def _send_to(self, kernel_id: str, msg: Any, timeout: float | None) -> None:
        """Queue ``msg`` for the driver to deliver to ``kernel_id`` (see the module);
        waits for room while the outbox is full (``QueueFullError`` after ``timeout``)."""
        if self._relay_error is not None:
            error, self._relay_error = self._relay_error, None
            raise error
        if self._outbox_closed:
            raise KernelStateError(f"kernel {self._args[0]!r} has stopped: send_to refused")
        room, ready = self._outbox_room, self._outbox_ready
        assert room is not None and ready is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while len(self._outbox) >= self._args[2].queue_size:
            room.clear()
            left = None if deadline is None else deadline - loop.time()
            try:
                if left is not None and left <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(room.wait(), left)
            except asyncio.TimeoutError:
                raise QueueFullError(
                    f"the relay outbox of {self._args[0]!r} stayed full for {timeout} s"
                ) from None
        self._next_seq += 1
        seq = self._next_seq
        confirm = kernel_id not in self._reachable
        self._outbox.append((seq, kernel_id, msg, timeout, confirm))
        ready.set()
        if confirm:
            answer: asyncio.Future[None] = loop.create_future()
            self._confirming[seq] = answer
            await answer
            self._reachable.add(kernel_id)

    async def outbox(
        self, wait_s: float, results: list[tuple[int, str, BaseException | None]]
    ) -> tuple[list[OutboxItem], bool]:
        """Take the outcomes of the last deliveries, then hand over up to ``RELAY_BATCH``
        queued messages, waiting up to ``wait_s`` for the first. Also says whether the
        outbox is closed: once it is, an empty answer means nothing more will come."""
        for seq, target, error in results:
            answer = self._confirming.pop(seq, None)
            if answer is not None:
                if not answer.done():
                    if error is None:
                        answer.set_result(None)
                    else:
                        answer.set_exception(error)
            elif error is not None:
                self._reachable.discard(target)
                if self._relay_error is None:  # the first failure is the one to report
                    self._relay_error = error
        ready, room = self._outbox_ready, self._outbox_room
        assert ready is not None and room is not None
        if not self._outbox and not self._outbox_closed:
            ready.clear()
            try:
                await asyncio.wait_for(ready.wait(), wait_s)
            except asyncio.TimeoutError:
                return [], self._outbox_closed  # nothing came: the driver asks again
        n = min(len(self._outbox), RELAY_BATCH)
        items = [self._outbox.popleft() for _ in range(n)]
        if n:
            room.set()
        return items, self._outbox_closed

    @property
    def _kernel(self) -> KernelBackend:
        assert self._backend is not None, "start() comes first"
        return self._backend

    async def watch(self) -> BaseException | None:
        """Returns when the kernel ends on its own: the exception it failed with, or None
        when a host actor returned. Exceptions that do not pickle come back as text."""
        assert self._crashed is not None
        await self._crashed.wait()
        exc = self._failure
        if exc is None:
            return None
        return picklable(exc)

    def set_active(self, active: bool) -> None:
        self._kernel.set_active(active)

    async def put(self, batch: Any, timeout: float | None) -> int:
        """Enqueue a record array or a list of messages, in order; returns how many the
        kernel's backpressure strategy accepted."""
        kernel_backend = self._kernel
        if isinstance(batch, np.ndarray):
            return await kernel_backend.put_batch(batch, timeout)
        for i, msg in enumerate(batch):
            try:
                if not kernel_backend.try_put(msg):
                    await kernel_backend.put(msg, timeout)
            except QueueFullError:
                if i == 0:
                    raise
                return i
        return len(batch)

    async def get(self, max_items: int, wait_s: float) -> Any:
        """Up to ``max_items`` outputs, waiting up to ``wait_s`` for the first: a record
        array (empty when none came) or a list of messages."""
        kernel_backend = self._kernel
        try:
            return await kernel_backend.get_batch(max_items, wait_s)
        except QueueTimeoutError:
            return np.empty(0, kernel_backend.out_dtype) if kernel_backend.records else []  # type: ignore[attr-defined]

    async def stop(self, timeout: float) -> tuple[Any, KernelTelemetry, np.ndarray | None]:
        """Stop the backend; returns the outputs still queued, the final counters and the
        state array, all of which go away with the actor."""
        kernel_backend = self._kernel
        await kernel_backend.stop(timeout)
        self._close_outbox()  # the driver still collects what the handler queued
        try:
            state: np.ndarray | None = kernel_backend.read_state()
        except TypeError:  # a backend without a state array (host actors)
            state = None
        return await kernel_backend.drain_outputs(), kernel_backend.telemetry("TERMINATED"), state

    def telemetry(self, state: str) -> KernelTelemetry:
        return self._kernel.telemetry(state)

    def read_state(self) -> np.ndarray:
        return self._kernel.read_state()
