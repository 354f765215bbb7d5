"""Host-side ring operations (``docs/ring-protocol.md``), compiled with Numba.

All functions are ``nopython``, ``nogil`` and cached. They take the ring buffer (a
1-d uint8 array) and an array holding packed records (any dtype: only its bytes
are used) with a byte offset, so the same code serves Python callers and the
compiled ``cpu`` kernel loop. None of them waits for room or for data: they do as
much as is possible now and return a count; waiting policy belongs to the caller.
The only waits inside are the protocol's short ordering waits (publish and release
in position order), which back off to ``sched_yield``/``usleep`` when a peer thread
was descheduled mid-operation.

On a crossing ring (protocol version 2) the same functions play the host's part
opposite a device: a push writes each record's tag after it, a pop claims only
sealed slots and checks the seal of what it copies.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from pydotcompute.rings.atomics import (
    cas,
    copy_bytes,
    cpu_pause,
    cpu_yield,
    fetch_add,
    load_acquire,
    load_byte,
    load_word,
    monotonic_ns,
    sleep_us,
    store_byte,
    store_release,
    store_word,
)
from pydotcompute.rings.layout import (
    HEADER_SIZE,
    OFF_BACKPRESSURE,
    OFF_CAPACITY,
    OFF_CLAIM,
    OFF_CONSUMER_SIDE,
    OFF_DEQUEUED,
    OFF_DROP_BEFORE,
    OFF_DROPPED_NEWEST,
    OFF_DROPPED_OLDEST,
    OFF_ENQUEUED,
    OFF_HIGH_WATER,
    OFF_PRODUCER_SIDE,
    OFF_PUBLISHED,
    OFF_RECORD_OFFSET,
    OFF_RECORD_SIZE,
    OFF_REJECTED,
    OFF_RELEASED,
    OFF_RELEASED_SEEN,
    OFF_RESERVE,
    OFF_SLOT_SIZE,
)

__all__ = [
    "backoff",
    "ring_try_push",
    "ring_push",
    "ring_pop",
    "ring_evict",
    "ring_add_counter",
    "ring_depth",
    "ring_word",
    "ring_ready",
    "ring_pop_spin",
    "ring_seal",
]

_BLOCK = 0
_REJECT = 1
_DROP_OLDEST = 2
_DROP_NEWEST = 3

_jit = njit(nogil=True, cache=True)
_PURE_SPIN_NS = 2_000  # ring_pop_spin: pause-only polls before it starts yielding


@_jit
def backoff(spins: int) -> int:
    """One step of a spin-wait: pause, then yield the CPU, then sleep 20 µs.
    Returns the next step count."""
    if spins < 64:
        cpu_pause()
    elif spins < 256:
        cpu_yield()
    else:
        sleep_us(20)
    return spins + 1


# seal() of protocol 4.4: splitmix64's constants.
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xBF58476D1CE4E5B9)
_K3 = np.uint64(0x94D049BB133111EB)
_S29 = np.uint64(29)
_S32 = np.uint64(32)
_ONE = np.uint64(1)


@_jit
def _mix(h, x):  # type: ignore[no-untyped-def]
    h = (h ^ np.uint64(x)) * _K2
    return h ^ (h >> _S32)


@_jit
def _finish(h):  # type: ignore[no-untyped-def]
    h = (h ^ (h >> _S29)) * _K3
    return np.int64(h ^ (h >> _S32))


@_jit
def _record_word(arr, off, rs, j):  # type: ignore[no-untyped-def]
    """Word ``j`` of the ``rs``-byte record at byte ``off`` (any alignment), zero-padded."""
    at = off + 8 * j
    if 8 * j + 8 <= rs:
        return load_word(arr, at)
    x = 0
    for b in range(rs - 8 * j):
        x |= load_byte(arr, at + b) << (8 * b)
    return x


@_jit
def _put_record_word(arr, off, rs, j, x):  # type: ignore[no-untyped-def]
    """Store word ``j`` of an ``rs``-byte record at byte ``off``: only its own bytes."""
    at = off + 8 * j
    if 8 * j + 8 <= rs:
        store_word(arr, at, x)
    else:
        for b in range(rs - 8 * j):
            store_byte(arr, at + b, x >> (8 * b))


@_jit
def ring_seal(arr, off, rs, pos):  # type: ignore[no-untyped-def]
    """The tag of position ``pos`` holding the ``rs`` record bytes at byte ``off`` of
    ``arr`` (protocol 4.4)."""
    h = np.uint64(pos + 1) * _K1
    for j in range((rs + 7) >> 3):
        h = _mix(h, _record_word(arr, off, rs, j))
    return _finish(h)


@_jit
def _write_slots(buf, pos, k, src, src_off, rs, ss, ro, cap):  # type: ignore[no-untyped-def]
    mask = cap - 1
    if ro:  # crossing ring: each record as whole words, sealed as it goes, then its tag
        words = (rs + 7) >> 3
        for i in range(k):
            p = pos + i
            off = HEADER_SIZE + (p & mask) * ss
            at = src_off + i * rs
            h = np.uint64(p + 1) * _K1
            for j in range(words):
                x = _record_word(src, at, rs, j)
                store_word(buf, off + ro + 8 * j, x)
                h = _mix(h, x)
            store_release(buf, off, _finish(h))
    elif rs == ss:  # packed: at most two copies, split where the slots wrap
        first = pos & mask
        run = min(k, cap - first)
        copy_bytes(buf, HEADER_SIZE + first * ss, src, src_off, run * rs)
        if k > run:
            copy_bytes(buf, HEADER_SIZE, src, src_off + run * rs, (k - run) * rs)
    else:
        for i in range(k):
            copy_bytes(buf, HEADER_SIZE + ((pos + i) & mask) * ss, src, src_off + i * rs, rs)


@_jit
def _read_slots(buf, pos, k, dst, dst_off, rs, ss, cap):  # type: ignore[no-untyped-def]
    mask = cap - 1
    if rs == ss:
        first = pos & mask
        run = min(k, cap - first)
        copy_bytes(dst, dst_off, buf, HEADER_SIZE + first * ss, run * rs)
        if k > run:
            copy_bytes(dst, dst_off + run * rs, buf, HEADER_SIZE, (k - run) * rs)
    else:
        for i in range(k):
            copy_bytes(dst, dst_off + i * rs, buf, HEADER_SIZE + ((pos + i) & mask) * ss, rs)


@_jit
def _sealed(buf, pos, rs, ss, ro, cap):  # type: ignore[no-untyped-def]
    """Whether the slot of ``pos`` holds its record, sealed (protocol 4.4)."""
    off = HEADER_SIZE + (pos & (cap - 1)) * ss
    tag = load_acquire(buf, off)
    return tag == ring_seal(buf, off + ro, rs, pos)


@_jit
def _raise_max(buf, off, value):  # type: ignore[no-untyped-def]
    cur = load_acquire(buf, off)
    while value > cur:
        if cas(buf, off, cur, value):
            return
        cur = load_acquire(buf, off)


@_jit
def _publish(buf, r, k, seen):  # type: ignore[no-untyped-def]
    # Producers publish in reservation order: wait for the ones before us.
    spins = 0
    while load_acquire(buf, OFF_PUBLISHED) != r:
        spins = backoff(spins)
    store_release(buf, OFF_PUBLISHED, r + k)
    fetch_add(buf, OFF_ENQUEUED, k)
    # The depth this producer can vouch for: `seen` may be older than released.
    _raise_max(buf, OFF_HIGH_WATER, r + k - seen)


@_jit
def _release(buf, c, k):  # type: ignore[no-untyped-def]
    spins = 0
    while load_acquire(buf, OFF_RELEASED) != c:
        spins = backoff(spins)
    store_release(buf, OFF_RELEASED, c + k)


@_jit
def _claim(buf, n):  # type: ignore[no-untyped-def]
    while True:
        c = load_acquire(buf, OFF_CLAIM)
        avail = load_acquire(buf, OFF_PUBLISHED) - c
        if avail <= 0:
            return c, 0
        k = min(n, avail)
        if cas(buf, OFF_CLAIM, c, c + k):
            return c, k


@_jit
def _take_sealed(buf, dst, dst_off, n, rs, ss, ro, cap):  # type: ignore[no-untyped-def]
    """Claim up to ``n`` sealed positions of a crossing ring, plus the stale ones below
    ``drop_before`` ahead of them (claimed to be discarded), copying the records into
    ``dst`` as their seals are checked: one pass over each slot, whole words. Returns
    ``(c, k, stale)``: positions ``c .. c+k-1`` are claimed, the first ``stale`` of
    them discarded, the rest in ``dst``."""
    mask = cap - 1
    words = (rs + 7) >> 3
    tail = rs & 7
    last_mask = (1 << (8 * tail)) - 1 if tail else -1
    while True:
        c = load_acquire(buf, OFF_CLAIM)
        stale = min(max(load_acquire(buf, OFF_DROP_BEFORE) - c, 0), cap)
        k = 0
        while k < n + stale:
            p = c + k
            off = HEADER_SIZE + (p & mask) * ss
            tag = load_acquire(buf, off)  # the words below are read after it
            h = np.uint64(p + 1) * _K1
            to = dst_off + (k - stale) * rs
            for j in range(words):
                x = load_word(buf, off + ro + 8 * j)
                if j == words - 1:
                    x &= last_mask
                h = _mix(h, x)
                if k >= stale:
                    _put_record_word(dst, to, rs, j, x)
            if _finish(h) != tag:
                break
            k += 1
        if k == 0:
            return c, 0, 0
        if cas(buf, OFF_CLAIM, c, c + k):
            return c, k, min(stale, k)


@_jit
def ring_try_push(buf, src, src_off, n):  # type: ignore[no-untyped-def]
    """Place up to ``n`` records (packed in ``src`` from byte ``src_off``) while there is
    room; no backpressure action. Returns how many were placed."""
    cap = load_acquire(buf, OFF_CAPACITY)
    rs = load_acquire(buf, OFF_RECORD_SIZE)
    ss = load_acquire(buf, OFF_SLOT_SIZE)
    ro = load_acquire(buf, OFF_RECORD_OFFSET)
    placed = 0
    while placed < n:
        r = load_acquire(buf, OFF_RESERVE)
        seen = load_acquire(buf, OFF_RELEASED_SEEN)
        room = cap - (r - seen)
        if room < n - placed:
            # Short by the cached reading: read the consumer's line, once.
            seen = load_acquire(buf, OFF_RELEASED)
            _raise_max(buf, OFF_RELEASED_SEEN, seen)
            room = cap - (r - seen)
        if room <= 0:
            break
        k = min(n - placed, room)
        if not cas(buf, OFF_RESERVE, r, r + k):
            continue
        _write_slots(buf, r, k, src, src_off + placed * rs, rs, ss, ro, cap)
        _publish(buf, r, k, seen)
        placed += k
    return placed


@_jit
def ring_evict(buf, n):  # type: ignore[no-untyped-def]
    """Discard up to ``n`` of the oldest published records as a consumer-side thread
    would (claim, skip, release in order), counting them in ``dropped_oldest``."""
    c, k = _claim(buf, n)
    if k > 0:
        _release(buf, c, k)
        fetch_add(buf, OFF_DROPPED_OLDEST, k)
    return k


@_jit
def ring_push(buf, src, src_off, n):  # type: ignore[no-untyped-def]
    """Produce ``n`` records under the ring's backpressure strategy, without waiting
    for room. Returns how many of them were written into the ring.

    BLOCK: returns the count placed so far (the caller waits and retries).
    REJECT / DROP_NEWEST: the rest are counted in ``rejected`` / ``dropped_newest``.
    DROP_OLDEST, consumer on this side: evicts the oldest records until all fit
    (a batch larger than the ring keeps its last ``capacity`` records).
    DROP_OLDEST, consumer on the other side: raises the ``drop_before`` watermark and
    returns the count placed so far (the caller waits for the consumer to skip).
    """
    cap = load_acquire(buf, OFF_CAPACITY)
    rs = load_acquire(buf, OFF_RECORD_SIZE)
    strategy = load_acquire(buf, OFF_BACKPRESSURE)
    if strategy == _DROP_OLDEST:
        same_side = load_acquire(buf, OFF_PRODUCER_SIDE) == load_acquire(buf, OFF_CONSUMER_SIDE)
        skipped = 0
        if same_side and n > cap:
            skipped = n - cap
            fetch_add(buf, OFF_DROPPED_OLDEST, skipped)
        placed = ring_try_push(buf, src, src_off + skipped * rs, n - skipped)
        left = n - skipped - placed
        if left == 0:
            return placed
        if same_side:
            spins = 0
            while left > 0:
                if ring_evict(buf, left) == 0:
                    spins = backoff(spins)  # the full slots are still in flight
                got = ring_try_push(buf, src, src_off + (n - left) * rs, left)
                placed += got
                left -= got
            return placed
        want = min(left, cap)
        _raise_max(buf, OFF_DROP_BEFORE, load_acquire(buf, OFF_RESERVE) + want - cap)
        return placed
    placed = ring_try_push(buf, src, src_off, n)
    if placed < n:
        if strategy == _REJECT:
            fetch_add(buf, OFF_REJECTED, n - placed)
        elif strategy == _DROP_NEWEST:
            fetch_add(buf, OFF_DROPPED_NEWEST, n - placed)
    return placed


@_jit
def ring_pop(buf, dst, dst_off, max_n):  # type: ignore[no-untyped-def]
    """Consume up to ``max_n`` records into ``dst`` (packed from byte ``dst_off``).
    Records below the ``drop_before`` watermark are skipped and counted in
    ``dropped_oldest``. Returns how many were delivered; 0 means the ring was empty."""
    cap = load_acquire(buf, OFF_CAPACITY)
    rs = load_acquire(buf, OFF_RECORD_SIZE)
    ss = load_acquire(buf, OFF_SLOT_SIZE)
    ro = load_acquire(buf, OFF_RECORD_OFFSET)
    delivered = 0
    while delivered < max_n:
        if ro:
            # Copied while their seals are checked; the watermark as read before the
            # claim decides what is stale (a record claimed before it rose is delivered).
            c, k, stale = _take_sealed(
                buf, dst, dst_off + delivered * rs, max_n - delivered, rs, ss, ro, cap
            )
            if k == 0:
                break
        else:
            c, k = _claim(buf, max_n - delivered)
            if k == 0:
                break
            stale = min(max(load_acquire(buf, OFF_DROP_BEFORE) - c, 0), k)
            _read_slots(buf, c + stale, k - stale, dst, dst_off + delivered * rs, rs, ss, cap)
        _release(buf, c, k)
        if stale:
            fetch_add(buf, OFF_DROPPED_OLDEST, stale)
        if k > stale:
            fetch_add(buf, OFF_DEQUEUED, k - stale)
        delivered += k - stale
    return delivered


@_jit
def ring_add_counter(buf, off, k):  # type: ignore[no-untyped-def]
    """Atomically add ``k`` to the counter at byte ``off`` (a caller-side refusal)."""
    fetch_add(buf, off, k)


@_jit
def ring_word(buf, off):  # type: ignore[no-untyped-def]
    """The word at byte ``off`` (a ring's index or counter, a control block's word),
    read with acquire ordering: of two words read in turn, the second is no older."""
    return load_acquire(buf, off)


@_jit
def ring_depth(buf):  # type: ignore[no-untyped-def]
    """Published but not yet released records, clamped to ``[0, capacity]``."""
    cap = load_acquire(buf, OFF_CAPACITY)
    released = load_acquire(buf, OFF_RELEASED)
    d = load_acquire(buf, OFF_PUBLISHED) - released
    return min(max(d, 0), cap)


@_jit
def ring_ready(buf):  # type: ignore[no-untyped-def]
    """Whether a consumer would find a record to claim now (from cached loads)."""
    claim = load_acquire(buf, OFF_CLAIM)
    ro = load_acquire(buf, OFF_RECORD_OFFSET)
    if ro:
        cap = load_acquire(buf, OFF_CAPACITY)
        rs = load_acquire(buf, OFF_RECORD_SIZE)
        return _sealed(buf, claim, rs, load_acquire(buf, OFF_SLOT_SIZE), ro, cap)
    return load_acquire(buf, OFF_PUBLISHED) > claim


@_jit
def ring_pop_spin(buf, dst, dst_off, max_n, spin_ns):  # type: ignore[no-untyped-def]
    """``ring_pop``, and when the ring is empty, poll up to ``spin_ns`` nanoseconds for
    a record to arrive before giving up with 0.

    One call instead of a poll loop in Python: a reply that comes meanwhile is seen
    within a fraction of a microsecond, and the GIL is free. After the first
    microseconds each poll also yields the core: on a machine with fewer free cores
    than spinning threads, the thread that would publish the reply may be waiting
    for this very core (on 2 busy cores, a pure spin took round trips from 4 us to
    280 us)."""
    got = ring_pop(buf, dst, dst_off, max_n)
    if got > 0 or spin_ns <= 0:
        return got
    start = monotonic_ns()
    while True:
        if ring_ready(buf):
            got = ring_pop(buf, dst, dst_off, max_n)
            if got > 0:
                return got
        waited = monotonic_ns() - start
        if waited >= spin_ns:
            return 0
        if waited < _PURE_SPIN_NS:
            cpu_pause()
        else:
            cpu_yield()
