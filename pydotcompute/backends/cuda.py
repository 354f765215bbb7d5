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

Under the numba-cuda simulator (``NUMBA_ENABLE_CUDASIM=1``) the same loop runs with
one block, launched in slices by the one simulated device (``cuda_simulated``), so that
several kernels take turns.

``device`` (``CudaOptions``) picks the GPU a kernel runs on; every CUDA call for the
kernel is made with that GPU current.

**Links.** ``RingKernelRuntime.link(a, b)`` on two ``cuda`` kernels makes ``a``'s loop
write its outputs into a ring that ``b``'s loop reads (``cuda_link.LinkRing``: device
memory of their GPU, or across two GPUs peer memory or pinned host memory): both loops
finish the batch in hand (HALT), exit, and are launched again on the new rings,
recompiled for them once per kernel type.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from pydotcompute.backends.base import (
    FailureCallback,
    KernelBackend,
    kernel_record_dtype,
    renamed,
)
from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.backends.handler_errors import check_handler_source, compile_error
from pydotcompute.backends.options import CudaOptions
from pydotcompute.backends.ring_fed import RingFedBackend
from pydotcompute.backends.wakeup import OutputWatcher, ReplyWakeup
from pydotcompute.errors import InvalidConfigurationError, KernelFailedError
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.rings.control import ControlBlock
from pydotcompute.rings.host_ops import ring_word
from pydotcompute.rings.host_ring import HostRing, RingCounters, ring_capacity_for
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
_SLICE_ROUNDS = 64
"""Simulator: rounds a slice may run (it ends sooner, at its first idle round)."""
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


def _rebased_side(old: np.ndarray, inc: RingCounters, outc: RingCounters, state: int) -> Any:
    from pydotcompute.backends.cuda_loop import SideWords

    return SideWords.rebased(old, inc, outc, state)


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
        self._thread_error: BaseException | None = None
        self._sim_left = threading.Event()  # simulator: the loop has left the device
        self._in_words: Any = None  # the rings the loop runs on: its own, or links
        self._out_words: Any = None
        self._in_link: Any = None  # cuda_link.LinkRing this kernel reads, if fed by a link
        self._out_link: Any = None  # the LinkRing it writes into, if linked
        self._link_peer: CudaKernelBackend | None = None
        self._relink_task: asyncio.Future[None] | None = None
        self._halting = False
        self.device_index = 0  # the GPU it runs on, settled at start
        self._watcher: OutputWatcher | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.device_index = self._resolve_device()
        with self._on_device():
            self._allocate()
        try:
            self._check_source()
            self.kernel = await asyncio.to_thread(self._compiled, 0, 0)
        except KernelFailedError as refused:  # before compiling: already explained
            self.failure = refused
            raise
        except Exception as exc:
            err = compile_error(
                self.func, self.kernel_id, "cuda", exc, self.in_dtype, self.out_dtype
            )
            self.failure = err
            raise err from err.__cause__
        with self._on_device():
            self._first_launch()
        assert self._wakeup is not None and self.out_ring is not None
        self._watcher = OutputWatcher(
            self._wakeup, self.out_ring.host.buffer, f"pydotcompute-cuda-watch-{self.kernel_id}"
        )
        self._watcher.start()
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    def _resolve_device(self) -> int:
        """The GPU the kernel runs on: ``CudaOptions.device``, else the current one."""
        cuda = _cuda()
        want = self.config.options_for(CudaOptions).device
        if want is None:  # the simulator's one device has no id
            return 0 if self.simulator else int(cuda.get_current_device().id)
        if want >= len(cuda.gpus):
            raise InvalidConfigurationError(
                f"kernel {self.kernel_id!r}: cuda option device={want}, but this machine "
                f"has {len(cuda.gpus)} GPU(s) (0 to {len(cuda.gpus) - 1})"
            )
        return int(want)

    def _allocate(self) -> None:
        """The mapped rings and the control block (on the kernel's GPU)."""
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
        self._attach_rings(self.in_ring.host, self.out_ring.host, ReplyWakeup())
        self._in_words, self._out_words = self.in_ring.words, self.out_ring.words
        self.control = MappedControl()

    def _first_launch(self) -> None:
        """The kernel's own words and state in device memory, then the launch."""
        from pydotcompute.backends.cuda_loop import ControlWords, SideWords

        assert self.in_ring is not None and self.out_ring is not None and self.control
        cuda = _cuda()
        # The kernel's own words start from the rings' indices and counters (3.1).
        side = SideWords.initial(
            self.in_ring.host, self.out_ring.host, self.control[ControlWords.STATE], self.stages
        )
        self.control.words[ControlWords.OUT_RESERVED] = side[SideWords.OUT_NEXT]
        if self.simulator:
            self._side = cuda.to_device(side)
            self._d_state = self._state_to_device(None)
            self.blocks = 1
            self._run_simulated()
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

    stages = 1
    """Handlers the loop calls per record (a fused chain has several)."""

    def _check_source(self) -> None:
        check_handler_source(self.func, self.kernel_id, "cuda", gpu=not self.simulator)

    def _compile_loop(self, in_link: int = 0, out_link: int = 0) -> Any:
        """The loop for these rings: host-mapped ones, or links (``in_link``/``out_link``:
        ``cuda_loop.LINK_*``, where the link ring lives)."""
        from pydotcompute.backends.cuda_loop import compile_loop

        return compile_loop(
            self.func,
            self.in_dtype,
            self.out_dtype,
            self.state,
            self.threads,
            self.items,
            self.idle_sleep_ns,
            in_link,
            out_link,
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
        with self._on_device():
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
        assert self._in_words is not None and self._out_words is not None and self.control
        return (
            self._in_words,
            self._out_words,
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

    # -- simulator -------------------------------------------------------------------

    def _run_simulated(self) -> None:
        from pydotcompute.backends.cuda_simulated import SimulatedDevice

        self._sim_left.clear()
        SimulatedDevice.run(self)

    def simulated_turn(self) -> int:
        """(Simulator) one slice of the loop if it has something to do: input it has
        not claimed while active, a state word it has not seen, stale records to skip;
        never while its output ring lacks room for a round under BLOCK."""
        from pydotcompute.backends.cuda_loop import ControlWords as W
        from pydotcompute.backends.cuda_loop import SideWords as S
        from pydotcompute.backends.cuda_simulated import EXITED, IDLE, RAN, SimulatedDevice
        from pydotcompute.rings.device import (
            W_DROP_BEFORE,
            W_PUBLISHED,
        )

        if self._thread_error is not None or self.control is None:
            return EXITED
        side = self._side._ary
        state = self.control[W.STATE]
        rounds = self._rounds_with_room()
        # A state it has not seen is due, except an activation while its output ring is
        # full: that slice would claim and wait for room, holding every kernel back.
        due = state in (W.TERMINATE, W.HALT) or (
            state != side[S.COMMAND] and (state != W.ACTIVE or rounds > 0)
        )
        if not due:
            inw = self._in_words._ary
            claim = side[S.CLAIM]
            due = inw[W_DROP_BEFORE] > claim or (
                state == W.ACTIVE and inw[W_PUBLISHED] > claim and rounds > 0
            )
        if not due:
            return IDLE
        side[S.EXITED] = 0  # each slice's last block out mirrors the counters
        try:
            with SimulatedDevice.launching:
                self.kernel[1, self.threads](*self._args(-max(rounds, 1)))
        except BaseException as exc:  # kept and reported by the monitor: never swallowed
            self._thread_error = exc
            return EXITED
        if side[S.COMMAND] in (W.TERMINATE, W.HALT) or side[S.ERROR_CODE] != 0:
            return EXITED
        return RAN

    def _rounds_with_room(self) -> int:
        """(Simulator) rounds that cannot wait for room in the output ring: each places
        at most a claim's worth of outputs (every round, under a dropping strategy)."""
        from pydotcompute.backends.cuda_loop import SideWords as S
        from pydotcompute.rings.device import W_BACKPRESSURE, W_CAPACITY, W_RELEASED

        out = self._out_words._ary
        if out[W_BACKPRESSURE] not in (BackpressureStrategy.BLOCK, BackpressureStrategy.REJECT):
            return _SLICE_ROUNDS  # a full ring drops: a round never waits for room
        cap = int(out[W_CAPACITY])
        room = cap - (int(self._side._ary[S.OUT_NEXT]) - int(out[W_RELEASED]))
        return min(_SLICE_ROUNDS, room // min(self.threads * self.items, cap))

    def simulated_left(self) -> None:
        self._sim_left.set()

    def _kernel_done(self) -> bool:
        """Whether the kernel has exited; raises the CUDA error of a faulted stream."""
        if self.simulator:
            if self._side is None:  # never started: nothing ran, nothing to exit
                return self._stopped
            return self._sim_left.is_set()
        if self._done_event is None:  # never ran
            return True
        with self._on_device():
            return bool(self._done_event.query())

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
            if err is None and done and not self._stopped and not self._halting:
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
        if self._link_peer is not None and not self._halting:
            # The kernel it fed reads its own input ring again, after what is left.
            self._relinking(None)
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
        ring = self.in_ring.host if self._in_link is None else self._in_link.snapshot()
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
        self._track_active(active)
        self.control.set_state(ControlWords.ACTIVE if active else ControlWords.INACTIVE)

    # -- links -----------------------------------------------------------------------

    @property
    def linked_to(self) -> CudaKernelBackend | None:
        """The kernel whose loop reads this one's outputs through a link ring, if any."""
        return self._link_peer

    def link_refusal(self, peer: KernelBackend) -> str | None:
        """Outputs feed another ``cuda`` kernel (a numba-cuda loop, fused or not) of this
        process whose input records are this kernel's output records."""
        if not isinstance(peer, CudaKernelBackend):
            runs = "CUDA C++ (cuda_source)" if peer.backend == "cuda" else f"on {peer.backend}"
            return f"{peer.kernel_id!r} runs {runs} (links join numba-cuda loops)"
        if self.out_dtype != peer.in_dtype:
            return (
                f"{self.kernel_id!r} outputs records {self.out_dtype}, "
                f"{peer.kernel_id!r} takes {peer.in_dtype}"
            )
        return None

    async def relink_output(self, peer: KernelBackend | None) -> None:
        """Write outputs into a link ring that ``peer``'s loop reads, or into this
        kernel's own output ring again (None).

        Both loops finish the batch in hand (its outputs wait for room where they go),
        exit, and are launched again on the new rings. Making a link, the ring starts
        with what ``peer`` had not taken from its input ring, then what this kernel had
        queued for the host, in order. Ending it, what the link ring still holds goes
        to ``peer``'s own input ring first, under its strategy, or is discarded and
        counted as ``peer``'s dropped records when ``peer`` has stopped. Cancelling the
        call does not cancel the relaunch (a kernel half-way would be left stopped)."""
        await asyncio.shield(self._relinking(peer))

    def _relinking(self, peer: KernelBackend | None) -> asyncio.Future[None]:
        """The relink as a task of its own (kept: it must run to its end)."""
        task = asyncio.ensure_future(self._relink(peer))
        self._relink_task = task
        return task

    async def _relink(self, peer: KernelBackend | None) -> None:
        if peer is not None:
            assert isinstance(peer, CudaKernelBackend)
            await self._link(peer)
        elif self._link_peer is not None:
            await self._unlink()

    async def _link(self, peer: CudaKernelBackend) -> None:
        from pydotcompute.backends.cuda_link import LinkRing, link_memory

        kind = link_memory(self.device_index, peer.device_index)
        mine = await asyncio.to_thread(self._compiled, self._link_kind(self._in_link), kind)
        theirs = await asyncio.to_thread(peer._compiled, kind, peer._link_kind(peer._out_link))
        queued: list[np.ndarray] = []
        b_state = await peer._halt()
        try:
            # A loop waiting for room in its output ring finishes once the host takes it.
            a_state = await self._halt(lambda: queued.append(self._take_outputs()))
        except BaseException:
            # It failed meanwhile: the peer goes on, on its own input ring, first with
            # what this kernel had queued for it (nothing is lost).
            peer._relaunch(peer.kernel, b_state)
            if queued:
                await peer.put_batch(np.concatenate(queued), None)
            raise
        queued.append(self._take_outputs())
        seed = np.concatenate([peer._take_inputs(), *queued])
        rounds = 2 * self.threads * self.items  # a round never waits on a short ring
        cap = max(ring_capacity_for(peer.config.queue_size), ring_capacity_for(len(seed) + rounds))
        link = LinkRing(
            kind,
            self.device_index,
            peer.device_index,
            cap,
            self.out_dtype,
            peer.config.backpressure,
            seed,
        )
        peer._in_link, peer._in_words = link, link.words
        self._out_link, self._out_words, self._link_peer = link, link.words, peer
        peer._relaunch(theirs, b_state)
        self._relaunch(mine, a_state)

    async def _unlink(self) -> None:
        peer, link = self._link_peer, self._out_link
        assert peer is not None and link is not None
        assert self.out_ring is not None and peer.in_ring is not None
        gone = peer._stopped or peer.failure is not None
        mine: Any = None
        a_state: int | None = None  # None: its loop has exited for good (stopped, failed)
        if not (self._stopped or self.failure is not None):
            mine = await asyncio.to_thread(self._compiled, self._link_kind(self._in_link), 0)
            # Outputs that find no room in the ring of a stopped peer are dropped.
            a_state = await self._halt(terminate=gone)
        self._out_link, self._out_words, self._link_peer = None, self.out_ring.words, None
        theirs: Any = None
        b_state = 0
        if not gone:
            theirs = await asyncio.to_thread(peer._compiled, 0, peer._link_kind(peer._out_link))
            try:
                b_state = await peer._halt()
            except Exception:  # it failed meanwhile: what the link holds is dropped
                gone = True
        if gone:
            peer._count_dropped(len(link.leftovers()))
        else:
            left = link.leftovers()
            peer._in_link, peer._in_words = None, peer.in_ring.words
            peer._relaunch(theirs, b_state)
            if len(left):
                await peer.put_batch(left, None)
        if a_state is not None:
            self._relaunch(mine, a_state)

    @staticmethod
    def _link_kind(link: Any) -> int:
        """``cuda_loop.LINK_*`` of a ``LinkRing`` (0: none, the kernel's own ring)."""
        return 0 if link is None else int(link.kind)

    def _compiled(self, in_link: int, out_link: int) -> Any:
        """``_compile_loop`` on a thread of its own, for the kernel's GPU."""
        with self._on_device():
            return self._compile_loop(in_link, out_link)

    def _on_device(self) -> Any:
        """The kernel's GPU as the calling thread's current device (a context manager)."""
        return _cuda().gpus[self.device_index]

    def link_path(self) -> str | None:
        """Where this kernel's outputs go when it feeds a link: the link ring's memory."""
        return None if self._out_link is None else str(self._out_link.path)

    async def _halt(self, drain: Callable[[], None] | None = None, terminate: bool = False) -> int:
        """Have the loop finish the batch in hand and exit, to be relaunched on other
        rings; returns the state word to launch it with again. ``drain`` runs while it
        is waited for; ``terminate``: outputs that find no room are dropped (counted)
        rather than waited for."""
        from pydotcompute.backends.cuda_loop import ControlWords as W

        assert self.control is not None
        state = self.control[W.STATE]
        self._halting = True
        self.control.set_state(W.TERMINATE if terminate else W.HALT)
        pause = 1e-4
        while not self._kernel_done():
            if drain is not None:
                drain()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2e-3)
        if not self.simulator:
            from pydotcompute.device.resident import exited

            exited(self)
        err = self._device_error()
        if err is not None:
            self._halting = False
            self._fail(err)
            raise err
        return state

    def _relaunch(self, loop: Any, state: int) -> None:
        """Launch ``loop`` again on the rings now in ``_in_words``/``_out_words``."""
        from pydotcompute.backends.cuda_loop import SideWords

        assert self.control is not None
        old = self._read_side()
        assert old is not None
        side = _rebased_side(old, self._in_counters(), self._out_counters(), state)
        self.kernel = loop
        words = self.control.words  # where the new rings' positions start
        words[ControlBlock.OUT_RESERVED // 8] = side[SideWords.OUT_NEXT]
        words[ControlBlock.IN_RELEASED // 8] = side[SideWords.IN_DONE]
        self.control.set_state(state)
        if self.simulator:
            self._side = _cuda().to_device(side)
            self._halting = False
            self._run_simulated()
            return
        with self._on_device():
            self._side = _cuda().to_device(side, stream=self._stream)
            self._stream.synchronize()
            self._halting = False
            self._launch()

    def _take_outputs(self) -> np.ndarray:
        """What the loop has placed in its own output ring and the host has not taken."""
        assert self.out_ring is not None
        out = []
        while len(got := self.out_ring.host.pop_batch(1024, 0.0)):
            out.append(got)
        return np.concatenate(out) if out else np.zeros(0, self.out_dtype)

    def _take_inputs(self) -> np.ndarray:
        """What the host placed in the input ring and the loop has not taken; only
        while the loop has exited (the host plays the consumer once)."""
        assert self.in_ring is not None
        if self._in_link is not None:
            left: np.ndarray = self._in_link.leftovers()
            return left
        from pydotcompute.backends.cuda_link import take_unreleased

        ring = self.in_ring.host
        return take_unreleased(ring.buffer, self.in_dtype, ring.capacity)

    def _in_counters(self) -> RingCounters:
        assert self.in_ring is not None
        return self.in_ring.host.counters() if self._in_link is None else self._in_link.counters()

    def _out_counters(self) -> RingCounters:
        assert self.out_ring is not None
        link = self._out_link
        return self.out_ring.host.counters() if link is None else link.counters()

    def _count_dropped(self, n: int) -> None:
        """Records discarded for this kernel by the host (it has stopped)."""
        from pydotcompute.backends.cuda_loop import ControlWords as W

        if n and self.control is not None:
            self.control.words[W.DROPPED] += n

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
        if self._stream is not None and fault is None:
            try:
                with self._on_device():
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
        if self._link_peer is not None:
            # The kernel it fed reads its own input ring again, after what is left.
            await asyncio.wait_for(asyncio.shield(self._relinking(None)), timeout)
        if self._wakeup is not None:
            self._wakeup.close()

    # -- when a request without a reply was dropped ----------------------------------

    def settled_through(self, upto: int) -> int | None:
        """The loop handles its input in order and, before it releases a batch, stores
        where that batch's outputs end (``OUT_RESERVED``): the input ring's
        ``released`` at ``upto`` or past it, then ``OUT_RESERVED`` read after it."""
        if self.in_ring is None or self.control is None or not self._keeps_records():
            return None
        if self._in_link is None:
            released = int(ring_word(self.in_ring.host.buffer, OFF_RELEASED))
        else:  # a link ring is not the host's to read: its mirror, stored in order
            released = int(ring_word(self.control.words, ControlBlock.IN_RELEASED))
        if released < upto:
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
        with self._on_device():
            out: np.ndarray = self._d_state.copy_to_host(stream=self._copy_stream)
            self._copy_stream.synchronize()
        return out

    def telemetry(self, state: str) -> KernelTelemetry:
        from pydotcompute.backends.cuda_loop import ControlWords as W

        if self.control is None or self.in_ring is None or self.out_ring is None:
            return KernelTelemetry(kernel_id=self.kernel_id, backend=self.backend, state=state)
        cb = self.control
        inc, outc = self._in_counters(), self._out_counters()
        return self._telemetry(
            state,
            cb[W.PROCESSED],
            messages_sent=cb[W.EMITTED],
            messages_dropped=inc.dropped + outc.dropped + cb[W.DROPPED],
            messages_rejected=inc.rejected,
            errors=cb[W.ERRORS],
            queue_depth=inc.depth,
            queue_capacity=inc.capacity,
            output_queue_depth=outc.depth,
            idle_polls=cb[W.IDLE_POLLS],
        )
