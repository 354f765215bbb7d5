"""Byte layout of a ring buffer (``docs/ring-protocol.md``, version 2).

Offsets are in bytes from the start of the buffer; every field is a little-endian
64-bit word. These constants are the single source of the layout for Python code.
"""

from __future__ import annotations

import enum

import numpy as np

from pydotcompute.errors import InvalidConfigurationError
from pydotcompute.rings.backpressure import BackpressureStrategy

__all__ = [
    "RingSide",
    "RING_MAGIC",
    "RING_VERSION",
    "LINE",
    "HEADER_SIZE",
    "OFF_MAGIC",
    "OFF_VERSION",
    "OFF_HEADER_SIZE",
    "OFF_CAPACITY",
    "OFF_SLOT_SIZE",
    "OFF_RECORD_SIZE",
    "OFF_BACKPRESSURE",
    "OFF_PRODUCER_SIDE",
    "OFF_CONSUMER_SIDE",
    "OFF_RECORD_OFFSET",
    "OFF_PUBLISHED",
    "OFF_RESERVE",
    "OFF_RELEASED_SEEN",
    "OFF_RELEASED",
    "OFF_CLAIM",
    "OFF_ENQUEUED",
    "OFF_DROPPED_NEWEST",
    "OFF_REJECTED",
    "OFF_HIGH_WATER",
    "OFF_DEQUEUED",
    "OFF_DROPPED_OLDEST",
    "OFF_DROP_BEFORE",
    "TAG_SIZE",
    "aligned_buffer",
    "slot_size_for",
    "ring_nbytes",
    "init_ring",
    "validate_ring",
]


class RingSide(enum.IntEnum):
    """Where a ring's producer or consumer runs. Values are part of the protocol."""

    HOST = 0
    DEVICE = 1
    LINK = 2
    """The consumer of a *link ring*: a resident kernel fed by another kernel on the
    device through a ring in device memory. Producer and consumer are separate kernels
    whose stores reach each other in no particular order, so the ring is crossing
    (tagged), as between host and device."""


RING_MAGIC = int.from_bytes(b"PDCRING1", "little")
RING_VERSION = 2
LINE = 128
HEADER_SIZE = 8 * LINE

# line 0: meta
OFF_MAGIC = 0
OFF_VERSION = 8
OFF_HEADER_SIZE = 16
OFF_CAPACITY = 24
OFF_SLOT_SIZE = 32
OFF_RECORD_SIZE = 40
OFF_BACKPRESSURE = 48
OFF_PRODUCER_SIDE = 56
OFF_CONSUMER_SIDE = 64
OFF_RECORD_OFFSET = 72
# lines 1-4: one index per line, so producers and consumers never share a line
OFF_PUBLISHED = 1 * LINE
OFF_RESERVE = 2 * LINE
OFF_RELEASED_SEEN = 2 * LINE + 8  # the producer side's last reading of released
OFF_RELEASED = 3 * LINE
OFF_CLAIM = 4 * LINE
# line 5: producer counters
OFF_ENQUEUED = 5 * LINE
OFF_DROPPED_NEWEST = 5 * LINE + 8
OFF_REJECTED = 5 * LINE + 16
OFF_HIGH_WATER = 5 * LINE + 24
# line 6: consumer counters
OFF_DEQUEUED = 6 * LINE
OFF_DROPPED_OLDEST = 6 * LINE + 8
# line 7: the producer's DROP_OLDEST watermark
OFF_DROP_BEFORE = 7 * LINE

TAG_SIZE = 8
"""Bytes of the tag that starts every slot of a crossing ring (protocol 4.4)."""


def slot_size_for(record_size: int, crossing: bool = False) -> int:
    """Bytes per slot: the tag of a crossing ring, then the record rounded up to a
    multiple of 8."""
    return (TAG_SIZE if crossing else 0) + ((record_size + 7) & ~7)


def ring_nbytes(capacity: int, record_size: int, crossing: bool = False) -> int:
    """Total buffer size of a ring (``crossing``: its producer and consumer sides
    differ, so its slots carry tags)."""
    return HEADER_SIZE + capacity * slot_size_for(record_size, crossing)


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array whose first byte is 128-byte aligned (one line)."""
    raw = np.zeros(nbytes + LINE, np.uint8)
    start = (-raw.ctypes.data) % LINE
    return raw[start : start + nbytes]


def _words(buf: np.ndarray) -> np.ndarray:
    return buf[:HEADER_SIZE].view("<u8")


def _check_buffer(buf: np.ndarray) -> None:
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        raise InvalidConfigurationError("a ring buffer must be a 1-d numpy uint8 array")
    if not buf.flags.c_contiguous or not buf.flags.writeable:
        raise InvalidConfigurationError("a ring buffer must be contiguous and writeable")
    if buf.ctypes.data % 8:
        raise InvalidConfigurationError("a ring buffer must be 8-byte aligned")


def init_ring(
    buf: np.ndarray,
    capacity: int,
    record_size: int,
    backpressure: BackpressureStrategy | str | int = BackpressureStrategy.BLOCK,
    producer_side: RingSide = RingSide.HOST,
    consumer_side: RingSide = RingSide.HOST,
) -> None:
    """Write a fresh header into ``buf`` (indices and counters zero, magic last)."""
    _check_buffer(buf)
    if isinstance(capacity, bool) or capacity < 2 or capacity & (capacity - 1):
        raise InvalidConfigurationError(
            f"ring capacity must be a power of two >= 2, got {capacity}"
        )
    if record_size < 1:
        raise InvalidConfigurationError(f"record size must be >= 1, got {record_size}")
    crossing = RingSide(producer_side) is not RingSide(consumer_side)
    need = ring_nbytes(capacity, record_size, crossing)
    if buf.nbytes < need:
        raise InvalidConfigurationError(
            f"ring buffer of {buf.nbytes} bytes is too small; {need} needed"
        )
    strategy = BackpressureStrategy.parse(backpressure)
    words = _words(buf)
    words[:] = 0
    words[OFF_VERSION // 8] = RING_VERSION
    words[OFF_HEADER_SIZE // 8] = HEADER_SIZE
    words[OFF_CAPACITY // 8] = capacity
    words[OFF_SLOT_SIZE // 8] = slot_size_for(record_size, crossing)
    words[OFF_RECORD_SIZE // 8] = record_size
    words[OFF_BACKPRESSURE // 8] = int(strategy)
    words[OFF_PRODUCER_SIDE // 8] = int(RingSide(producer_side))
    words[OFF_CONSUMER_SIDE // 8] = int(RingSide(consumer_side))
    words[OFF_RECORD_OFFSET // 8] = TAG_SIZE if crossing else 0
    if crossing:  # slot tags start at zero, which seals nothing (protocol 4.4)
        buf[HEADER_SIZE:need] = 0
    # The magic goes in last, so a header with a valid magic is complete. Other
    # threads and devices are only handed the buffer after this returns (a thread
    # start or kernel launch orders these stores before their first load).
    words[OFF_MAGIC // 8] = RING_MAGIC


def validate_ring(buf: np.ndarray) -> dict[str, int]:
    """Check an existing ring header; return its meta fields by name."""
    _check_buffer(buf)
    if buf.nbytes < HEADER_SIZE:
        raise InvalidConfigurationError("buffer is smaller than a ring header")
    w = _words(buf)
    meta = {
        "magic": int(w[OFF_MAGIC // 8]),
        "version": int(w[OFF_VERSION // 8]),
        "header_size": int(w[OFF_HEADER_SIZE // 8]),
        "capacity": int(w[OFF_CAPACITY // 8]),
        "slot_size": int(w[OFF_SLOT_SIZE // 8]),
        "record_size": int(w[OFF_RECORD_SIZE // 8]),
        "backpressure": int(w[OFF_BACKPRESSURE // 8]),
        "producer_side": int(w[OFF_PRODUCER_SIDE // 8]),
        "consumer_side": int(w[OFF_CONSUMER_SIDE // 8]),
        "record_offset": int(w[OFF_RECORD_OFFSET // 8]),
    }
    if meta["magic"] != RING_MAGIC:
        raise InvalidConfigurationError("not a ring buffer (bad magic)")
    if meta["version"] != RING_VERSION:
        raise InvalidConfigurationError(f"unsupported ring version {meta['version']}")
    cap, rs, ss = meta["capacity"], meta["record_size"], meta["slot_size"]
    if meta["header_size"] != HEADER_SIZE:
        raise InvalidConfigurationError(f"unexpected ring header size {meta['header_size']}")
    if cap < 2 or cap & (cap - 1):
        raise InvalidConfigurationError(f"ring capacity {cap} is not a power of two >= 2")
    crossing = meta["producer_side"] != meta["consumer_side"]
    if meta["record_offset"] != (TAG_SIZE if crossing else 0):
        raise InvalidConfigurationError(
            f"record offset {meta['record_offset']} does not fit a "
            f"{'crossing' if crossing else 'one-sided'} ring"
        )
    if rs < 1 or ss != slot_size_for(rs, crossing):
        raise InvalidConfigurationError(f"inconsistent slot size {ss} for record size {rs}")
    if buf.nbytes < HEADER_SIZE + cap * ss:
        raise InvalidConfigurationError("ring buffer is shorter than its header declares")
    BackpressureStrategy.parse(meta["backpressure"])
    RingSide(meta["producer_side"])
    RingSide(meta["consumer_side"])
    return meta
