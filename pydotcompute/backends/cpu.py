"""The ``cpu`` backend: a compiled handler run by persistent ``nogil`` threads.

The user writes ``def handler(msg, out, state) -> bool``. It is compiled with Numba
and a second compiled function, the *loop*, is composed around it: the loop polls
the input ring, calls the handler on each record, pushes ``out`` to the output
ring when the handler returns True, and keeps its counters in a control block.
``workers`` threads each run the loop on the one input ring. Python code is only
involved to start, pause and stop the threads and to move records in and out.

Options read from ``config.extra``: ``boundscheck`` (bool, compile the handler and
the loop with Numba bounds checking so an out-of-range index fails the kernel
instead of corrupting memory) and ``batch`` (records a worker takes per poll,
default 1024).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit, typeof
from numba.core.registry import CPUDispatcher

from pydotcompute.backends.base import FailureCallback, kernel_record_dtype
from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.backends.ring_fed import RingFedLoop
from pydotcompute.backends.wakeup import ReplyWakeup
from pydotcompute.errors import (
    InvalidConfigurationError,
    KernelFailedError,
    KernelStateError,
)
from pydotcompute.rings.atomics import (
    cpu_pause,
    cpu_yield,
    fetch_add,
    load_acquire,
    sleep_us,
    zero_bytes,
)
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.rings.host_ops import (
    backoff,
    ring_pop,
    ring_push,
)
from pydotcompute.rings.host_ring import HostRing, ring_capacity_for
from pydotcompute.rings.layout import OFF_BACKPRESSURE, aligned_buffer
from pydotcompute.rings.wake import wake_signal
from pydotcompute.telemetry.snapshot import ActiveTime, KernelTelemetry

__all__ = ["CpuKernelLoop", "ControlBlock", "compile_kernel_loop"]


class ControlBlock:
    """A kernel's control block: one int64 array the loop and the host share.

    Each field sits on its own 128-byte line (offsets below are in bytes), so the
    host polling counters never contends with the workers' hot lines more than it
    must. The state word is written by the host, everything else by the workers,
    except the wake words (``rings.wake``) beside the state word, which a receiver
    arms and the worker that publishes output disarms.
    """

    STATE = 0
    WAKE = 8
    PROCESSED = 128
    EMITTED = 256
    DROPPED = 384
    IDLE_POLLS = 512
    ERRORS = 640
    HEARTBEAT = 768
    ERROR_CODE = 896
    NBYTES = 1024

    INACTIVE = 0
    ACTIVE = 1
    TERMINATE = 2

    ERR_NONE = 0
    ERR_HANDLER = 1
    """The handler (or the loop) raised; the exception is kept by the host side."""

    def __init__(self) -> None:
        self.words = aligned_buffer(self.NBYTES).view(np.int64)

    def __getitem__(self, offset: int) -> int:
        return int(self.words[offset // 8])

    def set_state(self, value: int) -> None:
        self.words[self.STATE // 8] = value

    def snapshot(self) -> dict[str, int]:
        """All fields by name."""
        names = ("processed", "emitted", "dropped", "idle_polls", "errors", "heartbeat")
        offs = (
            self.PROCESSED,
            self.EMITTED,
            self.DROPPED,
            self.IDLE_POLLS,
            self.ERRORS,
            self.HEARTBEAT,
        )
        out = {n: self[o] for n, o in zip(names, offs, strict=True)}
        out["state"] = self[self.STATE]
        out["error_code"] = self[self.ERROR_CODE]
        return out


_STATE = ControlBlock.STATE
_PROCESSED = ControlBlock.PROCESSED
_EMITTED = ControlBlock.EMITTED
_DROPPED = ControlBlock.DROPPED
_IDLE_POLLS = ControlBlock.IDLE_POLLS
_HEARTBEAT = ControlBlock.HEARTBEAT
_ACTIVE = ControlBlock.ACTIVE
_TERMINATE = ControlBlock.TERMINATE
_WAKE = ControlBlock.WAKE // 8
_SPIN_POLLS = 4096  # empty polls spent spinning (about 0.2 ms) before yielding the core
_YIELD_POLLS = 8192  # then yielding to other threads, then sleeping between polls
_IDLE_SLEEP_US = 200
_PAUSED_SLEEP_US = 500


def _compose(handler: Any, boundscheck: bool) -> Any:
    """The persistent loop around one compiled handler."""

    def kernel_loop(in_buf, out_buf, ctrl, state, in_batch, out_batch):  # type: ignore[no-untyped-def]
        batch = in_batch.shape[0]
        out_rs = out_batch.itemsize
        out_blocks = load_acquire(out_buf, OFF_BACKPRESSURE) == 0
        idle = 0
        while True:
            mode = load_acquire(ctrl, _STATE)
            if mode == _TERMINATE:
                fetch_add(ctrl, _IDLE_POLLS, idle & 63)
                return
            if mode != _ACTIVE:
                fetch_add(ctrl, _HEARTBEAT, 1)
                sleep_us(_PAUSED_SLEEP_US)
                continue
            got = ring_pop(in_buf, in_batch, 0, batch)
            if got == 0:
                # Idle polls are counted in chunks: one shared write per 64 polls.
                idle += 1
                if idle & 63 == 0:
                    fetch_add(ctrl, _IDLE_POLLS, 64)
                    fetch_add(ctrl, _HEARTBEAT, 1)
                if idle < _SPIN_POLLS:
                    cpu_pause()
                elif idle < _YIELD_POLLS:
                    cpu_yield()
                else:
                    sleep_us(_IDLE_SLEEP_US)
                continue
            if idle:
                fetch_add(ctrl, _IDLE_POLLS, idle & 63)
                idle = 0
            k = 0
            for i in range(got):
                if handler(in_batch[i], out_batch[k], state):
                    k += 1
                else:
                    zero_bytes(out_batch, k * out_rs, out_rs)  # the next call gets a clean record
            fetch_add(ctrl, _PROCESSED, got)
            fetch_add(ctrl, _HEARTBEAT, 1)
            placed = ring_push(out_buf, out_batch, 0, k)
            if placed:
                wake_signal(ctrl, _WAKE)  # a receiver asleep on the output ring
            if out_blocks:
                spins = 0
                while placed < k:
                    if load_acquire(ctrl, _STATE) == _TERMINATE:
                        fetch_add(ctrl, _DROPPED, k - placed)
                        return
                    spins = backoff(min(spins, 300))
                    got = ring_push(out_buf, out_batch, placed * out_rs, k - placed)
                    if got:
                        wake_signal(ctrl, _WAKE)
                    placed += got
            fetch_add(ctrl, _EMITTED, k)
            zero_bytes(out_batch, 0, k * out_rs)

    return njit(nogil=True, boundscheck=boundscheck)(kernel_loop)


# One compiled loop per (handler, record dtypes, state type, options): a kernel type
# launched many times compiles once. Weak keys: a handler that goes away takes its
# compiled code with it.
_LOOPS: weakref.WeakKeyDictionary[Callable[..., Any], dict[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)
_LOOPS_LOCK = threading.Lock()


def compile_kernel_loop(
    func: Callable[..., Any],
    in_dtype: np.dtype,
    out_dtype: np.dtype,
    state: np.ndarray,
    *,
    boundscheck: bool = False,
) -> Callable[..., None]:
    """Compile ``func`` and the loop around it for these record dtypes (cached).

    Raises Numba's typing error when the handler does not compile for them."""
    in_batch = np.zeros(1, in_dtype)
    out_batch = np.zeros(1, out_dtype)
    buf = np.zeros(8, np.uint8)
    ctrl = np.zeros(1, np.int64)
    sig = tuple(typeof(a) for a in (buf, buf, ctrl, state, in_batch, out_batch))
    key = (sig, bool(boundscheck))
    with _LOOPS_LOCK:
        per_func = _LOOPS.setdefault(func, {})
        loop = per_func.get(key)
        if loop is None:
            py = func.py_func if isinstance(func, CPUDispatcher) else func
            handler = njit(nogil=True, boundscheck=boundscheck)(py)
            loop = _compose(handler, boundscheck)
            loop.compile(sig)
            per_func[key] = loop
    return loop  # type: ignore[no-any-return]


class CpuKernelLoop(RingFedLoop):
    """A ``cpu`` ring kernel: ``workers`` threads running the compiled loop.

    With several workers, records of one input ring are processed concurrently:
    each worker keeps the order of the records it took, but outputs of different
    workers interleave. The ``state`` array is shared by all workers.
    """

    backend = "cpu"

    def __init__(
        self,
        kernel_id: str,
        func: Callable[..., Any],
        config: RingKernelConfig,
        input_type: type | None,
        output_type: type | None,
        on_failure: FailureCallback,
    ) -> None:
        super().__init__(kernel_id, func, config, input_type, output_type, on_failure)
        self.in_dtype = kernel_record_dtype(input_type, "input", kernel_id, "cpu")
        self.out_dtype = kernel_record_dtype(output_type, "output", kernel_id, "cpu")
        extra = config.extra
        self.boundscheck = bool(extra.get("boundscheck", False))
        self.batch = int(extra.get("batch", 1024))
        if self.batch < 1:
            raise InvalidConfigurationError(f"batch must be >= 1, got {self.batch}")
        # REJECT protects senders into the kernel; the kernel's own output waits.
        out_strategy = (
            BackpressureStrategy.BLOCK
            if config.backpressure is BackpressureStrategy.REJECT
            else config.backpressure
        )
        self.in_ring = HostRing(
            ring_capacity_for(config.queue_size), self.in_dtype, backpressure=config.backpressure
        )
        self.out_ring = HostRing(
            ring_capacity_for(config.effective_output_queue_size),
            self.out_dtype,
            backpressure=out_strategy,
        )
        self.control = ControlBlock()
        self.state = (
            np.zeros(0, np.float64) if config.state is None else np.array(config.state, copy=True)
        )
        self._threads: list[threading.Thread] = []
        self._fail_lock = threading.Lock()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._launched_at = time.monotonic()
        self._active = ActiveTime()
        self._attach_rings(
            self.in_ring, self.out_ring, ReplyWakeup(self.control.words, ControlBlock.WAKE // 8)
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        try:
            # Compiling takes a while the first time; keep the event loop responsive.
            loop_fn = await asyncio.to_thread(
                compile_kernel_loop,
                self.func,
                self.in_dtype,
                self.out_dtype,
                self.state,
                boundscheck=self.boundscheck,
            )
            for ring in (self.in_ring, self.out_ring):
                await asyncio.to_thread(ring.prepare)
        except Exception as exc:
            name = getattr(self.func, "__name__", repr(self.func))
            err = KernelFailedError(
                f"handler {name!r} of kernel {self.kernel_id!r} does not compile for input "
                f"records {self.in_dtype} and output records {self.out_dtype}: "
                f"{type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            self.failure = err
            raise err from exc
        width = min(self.batch, self.in_ring.capacity)
        for w in range(self.config.workers):
            t = threading.Thread(
                target=self._work,
                args=(loop_fn, np.zeros(width, self.in_dtype), np.zeros(width, self.out_dtype)),
                name=f"pydotcompute-cpu-{self.kernel_id}-{w}",
                daemon=True,  # never keep the interpreter alive; stop() joins them
            )
            self._threads.append(t)
            t.start()

    def _work(
        self, loop_fn: Callable[..., None], in_batch: np.ndarray, out_batch: np.ndarray
    ) -> None:
        try:
            loop_fn(
                self.in_ring.buffer,
                self.out_ring.buffer,
                self.control.words,
                self.state,
                in_batch,
                out_batch,
            )
        except BaseException as exc:  # reported, never swallowed: the kernel goes FAILED
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._fail_lock:
            first = self.failure is None
            if first:
                self.failure = exc
            words = self.control.words
            words[ControlBlock.ERRORS // 8] += 1
            words[ControlBlock.ERROR_CODE // 8] = ControlBlock.ERR_HANDLER
            self.control.set_state(ControlBlock.TERMINATE)  # the other workers stop too
        if first and self._event_loop is not None:
            try:
                self._event_loop.call_soon_threadsafe(self._report, exc)
            except RuntimeError:
                # The event loop is closed: nobody is left to tell. The failure stays
                # in ``self.failure`` and the control block.
                return

    def _report(self, exc: BaseException) -> None:
        self._active.pause()
        self._wake_receivers()
        self.on_failure(exc)

    def set_active(self, active: bool) -> None:
        if self.failure is not None or self._stopped:
            return
        if active:
            self._active.start()
        else:
            self._active.pause()
        self.control.set_state(ControlBlock.ACTIVE if active else ControlBlock.INACTIVE)

    async def stop(self, timeout: float) -> None:
        self._stopped = True
        self._active.pause()
        self._wake_receivers()
        self.control.set_state(ControlBlock.TERMINATE)
        deadline = time.monotonic() + timeout
        pause = 1e-4
        while any(t.is_alive() for t in self._threads):
            if time.monotonic() >= deadline:
                raise KernelStateError(
                    f"cpu kernel {self.kernel_id!r} did not stop within {timeout} s "
                    "(its handler is still running; compiled code cannot be interrupted)"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.01)
        for t in self._threads:
            t.join()
        if self._wakeup is not None:
            self._wakeup.close()  # wakes receivers; no worker can signal any more

    # -- state and telemetry ---------------------------------------------------------

    def read_state(self) -> np.ndarray:
        return self.state.copy()

    def telemetry(self, state: str) -> KernelTelemetry:
        cb = self.control.snapshot()
        inc = self.in_ring.counters()
        outc = self.out_ring.counters()
        active = self._active.seconds
        return KernelTelemetry(
            kernel_id=self.kernel_id,
            backend=self.backend,
            state=state,
            messages_processed=cb["processed"],
            messages_sent=cb["emitted"],
            messages_dropped=inc.dropped + outc.dropped + cb["dropped"],
            messages_rejected=inc.rejected,
            errors=cb["errors"],
            queue_depth=inc.depth,
            queue_capacity=self.in_ring.capacity,
            output_queue_depth=outc.depth,
            throughput=cb["processed"] / active if active > 0 else 0.0,
            idle_polls=cb["idle_polls"],
            uptime_s=time.monotonic() - self._launched_at,
        )
