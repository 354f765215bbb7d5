"""``HostRing``: a ring buffer driven from Python threads on the host."""

from __future__ import annotations

import dataclasses
import time

import numba
import numpy as np

from pydotcompute.errors import InvalidConfigurationError, QueueFullError
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.rings.host_ops import (
    ring_add_counter,
    ring_depth,
    ring_pop,
    ring_pop_spin,
    ring_push,
    ring_ready,
    ring_try_push,
)
from pydotcompute.rings.layout import (
    HEADER_SIZE,
    OFF_CAPACITY,
    OFF_CLAIM,
    OFF_DEQUEUED,
    OFF_DROP_BEFORE,
    OFF_DROPPED_NEWEST,
    OFF_DROPPED_OLDEST,
    OFF_ENQUEUED,
    OFF_HIGH_WATER,
    OFF_PUBLISHED,
    OFF_REJECTED,
    OFF_RELEASED,
    OFF_RESERVE,
    RingSide,
    aligned_buffer,
    init_ring,
    ring_nbytes,
    validate_ring,
)

__all__ = ["HostRing", "RingCounters", "ring_capacity_for", "Backoff"]


def ring_capacity_for(queue_size: int) -> int:
    """The ring capacity for a requested queue size: the next power of two, >= 2."""
    return max(2, 1 << (max(1, queue_size) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class RingCounters:
    """A snapshot of a ring's header: indices and counters (advisory under traffic)."""

    capacity: int
    published: int
    released: int
    enqueued: int
    dequeued: int
    dropped_newest: int
    dropped_oldest: int
    rejected: int
    high_water: int
    drop_before: int

    @classmethod
    def of_header(cls, header: np.ndarray) -> RingCounters:
        """The counters in a copy of a ring's header (its first ``HEADER_SIZE`` bytes,
        any dtype), as ``HostRing.counters`` reads them from the ring itself."""
        w = np.ascontiguousarray(header).view("<u8")
        return cls(
            capacity=int(w[OFF_CAPACITY // 8]),
            published=int(w[OFF_PUBLISHED // 8]),
            released=int(w[OFF_RELEASED // 8]),
            enqueued=int(w[OFF_ENQUEUED // 8]),
            dequeued=int(w[OFF_DEQUEUED // 8]),
            dropped_newest=int(w[OFF_DROPPED_NEWEST // 8]),
            dropped_oldest=int(w[OFF_DROPPED_OLDEST // 8]),
            rejected=int(w[OFF_REJECTED // 8]),
            high_water=int(w[OFF_HIGH_WATER // 8]),
            drop_before=int(w[OFF_DROP_BEFORE // 8]),
        )

    @property
    def depth(self) -> int:
        """Records published and not yet released."""
        return min(max(self.published - self.released, 0), self.capacity)

    @property
    def dropped(self) -> int:
        """All records discarded by either side."""
        return self.dropped_newest + self.dropped_oldest


class Backoff:
    """Waiting policy of a thread that polls a ring: retry a few times, then yield the
    GIL, then sleep with growing pauses (50 µs up to 1 ms)."""

    __slots__ = ("deadline", "n")

    def __init__(self, timeout: float | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.n = 0

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def pause(self) -> float:
        """The next pause in seconds (0.0 while still spinning)."""
        self.n += 1
        if self.n < 32:
            return 0.0
        return min(1e-3, 5e-5 * (1 << min(5, (self.n - 32) // 16)))

    def wait(self) -> bool:
        """Pause once; False when the deadline has passed."""
        if self.expired():
            return False
        p = self.pause()
        time.sleep(p)
        return True


class HostRing:
    """A lock-free multi-producer multi-consumer ring of fixed-size records.

    The bytes live in ``buffer`` (a 1-d uint8 numpy array: any memory, including
    pinned or mapped host memory) laid out as ``docs/ring-protocol.md`` says. All
    operations run in compiled code without the GIL; waits happen here, in Python,
    with back-off. ``dtype`` (a numpy structured dtype) is checked on every batch;
    without one, only the record size is.

    Several threads may push and pop concurrently: nothing is lost or duplicated and
    each producer's records come out in the order it pushed them.
    """

    def __init__(
        self,
        capacity: int,
        dtype: np.dtype | None = None,
        *,
        record_size: int | None = None,
        backpressure: BackpressureStrategy | str | int = BackpressureStrategy.BLOCK,
        buffer: np.ndarray | None = None,
        producer_side: RingSide = RingSide.HOST,
        consumer_side: RingSide = RingSide.HOST,
    ) -> None:
        self.dtype = None if dtype is None else np.dtype(dtype)
        if record_size is None:
            if self.dtype is None:
                raise InvalidConfigurationError("a ring needs a record dtype or a record size")
            record_size = self.dtype.itemsize
        elif self.dtype is not None and self.dtype.itemsize != record_size:
            raise InvalidConfigurationError(
                f"record_size {record_size} does not match dtype {self.dtype} "
                f"of {self.dtype.itemsize} bytes"
            )
        if buffer is None:
            crossing = RingSide(producer_side) is not RingSide(consumer_side)
            buffer = aligned_buffer(ring_nbytes(capacity, record_size, crossing))
        init_ring(buffer, capacity, record_size, backpressure, producer_side, consumer_side)
        self._attach(buffer)

    @classmethod
    def attach(cls, buffer: np.ndarray, dtype: np.dtype | None = None) -> HostRing:
        """Use a ring that already exists in ``buffer`` (its header is validated)."""
        self = cls.__new__(cls)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self._attach(buffer)
        if self.dtype is not None and self.dtype.itemsize != self.record_size:
            raise InvalidConfigurationError(
                f"dtype {self.dtype} of {self.dtype.itemsize} bytes does not match the "
                f"ring's record size {self.record_size}"
            )
        return self

    def _attach(self, buffer: np.ndarray) -> None:
        meta = validate_ring(buffer)
        self.buffer = buffer
        self.capacity: int = meta["capacity"]
        self.record_size: int = meta["record_size"]
        self.backpressure = BackpressureStrategy(meta["backpressure"])
        self.producer_side = RingSide(meta["producer_side"])
        self.consumer_side = RingSide(meta["consumer_side"])
        # Producer and consumer on different sides: slots carry tags (protocol 4.4).
        self.crossing = self.producer_side is not self.consumer_side
        self._words = buffer[:HEADER_SIZE].view("<u8")
        self._typed = self.dtype is not None and _compiles_for(self.dtype)

    # -- records ---------------------------------------------------------------------

    def _arg(self, records: np.ndarray) -> tuple[np.ndarray, int]:
        """``records`` as the compiled operations take them, and their count.

        Typed rings pass the record array itself (Numba compiles once per dtype and
        dispatches faster than it takes numpy to make a byte view); untyped rings, and
        dtypes Numba cannot type, pass a uint8 view."""
        if not isinstance(records, np.ndarray):
            raise TypeError(f"expected a numpy record array, got {type(records).__name__}")
        if self.dtype is not None:
            if records.dtype != self.dtype:
                raise TypeError(f"ring carries records of dtype {self.dtype}, got {records.dtype}")
        elif records.dtype.itemsize != self.record_size:
            raise TypeError(
                f"ring carries {self.record_size}-byte records, got dtype {records.dtype} "
                f"of {records.dtype.itemsize} bytes"
            )
        if records.ndim != 1 or not records.flags.c_contiguous:
            records = np.ascontiguousarray(records.reshape(-1))
        n = len(records)
        return (records if self._typed else records.view(np.uint8)), n

    def _empty(self, n: int) -> np.ndarray:
        if self.dtype is not None:
            return np.empty(n, self.dtype)
        return np.empty(n, np.dtype((np.void, self.record_size)))

    def _check_producer(self) -> None:
        if self.producer_side is not RingSide.HOST:
            raise InvalidConfigurationError("this ring's producer side is the device")

    def _check_consumer(self) -> None:
        if self.consumer_side is not RingSide.HOST:
            raise InvalidConfigurationError("this ring's consumer side is the device")

    def prepare(self) -> None:
        """Compile this ring's host operations for its records now.

        Numba compiles them per record type on first use; a kernel calls this at
        launch so its first batch does not wait for the compiler.
        """
        arr, _ = self._arg(self._empty(0))
        buf = numba.typeof(self.buffer)
        sig = (buf, numba.typeof(arr), numba.int64, numba.int64)
        for op in (ring_push, ring_try_push, ring_pop):
            op.compile(sig)
        ring_pop_spin.compile((*sig, numba.int64))
        ring_depth.compile((buf,))
        ring_ready.compile((buf,))

    # -- produce ---------------------------------------------------------------------

    def try_push_batch(self, records: np.ndarray) -> int:
        """One non-waiting attempt under the ring's strategy; returns how many of
        ``records`` went into the ring (BLOCK: those that fitted now)."""
        self._check_producer()
        arr, n = self._arg(records)
        return int(ring_push(self.buffer, arr, 0, n))

    def push_batch(self, records: np.ndarray, timeout: float | None = None) -> int:
        """Produce a record array under the ring's strategy; returns how many went in.

        BLOCK waits for room (``timeout`` None: forever); on timeout the rest are
        counted as rejected and ``QueueFullError`` is raised. REJECT and DROP_NEWEST
        take what fits and count the rest. DROP_OLDEST keeps the newest records; when
        the consumer is on the other side it waits up to ``timeout`` (None: 1 s) for
        the consumer to skip stale records, then drops the rest as newest.
        """
        self._check_producer()
        arr, n = self._arg(records)
        rs = self.record_size
        placed = int(ring_push(self.buffer, arr, 0, n))
        strategy = self.backpressure
        waits = strategy is BackpressureStrategy.BLOCK or (
            strategy is BackpressureStrategy.DROP_OLDEST
            and self.producer_side is not self.consumer_side
        )
        if placed == n or not waits:
            return placed
        if strategy is BackpressureStrategy.DROP_OLDEST and timeout is None:
            timeout = 1.0
        backoff = Backoff(timeout)
        while placed < n:
            if not backoff.wait():
                break
            placed += int(ring_push(self.buffer, arr, placed * rs, n - placed))
        if placed < n:
            if strategy is BackpressureStrategy.BLOCK:
                ring_add_counter(self.buffer, OFF_REJECTED, n - placed)
                raise QueueFullError(
                    f"ring full: {placed} of {n} record(s) accepted before the {timeout} s timeout"
                )
            ring_add_counter(self.buffer, OFF_DROPPED_NEWEST, n - placed)
        return placed

    def push(self, record: np.ndarray | np.void, timeout: float | None = None) -> bool:
        """Produce one record. True when it went in, False when it was dropped
        (DROP_NEWEST); ``QueueFullError`` under REJECT or a timed-out BLOCK."""
        arr = np.asarray(record).reshape(1) if isinstance(record, np.void) else record
        got = self.push_batch(arr, timeout)
        if got == 0 and self.backpressure is BackpressureStrategy.REJECT:
            raise QueueFullError(f"ring full ({self.capacity} records): message rejected")
        return got == 1

    # -- consume ---------------------------------------------------------------------

    def try_pop_into(self, out: np.ndarray) -> int:
        """Fill ``out`` with up to ``len(out)`` records without waiting; returns how many."""
        self._check_consumer()
        if out.ndim != 1 or not out.flags.c_contiguous:
            raise ValueError("out must be a 1-d contiguous record array")
        arr, n = self._arg(out)
        return int(ring_pop(self.buffer, arr, 0, n))

    def pop_batch(self, max_items: int, timeout: float | None = 0.0) -> np.ndarray:
        """Up to ``max_items`` records, waiting up to ``timeout`` s (None: forever) for
        the first; an empty array when none came."""
        self._check_consumer()
        arr, _ = self._arg(self._empty(max_items))
        got = int(ring_pop(self.buffer, arr, 0, max_items))
        if got == 0 and timeout != 0:
            backoff = Backoff(timeout)
            while got == 0 and backoff.wait():
                got = int(ring_pop(self.buffer, arr, 0, max_items))
        out = arr if self._typed else arr.view(self._empty(0).dtype)
        return out[:got]

    def pop(self, timeout: float | None = 0.0) -> np.void | None:
        """One record, or None when none came within ``timeout`` s."""
        got = self.pop_batch(1, timeout)
        return got[0] if len(got) else None

    # -- inspection ------------------------------------------------------------------

    def counters(self) -> RingCounters:
        """Read the header's indices and counters (no synchronisation with traffic)."""
        return RingCounters.of_header(self._words)

    @property
    def depth(self) -> int:
        """Records published and not yet released (a snapshot)."""
        w = self._words
        d = int(w[OFF_PUBLISHED // 8]) - int(w[OFF_RELEASED // 8])
        return min(max(d, 0), self.capacity)

    def __len__(self) -> int:
        return self.depth

    def _indices(self) -> tuple[int, int, int, int]:
        """(released, claim, published, reserve): for tests of the invariants."""
        w = self._words
        return (
            int(w[OFF_RELEASED // 8]),
            int(w[OFF_CLAIM // 8]),
            int(w[OFF_PUBLISHED // 8]),
            int(w[OFF_RESERVE // 8]),
        )

    def __repr__(self) -> str:
        return (
            f"HostRing(capacity={self.capacity}, record_size={self.record_size}, "
            f"backpressure={self.backpressure.name}, depth={self.depth})"
        )


def _compiles_for(dtype: np.dtype) -> bool:
    """Whether Numba can type arrays of ``dtype`` (then they are passed as they are)."""
    try:
        numba.typeof(np.empty(0, dtype))
    except Exception:  # any typing refusal means: use byte views instead
        return False
    return True
