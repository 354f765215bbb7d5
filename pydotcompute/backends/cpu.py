"""The ``cpu`` backend: a compiled handler run by persistent ``nogil`` threads.

The user writes ``def handler(msg, out, state) -> bool``. It is compiled with Numba
and a second compiled function, the *loop*, is composed around it: the loop polls
the input ring, calls the handler on each record, pushes ``out`` to the output
ring when the handler returns True, and keeps its counters in a control block.
``workers`` threads each run the loop on the one input ring. Python code is only
involved to start, pause and stop the threads and to move records in and out.

Options (``CpuOptions``, ``@ring_kernel(options=CpuOptions(...))``): ``boundscheck`` (bool, compile the handler and
the loop with Numba bounds checking so an out-of-range index fails the kernel
instead of corrupting memory) and ``batch`` (records a worker takes per poll,
default 1024).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit, typeof
from numba.core.registry import CPUDispatcher

from pydotcompute.backends.base import (
    ErrorFactory,
    FailureCallback,
    KernelBackend,
    kernel_record_dtype,
    renamed,
)
from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.backends.handler_errors import check_handler_source, compile_error
from pydotcompute.backends.options import CpuOptions
from pydotcompute.backends.ring_fed import RingFedBackend
from pydotcompute.backends.wakeup import ReplyWakeup
from pydotcompute.errors import (
    KernelFailedError,
)
from pydotcompute.messages.record import output_header, uuid_offset
from pydotcompute.rings.atomics import (
    copy_bytes,
    cpu_pause,
    cpu_yield,
    fetch_add,
    load_acquire,
    sleep_us,
    store_release,
    store_word,
)
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.rings.control import ControlBlock
from pydotcompute.rings.host_ops import (
    backoff,
    ring_add_counter,
    ring_depth,
    ring_pop,
    ring_push,
    ring_word,
)
from pydotcompute.rings.host_ring import HostRing, ring_capacity_for
from pydotcompute.rings.layout import OFF_BACKPRESSURE, OFF_CLAIM, OFF_PUBLISHED
from pydotcompute.rings.wake import wake_signal
from pydotcompute.telemetry.snapshot import KernelTelemetry

__all__ = ["CpuKernelBackend", "ControlBlock", "compile_kernel_loop"]

__getattr__ = renamed(
    __name__, {"CpuKernelLoop": "CpuKernelBackend"}
)  # the former names, deprecated

_LITTLE_ENDIAN = sys.byteorder == "little"


_STATE = ControlBlock.STATE
_PROCESSED = ControlBlock.PROCESSED
_EMITTED = ControlBlock.EMITTED
_DROPPED = ControlBlock.DROPPED
_IDLE_POLLS = ControlBlock.IDLE_POLLS
_HEARTBEAT = ControlBlock.HEARTBEAT
_ACTIVE = ControlBlock.ACTIVE
_TERMINATE = ControlBlock.TERMINATE
_WAKE = ControlBlock.WAKE // 8
_HALT = ControlBlock.HALT
# Words of a worker's progress array: records carried over from a crashed run, to be
# handled first; the position of the record being handled in the batch; the batch's
# length (0 once it is handled); the outputs it had produced before that record.
_P_CARRIED = 0
_P_AT = 1
_P_GOT = 2
_P_EMITTED = 3
_P_STAGE = 4  # a fused kernel: the index of the handler running (see cpu_fused)
# Below every input position the worker may hold: the input ring's claim index as
# read before each take (so before it claims anything), _NO_HAND once the batch's
# outputs are placed. See settled_through.
_P_HAND = 5
_PROGRESS_WORDS = 6
_NO_HAND = np.int64(0x7FFFFFFFFFFFFFFF)
# Fresh message ids for outputs, made in the loop: a splitmix64 stream per worker,
# seeded from os.urandom (drawing them on the host instead, 16 random bytes and numpy
# masking per batch, cut end-to-end throughput from 31 to 6 M msg/s and made a
# one-record round trip 4 us -> 25 us).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# UUID version 4 and RFC 4122 variant, on the id's bytes read as two little-endian
# words: byte 6 is bits 48-55 of the first, byte 8 bits 0-7 of the second.
_V_KEEP = np.uint64(0xFF0FFFFFFFFFFFFF)
_V_SET = np.uint64(0x0040000000000000)
_VAR_KEEP = np.uint64(0xFFFFFFFFFFFFFF3F)
_VAR_SET = np.uint64(0x80)
_U30, _U27, _U31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SPIN_POLLS = 4096  # empty polls spent spinning (about 0.2 ms) before yielding the core
_YIELD_POLLS = 8192  # then yielding to other threads, then sleeping between polls
_IDLE_SLEEP_US = 200
_PAUSED_SLEEP_US = 500


@njit(nogil=True, inline="always")
def _mix(z):  # type: ignore[no-untyped-def]
    """splitmix64's output function: 64 random bits from the stream's state ``z``."""
    z = (z ^ (z >> _U30)) * _MIX1
    z = (z ^ (z >> _U27)) * _MIX2
    return z ^ (z >> _U31)


def _compose(
    handler: Any,
    boundscheck: bool,
    out_rs: int,
    in_rs: int,
    id_at: int,
    corr_at: int,
    out_id_at: int,
    carry_at: int = -1,
) -> Any:
    """The persistent loop around one compiled handler.

    Every output record starts as a copy of ``out_blank`` (the default header) with
    a fresh ``message_id`` at byte ``out_id_at`` (when >= 0) and the input's
    ``message_id`` at byte ``id_at`` copied to its ``correlation_id`` at byte
    ``corr_at`` (when both are >= 0); what the handler writes over them is kept. The
    ids come from the worker's splitmix64 stream, its state ``ids[0]`` held in a
    register while the loop runs, and are written before the handler runs rather than
    checked for zero after it: keeping the state in memory and copying each id out of
    the record to test it cost the loop 60 % of its speed (58 against 146 M records
    per CPU-second for 56-byte records in cache, same machine), this way about 10 %.
    ``progress`` tells the host, should the handler raise, which record it was on and
    what the batch had produced. With ``carry_at`` >= 0 (a kernel whose outputs feed
    another kernel through a link) each output keeps the input's ``message_id`` from
    byte ``carry_at`` instead of a fresh one, so the kernel after it answers with the
    id the request entered the linked chain with.
    """
    correlate = id_at >= 0
    carry = carry_at >= 0 and out_id_at >= 0
    make_ids = out_id_at >= 0 and not carry

    def kernel_loop(in_buf, out_buf, ctrl, state, in_batch, out_batch, out_blank, progress, ids):  # type: ignore[no-untyped-def]
        batch = in_batch.shape[0]
        out_blocks = load_acquire(out_buf, OFF_BACKPRESSURE) == 0
        idle = 0
        seed = ids[0]
        while True:
            mode = load_acquire(ctrl, _STATE)
            if mode == _TERMINATE or mode == _HALT:
                fetch_add(ctrl, _IDLE_POLLS, idle & 63)
                ids[0] = seed
                return
            if mode != _ACTIVE:
                # Paused, it holds nothing (unless records a crashed run left it): its
                # last reading must not hold the others up.
                if progress[_P_CARRIED] == 0:
                    store_release(progress, _P_HAND * 8, _NO_HAND)
                fetch_add(ctrl, _HEARTBEAT, 1)
                sleep_us(_PAUSED_SLEEP_US)
                continue
            got = progress[_P_CARRIED]
            if got > 0:
                progress[_P_CARRIED] = 0  # left by a crashed run: handled first
            else:
                # Released by the claim's compare-and-swap: a host that reads the claim
                # index past a record this worker takes also reads this hand.
                store_release(progress, _P_HAND * 8, load_acquire(in_buf, OFF_CLAIM))
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
            progress[_P_GOT] = got
            k = 0
            for i in range(got):
                progress[_P_AT] = i
                progress[_P_EMITTED] = k
                copy_bytes(out_batch, k * out_rs, out_blank, 0, out_rs)
                if make_ids:
                    seed += _GOLDEN
                    hi = (_mix(seed) & _V_KEEP) | _V_SET
                    seed += _GOLDEN
                    lo = (_mix(seed) & _VAR_KEEP) | _VAR_SET
                    store_word(out_batch, k * out_rs + out_id_at, np.int64(hi))
                    store_word(out_batch, k * out_rs + out_id_at + 8, np.int64(lo))
                if carry:
                    copy_bytes(
                        out_batch, k * out_rs + out_id_at, in_batch, i * in_rs + carry_at, 16
                    )
                if correlate:
                    copy_bytes(out_batch, k * out_rs + corr_at, in_batch, i * in_rs + id_at, 16)
                if handler(in_batch[i], out_batch[k], state):
                    k += 1
            progress[_P_GOT] = 0
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
                        ids[0] = seed
                        return
                    spins = backoff(min(spins, 300))
                    got = ring_push(out_buf, out_batch, placed * out_rs, k - placed)
                    if got:
                        wake_signal(ctrl, _WAKE)
                    placed += got
            fetch_add(ctrl, _EMITTED, k)
            store_release(progress, _P_HAND * 8, _NO_HAND)  # after the outputs' publish

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
    carry_ids: bool = False,
) -> Callable[..., None]:
    """Compile ``func`` and the loop around it for these record dtypes (cached).

    The handler is compiled alone first, so numba's error, when it does not compile
    for them, is located in the handler rather than in the loop's call to it.
    ``carry_ids``: outputs keep their input's ``message_id`` (a linked kernel's loop)."""
    in_batch = np.zeros(1, in_dtype)
    out_batch = np.zeros(1, out_dtype)
    buf = np.zeros(8, np.uint8)
    ctrl = np.zeros(1, np.int64)
    ids = np.zeros(1, np.uint64)
    sig = tuple(
        typeof(a) for a in (buf, buf, ctrl, state, in_batch, out_batch, out_batch, ctrl, ids)
    )
    key = (sig, bool(boundscheck), bool(carry_ids))
    with _LOOPS_LOCK:
        per_func = _LOOPS.setdefault(func, {})
        loop = per_func.get(key)
        if loop is None:
            py = func.py_func if isinstance(func, CPUDispatcher) else func
            handler = njit(nogil=True, boundscheck=boundscheck)(py)
            handler.compile((typeof(in_batch[0]), typeof(out_batch[0]), typeof(state)))
            _, id_at, corr_at = output_header(in_dtype, out_dtype)
            # The word trick for ids needs a little-endian host.
            out_id_at = uuid_offset(out_dtype, "message_id") if _LITTLE_ENDIAN else -1
            loop = _compose(
                handler,
                boundscheck,
                out_dtype.itemsize,
                in_dtype.itemsize,
                id_at,
                corr_at,
                out_id_at,
                uuid_offset(in_dtype, "message_id") if carry_ids else -1,
            )
            loop.compile(sig)
            per_func[key] = loop
    return loop  # type: ignore[no-any-return]


class _Run:
    """One run of a kernel's workers, from launch (or a restart) until they have all
    exited, their progress words, and what they left behind if the handler raised: the
    first exception, the record it raised on, and the records of their batches not yet
    handled."""

    __slots__ = (
        "event_loop",
        "loop_fn",
        "blank",
        "lock",
        "alive",
        "crash",
        "failed",
        "carried",
        "progress",
    )

    def __init__(
        self, event_loop: asyncio.AbstractEventLoop, loop_fn: Callable[..., None], blank: Any
    ) -> None:
        self.event_loop = event_loop
        self.loop_fn = loop_fn
        self.blank = blank
        self.lock = threading.Lock()
        self.alive = 0
        self.crash: BaseException | None = None
        self.failed: np.ndarray | None = None
        self.carried: list[np.ndarray] = []
        self.progress: list[np.ndarray] = []  # each worker's progress words


class _Mover:
    """Moves records from one ring into another on the host, in order, under the
    target's strategy, holding what did not fit (the records a kernel produced before
    it was linked go ahead of what it produces after)."""

    __slots__ = ("src", "dst", "held", "scratch")

    def __init__(self, src: HostRing, dst: HostRing) -> None:
        self.src, self.dst = src, dst
        self.scratch = np.empty(min(1024, src.capacity), src.dtype)
        self.held: np.ndarray | None = None

    def step(self) -> bool:
        """Move what can move now; True once the source is empty and nothing is held."""
        if self.held is None:
            got = int(ring_pop(self.src.buffer, self.scratch, 0, len(self.scratch)))
            if got == 0:
                return True
            self.held = self.scratch[:got].copy()
        placed = int(ring_push(self.dst.buffer, self.held, 0, len(self.held)))
        if placed == len(self.held) or self.dst.backpressure is not BackpressureStrategy.BLOCK:
            self.held = None  # the rest was dropped or refused, and counted by the ring
        else:
            self.held = self.held[placed:]
        return False


class _Outlet:
    """Where a kernel's workers push their outputs: its own output ring, or the input
    ring of the kernel it is linked to (``peer``), and the transition between them."""

    __slots__ = ("ring", "peer", "relinking", "want_active")

    def __init__(self, ring: HostRing) -> None:
        self.ring = ring
        self.peer: CpuKernelBackend | None = None
        self.relinking = False
        self.want_active = False  # what set_active asked for while relinking


class CpuKernelBackend(RingFedBackend):
    """A ``cpu`` ring kernel: ``workers`` threads running the compiled loop.

    With several workers, records of one input ring are processed concurrently:
    each worker keeps the order of the records it took, but outputs of different
    workers interleave. The ``state`` array is shared by all workers.

    When the handler raises, the worker queues the outputs its batch had produced,
    the other workers finish their batches (HALT) and the crash is reported once all
    have exited, so every output produced is in the output ring by then. The rest of
    the failing batch is kept: a ``restart`` handles it first.
    """

    backend = "cpu"
    restartable = True
    outputs_have_ids = _LITTLE_ENDIAN

    def __new__(cls, kernel_id: str, func: Any, *args: Any, **kwargs: Any) -> CpuKernelBackend:
        # A chain of handlers (the coordinator's fused stages) runs in a loop of its own.
        if cls is CpuKernelBackend and getattr(func, "fused_handlers", False):
            from pydotcompute.backends.cpu_fused import FusedCpuKernelBackend

            cls = FusedCpuKernelBackend
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
        self.in_dtype = kernel_record_dtype(input_type, "input", kernel_id, "cpu")
        self.out_dtype = kernel_record_dtype(output_type, "output", kernel_id, "cpu")
        options = config.options_for(CpuOptions)
        self.boundscheck = options.boundscheck
        self.batch = options.batch
        self.in_ring = HostRing(
            ring_capacity_for(config.queue_size), self.in_dtype, backpressure=config.backpressure
        )
        self.out_ring = HostRing(
            ring_capacity_for(config.effective_output_queue_size),
            self.out_dtype,
            backpressure=self.output_strategy,
        )
        self.control = ControlBlock()
        self.state = (
            np.zeros(0, np.float64) if config.state is None else np.array(config.state, copy=True)
        )
        self._threads: list[threading.Thread] = []
        self._run: _Run | None = None
        self._outlet = _Outlet(self.out_ring)
        self._attach_rings(
            self.in_ring, self.out_ring, ReplyWakeup(self.control.words, ControlBlock.WAKE // 8)
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        event_loop = asyncio.get_running_loop()
        try:
            self._check_source()
            # Compiling takes a while the first time; keep the event loop responsive.
            loop_fn = await asyncio.to_thread(self._compile_loop)
            for ring in (self.in_ring, self.out_ring):
                await asyncio.to_thread(ring.prepare)
        except KernelFailedError as refused:  # before compiling: already explained
            self.failure = refused
            raise
        except Exception as exc:
            err = compile_error(
                self.func, self.kernel_id, "cpu", exc, self.in_dtype, self.out_dtype
            )
            self.failure = err
            raise err from err.__cause__
        blank, _, _ = output_header(self.in_dtype, self.out_dtype)
        self._start_workers(_Run(event_loop, loop_fn, blank), np.zeros(0, self.in_dtype))

    def _check_source(self) -> None:
        """Refuse a handler the backend cannot compile, before compiling it."""
        check_handler_source(self.func, self.kernel_id, "cpu")

    def _compile_loop(self, carry_ids: bool = False) -> Callable[..., None]:
        """The compiled loop the workers run (on a thread: compiling takes a while);
        ``carry_ids`` for a kernel linked to another (see ``relink_output``)."""
        return compile_kernel_loop(
            self.func,
            self.in_dtype,
            self.out_dtype,
            self.state,
            boundscheck=self.boundscheck,
            carry_ids=carry_ids,
        )

    def _worker_args(self) -> tuple[Any, ...]:
        """Arguments after the loop's usual ones, one set per worker."""
        return ()

    def _crash_error(self, exc: BaseException, progress: np.ndarray) -> BaseException:
        """What the kernel reports when its handler raised ``exc``."""
        return exc

    def _start_workers(self, run: _Run, carried: np.ndarray) -> None:
        """Start ``workers`` threads of ``run``; worker 0 handles ``carried`` first."""
        self._run = run
        width = min(self.batch, self.in_ring.capacity)
        run.alive = self.config.workers
        self._threads = []
        for w in range(self.config.workers):
            n = max(width, len(carried)) if w == 0 else width
            in_batch, out_batch = np.zeros(n, self.in_dtype), np.zeros(n, self.out_dtype)
            progress = np.zeros(_PROGRESS_WORDS, np.int64)
            progress[_P_HAND] = _NO_HAND
            ids = np.frombuffer(os.urandom(8), np.uint64).copy()  # a stream per worker
            if w == 0 and len(carried):
                in_batch[: len(carried)] = carried
                progress[_P_CARRIED] = len(carried)
                progress[_P_HAND] = 0  # holds records of unknown positions, taken earlier
            run.progress.append(progress)
            t = threading.Thread(
                target=self._work,
                args=(run, in_batch, out_batch, progress, ids, self._worker_args()),
                name=f"pydotcompute-cpu-{self.kernel_id}-{w}",
                daemon=True,  # never keep the interpreter alive; stop() joins them
            )
            self._threads.append(t)
        for t in self._threads:
            t.start()

    def _work(
        self,
        run: _Run,
        in_batch: np.ndarray,
        out_batch: np.ndarray,
        progress: np.ndarray,
        ids: np.ndarray,
        extra: tuple[Any, ...],
    ) -> None:
        try:
            run.loop_fn(
                self.in_ring.buffer,
                self._outlet.ring.buffer,
                self.control.words,
                self.state,
                in_batch,
                out_batch,
                run.blank,
                progress,
                ids,
                *extra,
            )
        except BaseException as exc:  # reported, never swallowed: the kernel goes FAILED
            self._crashed(run, self._crash_error(exc, progress), in_batch, out_batch, progress)
        finally:
            with run.lock:
                run.alive -= 1
                last = run.alive == 0
            if last and run.crash is not None:
                try:
                    run.event_loop.call_soon_threadsafe(self._report, run)
                except RuntimeError:
                    # The event loop is closed: nobody is left to tell. The failure
                    # stays in the control block.
                    pass

    def _crashed(
        self,
        run: _Run,
        exc: BaseException,
        in_batch: np.ndarray,
        out_batch: np.ndarray,
        progress: np.ndarray,
    ) -> None:
        """On a worker whose handler raised: stop the others, keep what the batch left."""
        got, at, emitted = int(progress[_P_GOT]), int(progress[_P_AT]), int(progress[_P_EMITTED])
        words = self.control.words
        with run.lock:
            if run.crash is None:
                run.crash = exc
                run.failed = in_batch[at : at + 1].copy() if at < got else None
            if at + 1 < got:
                run.carried.append(in_batch[at + 1 : got].copy())
            words[ControlBlock.ERRORS // 8] += 1
            words[ControlBlock.ERROR_CODE // 8] = ControlBlock.ERR_HANDLER
            if self.control[ControlBlock.STATE] != ControlBlock.TERMINATE:
                self.control.set_state(ControlBlock.HALT)  # the other workers stop too
        if got:  # the outputs produced before the record that raised go out
            self._queue_outputs(out_batch, emitted)

    def _queue_outputs(self, out_batch: np.ndarray, k: int) -> None:
        """Push ``k`` outputs as the loop would: waiting for room under BLOCK unless
        the kernel is terminated (then they are counted as dropped), and waking a
        receiver asleep on the output ring after each push that placed any."""
        ring = self._outlet.ring
        buf, rs, words = ring.buffer, out_batch.dtype.itemsize, self.control.words
        placed = int(ring_push(buf, out_batch, 0, k))
        if placed:
            wake_signal(words, _WAKE)
        pause = 1e-5
        while placed < k and ring.backpressure is BackpressureStrategy.BLOCK:
            if self.control[ControlBlock.STATE] == ControlBlock.TERMINATE:
                ring_add_counter(words, _DROPPED, k - placed)
                return
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
            more = int(ring_push(buf, out_batch, placed * rs, k - placed))
            if more:
                wake_signal(words, _WAKE)
            placed += more
        ring_add_counter(words, _EMITTED, k)

    def _report(self, run: _Run) -> None:
        if run is not self._run or run.crash is None:
            return
        self.active_time.pause()
        failed = run.failed
        if failed is not None:
            self.failed_input = self._input_of(failed)
        self.on_failure(run.crash)

    def _input_of(self, one: np.ndarray) -> Any:
        """An input record as the message it was sent as (the record for dtypes)."""
        t = self.input_type
        if isinstance(t, type) and hasattr(t, "from_record"):
            try:
                return t.from_record(one[0])
            except Exception:  # noqa: BLE001 - a record that decodes badly is shown raw
                return one[0]
        return one[0]

    async def restart(self) -> None:
        run = self._run
        pause = 1e-4
        while any(t.is_alive() for t in self._threads):  # they exit once they see HALT
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.01)
        assert run is not None
        carried = np.concatenate(run.carried) if run.carried else np.zeros(0, self.in_dtype)
        # The handler starts over from the declared state, as it did at launch.
        initial = self.config.state
        self.state[...] = 0 if initial is None else initial
        self.failed_input = None
        self.control.words[ControlBlock.ERROR_CODE // 8] = ControlBlock.ERR_NONE
        self.control.set_state(ControlBlock.INACTIVE)
        self._start_workers(_Run(run.event_loop, run.loop_fn, run.blank), carried)

    def close_failed(self, error: ErrorFactory) -> int:
        self.failure = error()
        self.control.set_state(ControlBlock.TERMINATE)
        # Inputs nobody will handle: those its batch left, then those in the ring
        # (every worker has exited, so the host may consume them).
        discarded = self._drop_carried()
        if not any(t.is_alive() for t in self._threads) and ring_depth(self.in_ring.buffer):
            scratch = np.empty(min(1024, self.in_ring.capacity), self.in_dtype)
            while True:
                got = int(ring_pop(self.in_ring.buffer, scratch, 0, len(scratch)))
                if got == 0:
                    break
                discarded += got
        if discarded:
            ring_add_counter(self.control.words, _DROPPED, discarded)
        self._wake_receivers()  # they take what is left, then get the error
        return discarded

    def _drop_carried(self) -> int:
        """Forget the records a crashed run left for its restart; returns how many."""
        run = self._run
        if run is None:
            return 0
        n = sum(len(c) for c in run.carried)
        run.carried = []
        return n

    def set_active(self, active: bool) -> None:
        if self.failure is not None or self._stopped:
            return
        self._track_active(active)
        if self._outlet.relinking:  # the workers are being re-pointed: applied after
            self._outlet.want_active = active
            return
        self.control.set_state(ControlBlock.ACTIVE if active else ControlBlock.INACTIVE)

    # -- links -----------------------------------------------------------------------

    @property
    def linked_to(self) -> CpuKernelBackend | None:
        """The kernel whose input ring this one's workers push into, if linked."""
        return self._outlet.peer

    def consuming(self) -> bool:
        """Whether workers may still take records from the input ring."""
        return any(t.is_alive() for t in self._threads)

    def ended(self) -> bool:
        """Stopped or failed for good, and no worker runs: nothing will take its input
        (a kernel waiting for its restart has not ended: its queue waits for it)."""
        return (self._stopped or self.failure is not None) and not self.consuming()

    def link_refusal(self, peer: KernelBackend) -> str | None:
        """Outputs feed another ``cpu`` kernel of this process whose input records are
        this kernel's output records."""
        if not isinstance(peer, CpuKernelBackend):
            return f"{peer.kernel_id!r} runs on {peer.backend} (links join cpu kernels)"
        if self.out_dtype != peer.in_dtype:
            return (
                f"{self.kernel_id!r} outputs records {self.out_dtype}, "
                f"{peer.kernel_id!r} takes {peer.in_dtype}"
            )
        return None

    def link_path(self) -> str | None:
        """The linked kernel's input ring, in this process's memory."""
        peer = self._outlet.peer
        return None if peer is None else f"the input ring of {peer.kernel_id!r} (process memory)"

    async def relink_output(self, peer: KernelBackend | None) -> None:
        """Push outputs into ``peer``'s input ring (a link), or into this kernel's own
        output ring again (None).

        The workers finish the batch in hand, placing its outputs where they went until
        now (waiting for room under BLOCK), exit, and start again on the new ring with
        the loop for it (a linked loop keeps each input's ``message_id`` on its
        outputs). Outputs still in the own output ring move into ``peer``'s ring first,
        in order, under its strategy. When the old peer has stopped consuming, what
        this kernel leaves in its ring is discarded and counted as its dropped records.
        A kernel that crashed and awaits its restart is re-pointed without threads:
        the restart starts them on the new ring. Cancelling the call does not cancel
        the re-pointing (workers half-way would be left stopped)."""
        await asyncio.shield(asyncio.ensure_future(self._relink(peer)))

    async def _relink(self, peer: KernelBackend | None) -> None:
        run = self._run
        assert run is not None, "relink_output needs a started kernel"
        assert peer is None or isinstance(peer, CpuKernelBackend)
        outlet = self._outlet
        old_peer = outlet.peer
        new_ring = self.out_ring if peer is None else peer.in_ring
        loop_fn = await asyncio.to_thread(self._compile_loop, peer is not None)
        if peer is not None:
            await asyncio.to_thread(peer.in_ring.prepare)
        outlet.want_active = self.control[ControlBlock.STATE] == ControlBlock.ACTIVE
        outlet.relinking = True
        moving = _Mover(self.out_ring, new_ring) if peer is not None else None
        try:
            if self.control[ControlBlock.STATE] != ControlBlock.TERMINATE:
                self.control.set_state(ControlBlock.HALT)  # finish the batch, then exit
            pause = 1e-4
            while any(t.is_alive() for t in self._threads):
                # Make room for a worker waiting to place the batch it holds.
                if moving is not None and outlet.ring is self.out_ring:
                    moving.step()
                elif old_peer is not None and old_peer.ended():
                    old_peer.discard_inputs()
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2e-3)
            for t in self._threads:
                t.join()
            if old_peer is not None and old_peer.ended():
                old_peer.discard_inputs()  # what the last batch placed there
            old_ring = outlet.ring
            # From here a restart (after a crash meanwhile) starts on the new ring.
            outlet.ring, outlet.peer = new_ring, peer
            run.loop_fn = loop_fn
            if moving is not None and old_ring is self.out_ring:
                pause = 1e-4
                while not moving.step():
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 2e-3)
        finally:
            outlet.relinking = False
        state = ControlBlock.ACTIVE if outlet.want_active else ControlBlock.INACTIVE
        if self.failure is not None or self._stopped:
            return
        if self._run is not run:  # restarted meanwhile, on the new ring
            self.control.set_state(state)
            return
        if run.crash is not None:
            return  # the restart (or the failure) to come takes it from here
        self.control.set_state(ControlBlock.INACTIVE)
        self._start_workers(_Run(run.event_loop, loop_fn, run.blank), np.zeros(0, self.in_dtype))
        self.control.set_state(state)

    def discard_inputs(self) -> int:
        """Take and discard what waits in the input ring, counted as dropped, once the
        kernel has ended (a stopped or failed kernel a linked one still feeds)."""
        if not self.ended():
            return 0
        scratch = np.empty(min(1024, self.in_ring.capacity), self.in_dtype)
        discarded = 0
        while got := int(ring_pop(self.in_ring.buffer, scratch, 0, len(scratch))):
            discarded += got
        if discarded:
            ring_add_counter(self.control.words, _DROPPED, discarded)
        return discarded

    async def stop(self, timeout: float) -> None:
        self._stopped = True
        self.active_time.pause()
        self._wake_receivers()
        self.control.set_state(ControlBlock.TERMINATE)
        await self._wait_exit(
            lambda: not any(t.is_alive() for t in self._threads),
            timeout,
            "its handler is still running; compiled code cannot be interrupted",
        )
        for t in self._threads:
            t.join()
        dropped = self._drop_carried()  # terminated while it waited for its restart
        if dropped:
            ring_add_counter(self.control.words, _DROPPED, dropped)
        if self._wakeup is not None:
            self._wakeup.close()  # wakes receivers; no worker can signal any more

    # -- when a request without a reply was dropped ----------------------------------

    def _keeps_records(self) -> bool:
        return super()._keeps_records() and (
            self._outlet.ring.backpressure is BackpressureStrategy.BLOCK
        )

    def outputs_taken(self) -> int | None:
        if self._outlet.peer is not None:
            return None  # its outputs go into the linked kernel's ring, not its own
        return super().outputs_taken()

    def settled_through(self, upto: int) -> int | None:
        """Workers take batches concurrently and their outputs interleave, so each
        says what it may hold: its *hand*, the claim index as it read it before taking
        a batch (below anything it takes), until the batch's outputs are published.
        The claim index at ``upto`` or past it (every record below was taken), then
        every hand at ``upto`` or past it (no worker holds one of them), means their
        outputs lie below the outlet ring's ``published``, read after. Under a steady
        stream too: a worker's hand moves on with each batch."""
        run = self._run
        if run is None or not self._keeps_records():
            return None
        if int(ring_word(self.in_ring.buffer, OFF_CLAIM)) < upto:
            return None
        for progress in run.progress:
            if int(ring_word(progress, _P_HAND * 8)) < upto:
                return None
        return int(ring_word(self._outlet.ring.buffer, OFF_PUBLISHED))

    # -- state and telemetry ---------------------------------------------------------

    def read_state(self) -> np.ndarray:
        return self.state.copy()

    def telemetry(self, state: str) -> KernelTelemetry:
        cb = self.control.snapshot()
        inc = self.in_ring.counters()
        outc = self.out_ring.counters()
        return self._telemetry(
            state,
            cb["processed"],
            messages_sent=cb["emitted"],
            messages_dropped=inc.dropped + outc.dropped + cb["dropped"],
            messages_rejected=inc.rejected,
            errors=cb["errors"],
            queue_depth=inc.depth,
            queue_capacity=self.in_ring.capacity,
            output_queue_depth=outc.depth,
            idle_polls=cb["idle_polls"],
        )
