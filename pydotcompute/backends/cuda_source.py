"""CUDA C++ ring kernels launched through the runtime: ``cuda_source=``.

``@ring_kernel(backend="cuda", cuda_source="stream_stats.cu",
cuda_function="pdc_stream_stats", input_type=np.dtype(np.float64))`` declares a
kernel whose device code is CUDA C++ (a file of the package's ``kernels/`` folder, or
the source text itself) compiled with NVRTC through CuPy's ``RawModule``. The
decorated Python function is only its name and documentation. It is launched once, at
``launch()``, like a numba-cuda loop, and obeys the same lifecycle.

The C++ kernel must follow this ABI (the one of ``kernels/stream_stats.cu``)::

    extern "C" __global__ void f(unsigned char* input, unsigned long long input_nbytes,
                                 unsigned long long* control,
                                 pdc::ring::SideCounters* side_counters);

with a host-to-device input ring (``docs/ring-protocol.md``; the kernel's own words
for it, 128 bytes of device memory, in ``side_counters``) and the control block of
every ring kernel (``rings.control.ControlBlock``; ``#include "control.cuh"`` for its
word indices): the host writes ``STATE`` (0 paused, 1 active, 2 terminate); the kernel
writes ``STATUS`` (1 running, 2 exited, 3 failed), ``ERROR_CODE``, ``HEARTBEAT``,
``PROCESSED``, ``IDLE_POLLS`` and its results from ``RESULTS`` on under a sequence
lock (``RESULTS_SEQ``, odd while writing). Such a kernel has no output ring:
``read_state()`` returns its result words (``uint64``; view them as the kernel
documents, e.g. ``.view(np.float64)``) read consistently under the lock.

Options (``CudaOptions``): ``cuda_source``, ``cuda_function`` (required),
``threads`` (block size, default 256) and ``blocks`` (grid, default 1; a kernel that
needs all its blocks resident must be given a grid that fits).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np

from pydotcompute.backends.base import (
    ErrorFactory,
    FailureCallback,
    KernelBackend,
    kernel_record_dtype,
    renamed,
)
from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.backends.options import CudaOptions
from pydotcompute.errors import (
    BackendNotAvailableError,
    InvalidConfigurationError,
    KernelFailedError,
    KernelStateError,
    QueueFullError,
)
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.rings.control import ControlBlock
from pydotcompute.rings.host_ring import Backoff, HostRing, ring_capacity_for
from pydotcompute.rings.layout import RingSide, ring_nbytes
from pydotcompute.telemetry.snapshot import KernelTelemetry

__all__ = ["CudaSourceKernelBackend", "SourceControl"]

__getattr__ = renamed(
    __name__, {"CudaSourceKernelLoop": "CudaSourceKernelBackend"}
)  # the former names, deprecated


class SourceControl:
    """Word indices of a C++ ring kernel's control block: ``ControlBlock``'s layout."""

    COMMAND = ControlBlock.STATE // 8
    STATUS = ControlBlock.STATUS // 8
    ERROR = ControlBlock.ERROR_CODE // 8
    HEARTBEAT = ControlBlock.HEARTBEAT // 8
    PROCESSED = ControlBlock.PROCESSED // 8
    IDLE_POLLS = ControlBlock.IDLE_POLLS // 8
    SEQ = ControlBlock.RESULTS_SEQ // 8
    RESULTS = ControlBlock.RESULTS // 8
    NWORDS = ControlBlock.NBYTES // 8

    PAUSED = ControlBlock.INACTIVE
    ACTIVE = ControlBlock.ACTIVE
    TERMINATE = ControlBlock.TERMINATE
    RUNNING = ControlBlock.STATUS_RUNNING
    EXITED = ControlBlock.STATUS_EXITED
    FAILED = ControlBlock.STATUS_FAILED


_W = SourceControl
_SIDE_COUNTER_BYTES = 128  # pdc::ring::SideCounters: the device side's words of a ring


def _source_text(source: str) -> str:
    if "__global__" in source:
        return source
    from pydotcompute.backends.kernel_sources import read_kernel_source

    return read_kernel_source(source)


class CudaSourceKernelBackend(KernelBackend):
    """A CUDA C++ ring kernel (see the module documentation for its ABI)."""

    backend = "cuda"
    records = True

    def __init__(
        self,
        kernel_id: str,
        func: Callable[..., Any],
        config: RingKernelConfig,
        input_type: type | None,
        output_type: type | None,
        on_failure: FailureCallback,
        **links: Any,
    ) -> None:
        super().__init__(kernel_id, func, config, input_type, output_type, on_failure, **links)
        options = config.options_for(CudaOptions)
        self.function = options.cuda_function
        if not isinstance(self.function, str) or not self.function:
            raise InvalidConfigurationError(
                f"kernel {kernel_id!r}: cuda_source needs cuda_function, the name of the "
                'extern "C" __global__ function to launch'
            )
        from pydotcompute.device.probe import probe_cuda

        self.in_dtype = kernel_record_dtype(input_type, "input", kernel_id, "cuda")
        self.source = _source_text(str(options.cuda_source))
        self.threads = options.threads or 256
        self.blocks = options.blocks or 1
        found = probe_cuda()
        if not found.usable:
            why = found.reason
            if found.simulator:
                why = "the numba-cuda simulator runs numba-cuda code only, not CUDA C++"
            raise BackendNotAvailableError(
                f"kernel {kernel_id!r} is CUDA C++ and needs a usable GPU: {why}"
            )
        from pydotcompute.memory.cuda_guard import import_cupy

        self._cp = import_cupy()
        self.in_ring: HostRing | None = None
        self.control = np.zeros(_W.NWORDS, np.uint64)  # the mapped block from start()
        self._stream: Any = None
        self._event: Any = None
        self._monitor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cp = self._cp
        cfg = self.config
        capacity = ring_capacity_for(cfg.queue_size)
        nbytes = ring_nbytes(capacity, self.in_dtype.itemsize, crossing=True)
        self._in_mem = cp.cuda.alloc_pinned_memory(nbytes)
        buf = np.frombuffer(self._in_mem, np.uint8, nbytes)
        buf[:] = 0
        self.in_ring = HostRing(
            capacity,
            self.in_dtype,
            backpressure=cfg.backpressure,
            buffer=buf,
            producer_side=RingSide.HOST,
            consumer_side=RingSide.DEVICE,
        )
        self._ctl_mem = cp.cuda.alloc_pinned_memory(_W.NWORDS * 8)
        self.control = np.frombuffer(self._ctl_mem, np.uint64, _W.NWORDS)
        self.control[:] = 0
        self._side = cp.zeros(_SIDE_COUNTER_BYTES // 8, cp.uint64)
        try:
            module = await asyncio.to_thread(
                lambda: cp.RawModule(code=self.source, options=("--std=c++17",))
            )
            kernel = module.get_function(self.function)
            # Held for the kernel's life: unloading a module under a running kernel
            # would pull its code away.
            self._module, self._kernel = module, kernel
        except Exception as exc:
            err = KernelFailedError(
                f"CUDA C++ kernel {self.function!r} of {self.kernel_id!r} does not build: {exc}"
            )
            self.failure = err
            raise err from exc
        self._stream = cp.cuda.Stream(non_blocking=True)  # never waits on stream 0
        args = (
            np.uint64(self._in_mem.ptr),  # under unified addressing the host pointer
            np.uint64(nbytes),  # of pinned memory is valid on the device
            np.uint64(self._ctl_mem.ptr),
            self._side,
        )
        kernel((self.blocks,), (self.threads,), args, stream=self._stream)
        self._event = event = cp.cuda.Event(disable_timing=True)
        event.record(self._stream)
        from pydotcompute.device.resident import launched

        launched(self, self.kernel_id, cp.cuda.Device().id, lambda: bool(event.done))
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    def _status(self) -> int:
        return int(self.control[_W.STATUS])

    def _device_error(self) -> BaseException | None:
        if self._status() == _W.FAILED:
            return KernelFailedError(
                f"CUDA C++ kernel {self.kernel_id!r} failed with error "
                f"{int(self.control[_W.ERROR])} (see its source for the codes)"
            )
        return None

    async def _watch(self) -> None:
        while not self._stopped:
            try:
                done = bool(self._event.done)
                err = self._device_error()
            except Exception as exc:  # a CUDA error on the kernel's stream
                done, err = True, exc
            if err is None and done and not self._stopped:
                err = KernelFailedError(f"CUDA C++ kernel {self.kernel_id!r} exited on its own")
            if err is not None:
                self._fail(err)
                return
            await asyncio.sleep(0.005)

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            self.control[_W.COMMAND] = _W.TERMINATE
            self.on_failure(exc)

    def close_failed(self, error: ErrorFactory) -> int:
        # It has refused input since its fault (see _fail); nothing else is queued here.
        return 0

    def set_active(self, active: bool) -> None:
        if self.failure is None and not self._stopped:
            self._track_active(active)
            self.control[_W.COMMAND] = _W.ACTIVE if active else _W.PAUSED

    async def stop(self, timeout: float) -> None:
        self._stopped = True
        self.active_time.pause()
        if self._event is None:
            return
        self.control[_W.COMMAND] = _W.TERMINATE
        fault: BaseException | None = None

        def gone() -> bool:
            nonlocal fault
            try:
                return bool(self._event.done)
            except Exception as exc:  # a CUDA error on the kernel's stream
                fault = exc
                return True

        await self._wait_exit(gone, timeout, "its CUDA C++ kernel does not return")
        if self._monitor is not None:
            self._monitor.cancel()
        if fault is None:
            self._stream.synchronize()
            fault = self._device_error()
        from pydotcompute.device.resident import exited

        exited(self)  # the kernel is gone: frees held while it ran may run now
        if fault is not None:
            self._fail(fault)

    async def put(self, msg: Any, timeout: float | None) -> None:
        rec = np.asarray(msg, self.in_dtype).reshape(-1)
        if await self.put_batch(rec, timeout) == 0 and (
            self.config.backpressure is BackpressureStrategy.REJECT
        ):
            raise QueueFullError(f"input ring of {self.kernel_id!r} is full: rejected")

    async def put_batch(self, records: np.ndarray, timeout: float | None) -> int:
        self._check_open()
        assert self.in_ring is not None
        if not isinstance(records, np.ndarray) or records.dtype != self.in_dtype:
            raise TypeError(f"kernel {self.kernel_id!r} takes records of dtype {self.in_dtype}")
        records = np.ascontiguousarray(records.reshape(-1))
        if self.config.backpressure is not BackpressureStrategy.BLOCK:
            return self.in_ring.push_batch(records, timeout)
        placed = self.in_ring.try_push_batch(records)
        wait = Backoff(timeout)
        while placed < len(records):
            self._check_open()
            if wait.expired():
                raise QueueFullError(
                    f"input ring of {self.kernel_id!r} stayed full for {timeout} s: "
                    f"{placed} of {len(records)} record(s) accepted"
                )
            await asyncio.sleep(wait.pause())
            placed += self.in_ring.try_push_batch(records[placed:])
        return placed

    async def get(self, timeout: float | None) -> Any:
        raise TypeError(
            f"CUDA C++ kernel {self.kernel_id!r} has no output ring; read its results "
            "with read_state()"
        )

    def read_state(self) -> np.ndarray:
        """The kernel's result words (from ``RESULTS`` of the control block), read under its
        sequence lock: retried while the kernel is rewriting them."""
        for _ in range(100000):
            seq = int(self.control[_W.SEQ])
            words = self.control[_W.RESULTS : _W.NWORDS].copy()
            if seq % 2 == 0 and int(self.control[_W.SEQ]) == seq:
                return words
        raise KernelStateError(f"kernel {self.kernel_id!r} kept rewriting its results")

    def telemetry(self, state: str) -> KernelTelemetry:
        inc = self.in_ring.counters() if self.in_ring is not None else None
        return self._telemetry(
            state,
            int(self.control[_W.PROCESSED]),
            messages_dropped=inc.dropped if inc else 0,
            messages_rejected=inc.rejected if inc else 0,
            errors=1 if self.failure is not None else 0,
            queue_depth=inc.depth if inc else 0,
            queue_capacity=inc.capacity if inc else 0,
            idle_polls=int(self.control[_W.IDLE_POLLS]),
        )
