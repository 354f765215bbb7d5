"""The far side of a kernel placed on a Ray cluster: one ``KernelBackend`` in a Ray actor.

``RayKernelBackend`` (the caller's side) starts one ``KernelActor`` per kernel. The actor
runs the kernel's real backend (``cpu``, ``cuda`` or ``host``) on its own event loop and
moves whole batches: records as numpy arrays, which Ray carries through its object
store, and a host actor's messages as lists. The lifecycle state machine stays with
the caller's runtime; the actor follows its calls and reports a crash through
``watch``.

This module does not import Ray: ``RayCluster`` turns the class into a Ray actor class
when a runtime first needs one, so the package imports without Ray installed.
"""

from __future__ import annotations

import asyncio
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
    KernelNotFoundError,
    QueueFullError,
    QueueTimeoutError,
)
from pydotcompute.telemetry.snapshot import KernelTelemetry

__all__ = ["KernelActor"]


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
        self._crashed.set()

    async def _send_to(self, kernel_id: str, msg: Any, timeout: float | None) -> None:
        raise KernelNotFoundError(
            f"kernel {kernel_id!r} is not reachable from a kernel placed on a Ray actor: "
            "route messages between cluster kernels with the coordinator"
        )

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
        try:
            pickle.dumps(exc)
        except Exception:
            return RuntimeError(f"{type(exc).__name__}: {exc}")
        return exc

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
        try:
            state: np.ndarray | None = kernel_backend.read_state()
        except TypeError:  # a backend without a state array (host actors)
            state = None
        return await kernel_backend.drain_outputs(), kernel_backend.telemetry("TERMINATED"), state

    def telemetry(self, state: str) -> KernelTelemetry:
        return self._kernel.telemetry(state)

    def read_state(self) -> np.ndarray:
        return self._kernel.read_state()
