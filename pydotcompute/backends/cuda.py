"""The ``cuda`` backend, host side: a compiled handler run by one persistent GPU kernel.

(A kernel declared with ``cuda_source=`` runs CUDA C++ instead: see ``cuda_source``.)

``launch()`` allocates the input ring (host → device) and the output ring (device →
host) in mapped pinned host memory, the control block beside them, the handler's
``state`` and the kernel's own words in device memory, compiles the loop of
``pydotcompute.backends.cuda_loop`` once per kernel type and launches it once, on a
stream of its own. From then on the host only touches memory: it pushes and pops
records with ``HostRing`` on the mapped rings, flips the state word of the control
block to activate, pause or terminate, and reads counters from it. No kernel is
launched per message or per batch.

Output order: FIFO with respect to the input ring (see ``cuda_loop``).

Options (``CudaOptions``, ``@ring_kernel(options=CudaOptions(...))``): ``threads`` (block size, default 128; 4 under
the simulator), ``items_per_thread`` (records one thread handles per round, default
4; 2 under the simulator: a block claims up to ``threads * items_per_thread``
records at once, fewer when they do not fit its staging in shared memory),
``blocks`` (upper bound on the grid, default 1; the grid is the smaller of this, the
number of SMs and what the occupancy calculator says fits at once: extra blocks add
compute, never pollers) and ``idle_sleep_ns`` (longest ``nanosleep`` of an idle
agent, default 4000).

Under the numba-cuda simulator (``NUMBA_ENABLE_CUDASIM=1``) the same loop runs on a
host thread (the simulator launches synchronously), with one block.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from pydotcompute.backends.base import FailureCallback, kernel_record_dtype, renamed
from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.backends.handler_errors import check_handler_source, compile_error
from pydotcompute.backends.options import CudaOptions
from pydotcompute.backends.ring_fed import RingFedBackend
from pydotcompute.backends.wakeup import OutputWatcher, ReplyWakeup
from pydotcompute.errors import (
    BackendNotAvailableError,
    KernelFailedError,
)
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.rings.control import ControlBlock
from pydotcompute.rings.host_ops import ring_word
from pydotcompute.rings.host_ring import HostRing, ring_capacity_for
from pydotcompute.rings.layout import (
    HEADER_SIZE,
    OFF_RELEASED,
    TAG_SIZE,
    RingSide,
    ring_nbytes,
    slot_size_for,
)
from pydotcompute.telemetry.snapshot import KernelTelemetry

__all__ = ["CudaKernelBackend", "MappedRing", "MappedControl", "require_cuda_backend"]

__getattr__ = renamed(
    __name__, {"CudaKernelLoop": "CudaKernelBackend"}
)  # the former names, deprecated

_MONITOR_PERIOD_S = 0.005
_DEFAULT_MAX_BLOCKS = 1
"""One block by default: it alone polls host memory (as the agent would in any grid),
and an idle kernel then holds one SM's worth of resources at most. More blocks add
compute for heavy handlers and large batches; they never add pollers."""


def require_cuda_backend() -> bool:
    """Check that the ``cuda`` backend can run here; True under the simulator.

    Raises ``BackendNotAvailableError`` with the reason otherwise."""
    from pydotcompute.device.probe import require_cuda

    found = require_cuda(allow_simulator=True)
    return bool(found.simulator)


def device_state(state: Any) -> np.ndarray:
    """A kernel's ``state`` as the device gets it: a copy, 1-d with at least one element
    to point at (zeros(1) for none)."""
    arr = np.zeros(1, np.float64) if state is None else np.array(state, copy=True)
    if arr.ndim == 0 or arr.size == 0:
        arr = arr.reshape(-1) if arr.size else np.zeros(1, arr.dtype)
    return arr


def _cuda() -> Any:
    from numba import cuda

    return cuda


def _simulator() -> bool:
    from pydotcompute.rings.device import SIMULATOR

    return SIMULATOR


def _non_blocking_stream() -> Any:
    """A stream that does not synchronise with the legacy default stream.

    A persistent kernel never finishes while it runs, so anything issued on the
    legacy default stream (CuPy's and numba's default) after it would wait for it
    forever if the kernel's stream were an ordinary, blocking one."""
    from numba.cuda.cudadrv import driver as drv

    ctx = _cuda().current_context()
    flags = drv.binding.CUstream_flags.CU_STREAM_NON_BLOCKING.value
    handle = drv.driver.cuStreamCreate(flags)
    finalizer = drv._stream_finalizer(ctx.deallocations, handle)
    return drv.Stream(handle, finalizer=finalizer)


def _mapped_bytes(nbytes: int) -> tuple[Any, np.ndarray]:
    """Zeroed mapped pinned host memory: (the allocation, a plain host uint8 view)."""
    mem = _cuda().mapped_array(nbytes, dtype=np.uint8)
    host = mem._ary if _simulator() else np.ndarray.view(mem, type=np.ndarray)
    host[:] = 0
    return mem, host


def _device_view(mem: Any, host: np.ndarray, offset: int, count: int, dtype: np.dtype) -> Any:
    """A device array of ``count`` items of ``dtype`` at byte ``offset`` of ``mem``."""
    nbytes = count * dtype.itemsize
    if _simulator():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(host[offset : offset + nbytes].view(dtype))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(
        (count,), (dtype.itemsize,), dtype, gpu_data=mem.gpu_data.view(offset, offset + nbytes)
    )


class MappedRing:
    """A crossing ring in mapped pinned host memory: ``host`` (a ``HostRing``) for the
    host's side, ``words`` (an int64 device array over the same bytes, header and
    slots) for the kernel's."""

    def __init__(
        self,
        capacity: int,
        dtype: np.dtype,
        backpressure: BackpressureStrategy,
        producer_side: RingSide,
        consumer_side: RingSide,
    ) -> None:
        nbytes = ring_nbytes(capacity, dtype.itemsize, crossing=True)
        self.mem, buf = _mapped_bytes(nbytes)
        self.host = HostRing(
            capacity,
            dtype,
            backpressure=backpressure,
            buffer=buf,
            producer_side=producer_side,
            consumer_side=consumer_side,
        )
        self.words = _device_view(self.mem, buf, 0, nbytes // 8, np.dtype(np.int64))


class MappedControl:
    """A control block (``cuda_loop.ControlWords``) in mapped pinned host memory."""

    def __init__(self) -> None:
        from pydotcompute.backends.cuda_loop import ControlWords

        n = ControlWords.NWORDS
        self.mem, buf = _mapped_bytes(n * 8)
        self.words = buf.view(np.int64)
        self.device = _device_view(self.mem, buf, 0, n, np.dtype(np.int64))

    def __getitem__(self, word: int) -> int:
        return int(self.words[word])

    def set_state(self, value: int) -> None:
        # An aligned 8-byte store is one store; the device polls it with ld.acquire.sys.
        self.words[0] = value


class CudaKernelBackend(RingFedBackend):
    """A ``cuda`` ring kernel: one persistent kernel launched at ``start()``."""

    backend = "cuda"
    get_spin_s = 50e-6

    def __new__(
        cls,
        kernel_id: str,
        func: Callable[..., Any],
        config: RingKernelConfig,
        *args: Any,
        **links: Any,
    ) -> Any:
        # A kernel declared with ``cuda_source=`` is CUDA C++, not a numba-cuda loop.
        if cls is CudaKernelBackend and config.options_for(CudaOptions).cuda_source is not None:
            from pydotcompute.backends.cuda_source import CudaSourceKernelBackend

            return CudaSourceKernelBackend(kernel_id, func, config, *args, **links)
        # A chain of handlers (the coordinator's fused stages) runs in a loop of its own.
        if cls is CudaKernelBackend and getattr(func, "fused_handlers", False):
            from pydotcompute.backends.cuda_fused import FusedCudaKernelBackend

            cls = FusedCudaKernelBackend
        return super().__new__(cls)

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
        self.simulator = require_cuda_backend()
        self.in_dtype = kernel_record_dtype(input_type, "input", kernel_id, "cuda")
        self.out_dtype = kernel_record_dtype(output_type, "output", kernel_id, "cuda")
        options = config.options_for(CudaOptions)
        self.threads = options.threads or (4 if self.simulator else 128)
        self.items = options.items_per_thread or (2 if self.simulator else 4)
        self.max_blocks = options.blocks
        self.idle_sleep_ns = options.idle_sleep_ns
        self.state = device_state(config.state)
        self.blocks = 0
        self.kernel: Any = None
        self.in_ring: MappedRing | None = None
        self.out_ring: MappedRing | None = None
        self.control: MappedControl | None = None
        self._side: Any = None
        self._d_state: Any = None
        self._stream: Any = None
        self._copy_stream: Any = None
        self._done_event: Any = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._watcher: OutputWatcher | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        from pydotcompute.backends.cuda_loop import ControlWords, SideWords

        cfg = self.config
        self.in_ring = MappedRing(
            ring_capacity_for(cfg.queue_size),
            self.in_dtype,
            cfg.backpressure,
            RingSide.HOST,
            RingSide.DEVICE,
        )
        self.out_ring = MappedRing(
            ring_capacity_for(cfg.effective_output_queue_size),
            self.out_dtype,
            self.output_strategy,
            RingSide.DEVICE,
            RingSide.HOST,
        )
        # The GPU cannot wake a receiver asleep on the event loop: a watcher thread
        # polls the output ring for it, only while a receiver is asleep.
        wakeup = ReplyWakeup()
        self._attach_rings(self.in_ring.host, self.out_ring.host, wakeup)
        self.control = MappedControl()
        try:
            self._check_source()
            self.kernel = await asyncio.to_thread(self._compile_loop)
        except KernelFailedError as refused:  # before compiling: already explained
            self.failure = refused
            raise
        except Exception as exc:
            err = compile_error(
                self.func, self.kernel_id, "cuda", exc, self.in_dtype, self.out_dtype
            )
            self.failure = err
            raise err from err.__cause__
        cuda = _cuda()
        # The kernel's own words start from the rings' indices and counters (3.1).
        side = SideWords.initial(
            self.in_ring.host, self.out_ring.host, self.control[ControlWords.STATE], self.stages
        )
        self.control.words[ControlWords.OUT_RESERVED] = side[SideWords.OUT_NEXT]
        if self.simulator:
            self._refuse_a_second_simulated_kernel()
            self._side = cuda.to_device(side)
            self._d_state = self._state_to_device(None)
            self.blocks = 1
            # The simulator runs one kernel at a time in a process: the loop starts
            # when the kernel first has work (its activation or its first input), so
            # kernels that never do (a fused chain's stages, say) hold none.
        else:
            self._stream = _non_blocking_stream()
            self._copy_stream = _non_blocking_stream()
            # Every device buffer the kernel uses is held here for its whole life: a
            # buffer freed while the persistent kernel runs would be used after free.
            self._side = cuda.to_device(side, stream=self._stream)
            self._d_state = self._state_to_device(self._stream)
            self._stream.synchronize()  # the copies are done before the kernel runs
            self.blocks = self._grid_size()
            self._launch()
        self._watcher = OutputWatcher(
            wakeup, self.out_ring.host.buffer, f"pydotcompute-cuda-watch-{self.kernel_id}"
        )
        self._watcher.start()
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    stages = 1
    """Handlers the loop calls per record (a fused chain has several)."""

    def _check_source(self) -> None:
        check_handler_source(self.func, self.kernel_id, "cuda", gpu=not self.simulator)

    def _compile_loop(self) -> Any:
        from pydotcompute.backends.cuda_loop import compile_loop

        return compile_loop(
            self.func,
            self.in_dtype,
            self.out_dtype,
            self.state,
            self.threads,
            self.items,
            self.idle_sleep_ns,
        )

    def _state_to_device(self, stream: Any) -> Any:
        """The handler's state in device memory (the kernel's ``state`` argument)."""
        if stream is None:
            return _cuda().to_device(self.state)
        return _cuda().to_device(self.state, stream=stream)

    def _read_side(self) -> np.ndarray | None:
        """The kernel's own words (``SideWords``), copied out of device memory while it
        runs (on a stream of its own); None before the launch."""
        if self._side is None:
            return None
        if self._copy_stream is None:
            return np.array(self._side.copy_to_host(), copy=True)
        out: np.ndarray = self._side.copy_to_host(stream=self._copy_stream)
        self._copy_stream.synchronize()
        return out

    def _grid_size(self) -> int:
        """Blocks that are resident at once (occupancy), at most ``blocks``/one per SM."""
        cuda = _cuda()
        compiled = next(iter(self.kernel.overloads.values()))
        fits = int(compiled.max_cooperative_grid_blocks(self.threads))
        if fits < 1:
            raise KernelFailedError(
                f"kernel {self.kernel_id!r}: no block of {self.threads} threads fits on "
                "the GPU (registers or shared memory); use fewer threads"
            )
        sms = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
        return min(fits, sms, self.max_blocks or _DEFAULT_MAX_BLOCKS)

    def _args(self, max_iterations: int) -> tuple[Any, ...]:
        assert self.in_ring and self.out_ring and self.control
        return (
            self.in_ring.words,
            self.out_ring.words,
            self.control.device,
            self._side,
            self._d_state,
            max_iterations,
        )

    def _launch(self) -> None:
        from pydotcompute.device.resident import launched

        cuda = _cuda()
        self.kernel[self.blocks, self.threads, self._stream](*self._args(0))
        self._done_event = event = cuda.event(timing=False)
        event.record(self._stream)
        launched(self, self.kernel_id, cuda.get_current_device().id, event.query)

    def _refuse_a_second_simulated_kernel(self) -> None:
        from numba.cuda.simulator.kernel import _get_kernel_context

        if _get_kernel_context() is not None:
            raise BackendNotAvailableError(
                "the numba-cuda simulator runs one kernel at a time in a process; "
                "terminate the running cuda kernel first (a GPU has no such limit)"
            )

    def _start_simulated(self) -> None:
        if self._stopped or self.control is None:
            return  # stopped or never started: the send or activation says so itself
        self._refuse_a_second_simulated_kernel()
        self._thread = threading.Thread(
            target=self._run_simulated,
            name=f"pydotcompute-cuda-sim-{self.kernel_id}",
            daemon=True,
        )
        self._thread.start()

    def try_put(self, msg: Any) -> bool:
        if self.simulator and self._thread is None and self.failure is None:
            self._start_simulated()
        return super().try_put(msg)

    async def put_batch(self, records: np.ndarray, timeout: float | None) -> int:
        if self.simulator and self._thread is None and self.failure is None:
            self._start_simulated()
        return await super().put_batch(records, timeout)

    def _run_simulated(self) -> None:
        try:
            self.kernel[1, self.threads](*self._args(0))
        except BaseException as exc:  # kept and reported by the monitor: never swallowed
            self._thread_error = exc

    def _kernel_done(self) -> bool:
        """Whether the kernel has exited; raises the CUDA error of a faulted stream."""
        if self.simulator:
            if self._thread is None:  # never activated: nothing ran, nothing to exit
                return self._stopped
            return not self._thread.is_alive()
        return self._done_event is None or bool(self._done_event.query())  # None: never ran

    def _device_error(self) -> BaseException | None:
        from pydotcompute.backends.cuda_loop import ERROR_TEXT, ControlWords

        if self._thread_error is not None:
            return self._thread_error
        assert self.control is not None
        code = self.control[ControlWords.ERROR_CODE]
        if code:
            text = ERROR_TEXT.get(code, "unknown device error")
            return KernelFailedError(
                f"cuda kernel {self.kernel_id!r} stopped with error code {code}: {text}"
            )
        return None

    async def _watch(self) -> None:
        """Turn a device-side fault or an unexpected exit into ``on_failure``."""
        while not self._stopping:
            try:
                done = self._kernel_done()
                err = self._device_error()
            except Exception as exc:  # a CUDA error on the kernel's stream
                done, err = True, exc
            if err is None and done and not self._stopped:  # not asked to stop
                err = KernelFailedError(f"cuda kernel {self.kernel_id!r} exited on its own")
            if err is not None:
                self._fail(err)
                return
            await asyncio.sleep(_MONITOR_PERIOD_S)

    def _fail(self, exc: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = exc
        self.failed_input = self._failed_record()
        if self.control is not None:
            from pydotcompute.backends.cuda_loop import ControlWords as W

            words = self.control.words  # the device has stopped writing these two
            words[W.ERRORS] += 1
            if words[W.ERROR_CODE] == W.ERR_NONE:
                words[W.ERROR_CODE] = W.ERR_HANDLER
            self.control.set_state(W.TERMINATE)  # the other blocks stop too
        self.active_time.pause()
        self._wake_receivers()
        self.on_failure(exc)

    def _failed_record(self) -> Any:
        """The input the handler raised on, as it was sent (simulator only: on a GPU a
        handler cannot raise, see ``check_handler_source``)."""
        from pydotcompute.backends.cuda_loop import SideWords

        if not self.simulator or self._side is None or self.in_ring is None:
            return None
        at = int(self._side.copy_to_host()[SideWords.FAILED_AT]) - 1
        if at < 0:
            return None
        ring = self.in_ring.host
        size = self.in_dtype.itemsize
        slot = HEADER_SIZE + (at & (ring.capacity - 1)) * slot_size_for(size, crossing=True)
        start = slot + TAG_SIZE  # the record follows the slot's tag (protocol 4.4)
        one = np.empty(1, self.in_dtype)
        one.view(np.uint8)[:] = ring.buffer[start : start + size]  # not released: intact
        t = self.input_type
        if isinstance(t, type) and hasattr(t, "from_record"):
            return t.from_record(one[0])
        return one[0]

    def set_active(self, active: bool) -> None:
        from pydotcompute.backends.cuda_loop import ControlWords

        if self.failure is not None or self._stopped or self.control is None:
            return
        if active and self.simulator and self._thread is None:
            self._start_simulated()
        self._track_active(active)
        self.control.set_state(ControlWords.ACTIVE if active else ControlWords.INACTIVE)

    async def stop(self, timeout: float) -> None:
        from pydotcompute.backends.cuda_loop import ControlWords

        self._stopped = True
        self.active_time.pause()
        self._wake_receivers()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self.control is None:
            return
        self.control.set_state(ControlWords.TERMINATE)
        fault: BaseException | None = None

        def gone() -> bool:
            nonlocal fault
            try:
                return bool(self._kernel_done())
            except Exception as exc:  # the stream faulted: the kernel is gone
                fault = exc
                return True

        await self._wait_exit(
            gone, timeout, "a handler that never returns keeps a GPU kernel running"
        )
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
        if self._thread is not None:
            self._thread.join()
        if self._stream is not None and fault is None:
            try:
                self._stream.synchronize()  # returns at once: the kernel has exited
            except Exception as exc:
                fault = exc
        if fault is None:
            fault = self._device_error()
        if not self.simulator:
            from pydotcompute.device.resident import exited

            exited(self)  # the kernel is gone: frees held while it ran may run now
        if fault is not None and self.failure is None:
            self._fail(fault)
        if self._wakeup is not None:
            self._wakeup.close()

    # -- when a request without a reply was dropped ----------------------------------

    def settled_through(self, upto: int) -> int | None:
        """The loop handles its input in order and, before it releases a batch, stores
        where that batch's outputs end (``OUT_RESERVED``): the input ring's
        ``released`` at ``upto`` or past it, then ``OUT_RESERVED`` read after it."""
        if self.in_ring is None or self.control is None or not self._keeps_records():
            return None
        if int(ring_word(self.in_ring.host.buffer, OFF_RELEASED)) < upto:
            return None
        return int(ring_word(self.control.words, ControlBlock.OUT_RESERVED))

    # -- state and telemetry ---------------------------------------------------------

    def read_state(self) -> np.ndarray:
        """Copy ``state`` out of device memory while the kernel runs (on a stream of
        its own, so the copy does not wait for the persistent kernel)."""
        if self._d_state is None:
            return self.state.copy()
        if self._copy_stream is None:
            return np.array(self._d_state.copy_to_host(), copy=True)
        out: np.ndarray = self._d_state.copy_to_host(stream=self._copy_stream)
        self._copy_stream.synchronize()
        return out

    def telemetry(self, state: str) -> KernelTelemetry:
        from pydotcompute.backends.cuda_loop import ControlWords as W

        if self.control is None or self.in_ring is None or self.out_ring is None:
            return KernelTelemetry(kernel_id=self.kernel_id, backend=self.backend, state=state)
        cb = self.control
        inc = self.in_ring.host.counters()
        outc = self.out_ring.host.counters()
        return self._telemetry(
            state,
            cb[W.PROCESSED],
            messages_sent=cb[W.EMITTED],
            messages_dropped=inc.dropped + outc.dropped + cb[W.DROPPED],
            messages_rejected=inc.rejected,
            errors=cb[W.ERRORS],
            queue_depth=inc.depth,
            queue_capacity=self.in_ring.host.capacity,
            output_queue_depth=outc.depth,
            idle_polls=cb[W.IDLE_POLLS],
        )
