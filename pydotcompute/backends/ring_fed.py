"""The host side of a compiled ring kernel: messages in and out of its two rings.

The ``cpu`` and ``cuda`` backends differ in what runs the loop (threads or a
persistent GPU kernel) and where the rings live (ordinary or mapped pinned memory),
not in how the host talks to them: it packs messages into records, pushes them under
the input ring's backpressure strategy, and pops records off the output ring. That
part is written once, here, over the raw ring buffers (``rings.host_ops``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from pydotcompute.backends.base import ErrorFactory, KernelBackend, renamed
from pydotcompute.backends.wakeup import ReplyWakeup
from pydotcompute.errors import QueueFullError, QueueTimeoutError
from pydotcompute.messages.record import fill_message_ids
from pydotcompute.messages.record_codec import RecordCodec
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.rings.host_ops import (
    ring_add_counter,
    ring_pop,
    ring_pop_spin,
    ring_push,
    ring_word,
)
from pydotcompute.rings.host_ring import Backoff, HostRing
from pydotcompute.rings.layout import (
    OFF_CAPACITY,
    OFF_CONSUMER_SIDE,
    OFF_DROPPED_NEWEST,
    OFF_PRODUCER_SIDE,
    OFF_PUBLISHED,
    OFF_REJECTED,
    OFF_RELEASED,
)

__all__ = ["RingFedBackend"]

__getattr__ = renamed(__name__, {"RingFedLoop": "RingFedBackend"})  # the former names, deprecated

_DROP_OLDEST_WAIT_S = 1.0


class RingFedBackend(KernelBackend):
    """A kernel loop fed through an input ring and read through an output ring.

    A subclass sets ``in_dtype``/``out_dtype`` and calls ``_attach_rings`` once the
    rings exist (before the runtime sends anything), with the ``ReplyWakeup`` its
    publisher signals; it keeps ``failure`` and ``_stopped`` (the skeleton's) up to
    date and calls
    ``_wake_receivers()`` when either changes. A receive that finds nothing spins
    natively for ``get_spin_s`` (the loop usually answers within microseconds), then
    sleeps on the wakeup: never on an ``asyncio.sleep``, which rounds to milliseconds.
    """

    in_dtype: np.dtype
    out_dtype: np.dtype
    get_spin_s = 100e-6
    outputs_have_ids = False
    """Whether the loop itself gives outputs their fresh ``message_id`` (else the host
    does, as they leave the output ring)."""
    records = True
    _wakeup: ReplyWakeup | None = None

    def _attach_rings(self, in_ring: HostRing, out_ring: HostRing, wakeup: ReplyWakeup) -> None:
        # Few attributes on purpose: at 30, CPython stops sharing the instance's dict
        # keys and every attribute load on the per-message path gets slower (a cpu
        # kernel's ping-pong went from 3.7 to 3.9 us with one attribute more).
        self._in_buf = in_ring.buffer
        self._out_buf = out_ring.buffer
        self._wakeup = wakeup
        owner = f"kernel {self.kernel_id!r}"
        self._in_codec = RecordCodec(self.input_type, self.in_dtype, owner)
        self._out_codec = RecordCodec(
            self.output_type, self.out_dtype, owner, fill_ids=not self.outputs_have_ids
        )
        self._record_of = self._in_codec.record_of  # bound once: called per message

    # -- when a request without a reply was dropped ----------------------------------

    def _keeps_records(self) -> bool:
        """Whether every record sent is handled and every output placed is read: an
        input ring that drops its oldest or an output ring that does not block could
        lose one, and a request whose record or output was lost is not one the
        handler dropped."""
        return (
            self.config.backpressure is not BackpressureStrategy.DROP_OLDEST
            and self.output_strategy is BackpressureStrategy.BLOCK
        )

    def input_position(self) -> int | None:
        if not self._keeps_records():
            return None
        return int(ring_word(self._in_buf, OFF_PUBLISHED))

    def outputs_taken(self) -> int | None:
        return int(ring_word(self._out_buf, OFF_RELEASED))

    # -- input -----------------------------------------------------------------------

    @property
    def _in_waits(self) -> bool:
        """Whether a producer waits when the input ring is full (only asked then, so it
        is computed rather than kept: see ``_attach_rings``). BLOCK waits for room;
        DROP_OLDEST waits for a consumer on the other side to skip the stale records
        (the host may not move an index the device owns)."""
        strategy = self.config.backpressure
        if strategy is BackpressureStrategy.BLOCK:
            return True
        sides = self._in_buf[OFF_PRODUCER_SIDE : OFF_CONSUMER_SIDE + 8].view(np.int64)
        return strategy is BackpressureStrategy.DROP_OLDEST and bool(sides[0] != sides[1])

    def _in_capacity(self) -> int:
        # Read from the ring's header, not kept on the instance (see _attach_rings).
        return int(self._in_buf[OFF_CAPACITY : OFF_CAPACITY + 8].view(np.int64)[0])

    def close_failed(self, error: ErrorFactory) -> int:
        """Refuse input from now on; outputs in the ring stay receivable, then the
        error is raised. Inputs still in the ring are left there (their count shows as
        the queue depth): the host may not move the index the consumer owns."""
        self.failure = error()
        self._wake_receivers()  # they take what is left, then get the error
        return 0

    def try_put(self, msg: Any) -> bool:
        if self.failure is not None or self._stopped:
            self._check_open()
        rec = self._record_of(msg)
        if ring_push(self._in_buf, rec, 0, len(rec)) == len(rec):
            return True
        if self.config.backpressure is BackpressureStrategy.REJECT:
            raise QueueFullError(
                f"input ring of {self.kernel_id!r} is full ({self._in_capacity()}): rejected"
            )
        return not self._in_waits  # DROP_NEWEST: dropped, and counted by the ring

    async def put(self, msg: Any, timeout: float | None) -> None:
        if not self.try_put(msg):
            await self._push_rest(self._record_of(msg).copy(), 0, timeout)

    async def put_batch(self, records: np.ndarray, timeout: float | None) -> int:
        if self.failure is not None or self._stopped:
            self._check_open()
        if type(records) is not np.ndarray or records.dtype != self.in_dtype or records.ndim != 1:
            records = self._in_codec.records(records)
        elif not records.flags.c_contiguous:
            records = np.ascontiguousarray(records)
        n = len(records)
        placed: int = ring_push(self._in_buf, records, 0, n)
        if placed == n or not self._in_waits:
            return placed
        return await self._push_rest(records, placed, timeout)

    async def _push_rest(self, records: np.ndarray, placed: int, timeout: float | None) -> int:
        """Wait for room without blocking the event loop. BLOCK: a timeout counts the
        rest as rejected and raises ``QueueFullError``. DROP_OLDEST across sides: the
        rest is dropped as newest when the consumer has not skipped in time (1 s when
        no timeout is given)."""
        rs = records.dtype.itemsize
        n = len(records)
        block = self.config.backpressure is BackpressureStrategy.BLOCK
        if not block and timeout is None:
            timeout = _DROP_OLDEST_WAIT_S
        wait = Backoff(timeout)
        while placed < n:
            self._check_open()
            if wait.expired():
                if not block:
                    ring_add_counter(self._in_buf, OFF_DROPPED_NEWEST, n - placed)
                    return placed
                ring_add_counter(self._in_buf, OFF_REJECTED, n - placed)
                raise QueueFullError(
                    f"input ring of {self.kernel_id!r} stayed full for {timeout} s: "
                    f"{placed} of {n} record(s) accepted"
                )
            await asyncio.sleep(wait.pause())
            placed += int(ring_push(self._in_buf, records, placed * rs, n - placed))
        return placed

    # -- output ----------------------------------------------------------------------

    def _wake_receivers(self) -> None:
        """Wake receivers asleep on the output ring so they see a failure or a stop."""
        if self._wakeup is not None:
            self._wakeup.notify()

    def try_get(self, default: Any) -> Any:
        out = self._out_codec.scratch()
        if not ring_pop(self._out_buf, out, 0, 1):
            return default
        return self._out_codec.message_of(out)

    async def get(self, timeout: float | None) -> Any:
        # One compiled call takes the reply, spinning for it natively a little.
        one = self._out_codec.scratch()
        if ring_pop_spin(self._out_buf, one, 0, 1, self._spin_ns(timeout)):
            return self._out_codec.message_of(one)
        return self._out_codec.message_of(await self._sleep_for_batch(1, timeout))

    def _spin_ns(self, timeout: float | None) -> int:
        spin = self.get_spin_s if timeout is None else min(self.get_spin_s, timeout)
        return int(spin * 1e9)

    def _take(self, max_items: int) -> np.ndarray | None:
        """Up to ``max_items`` ready outputs, or None: one compiled call pops all that
        is ready. The array is never larger than the ring; a request much larger than
        what came is answered with a copy, so a large ``max_items`` holds no memory.

        (Not sized by ``published - released``: on a ring a device fills,
        ``published`` is a counter mirrored about once a millisecond.)"""
        n = max_items
        if n > 64:
            cap = self._out_buf[OFF_CAPACITY : OFF_CAPACITY + 8].view(np.int64)[0]
            n = min(n, int(cap))
        out = np.empty(n, self.out_dtype)
        got = ring_pop(self._out_buf, out, 0, n)
        if got == 0:
            return None
        if got < n:
            out = out[:got] if got * 4 >= n or n <= 64 else out[:got].copy()
        return out if self.outputs_have_ids else fill_message_ids(out)

    async def get_batch(self, max_items: int, timeout: float | None) -> np.ndarray:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        out = self._take(max_items)
        if out is not None:
            return out
        if max_items <= 64:
            out = np.empty(max_items, self.out_dtype)
            got = ring_pop_spin(self._out_buf, out, 0, max_items, self._spin_ns(timeout))
            if got:
                out = out if got == max_items else out[:got]
                return out if self.outputs_have_ids else fill_message_ids(out)
        return await self._sleep_for_batch(max_items, timeout)

    async def drain_outputs(self) -> np.ndarray:
        chunks = []
        while (out := self._take(1 << 20)) is not None:
            chunks.append(out)
        return np.concatenate(chunks) if chunks else np.empty(0, self.out_dtype)

    async def _sleep_for_batch(self, max_items: int, timeout: float | None) -> np.ndarray:
        """Sleep on the wakeup until outputs come, the kernel fails or stops, or
        ``timeout`` passes (``QueueTimeoutError``)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        wakeup = self._wakeup
        assert wakeup is not None
        while True:
            out = self._take(max_items)
            if out is not None:
                return out
            if self.failure is not None:
                self._check_open()
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise QueueTimeoutError(
                    f"no output from kernel {self.kernel_id!r} within {timeout} s"
                )
            if self._stopped:  # nothing left and nothing more to come: do not sleep
                self._check_open()
            await wakeup.wait(self._out_buf, left)
