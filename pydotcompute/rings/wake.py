"""Sleeping until a ring has records, without polling from Python: the compiled half.

A receiver that has spun long enough *arms* a wake word and sleeps on a file
descriptor (an eventfd, or a pipe where there is none); whoever publishes records
into the ring afterwards *signals*: if the word is armed, it disarms it and writes
the descriptor. The handshake is the classic store-then-load pair on both sides,
each with a full barrier between, so a record published while the receiver arms is
never missed: either the receiver sees the record when it re-checks after arming,
or the publisher sees the armed word after publishing.

The words live in an int64 array at ``base`` (so a kernel's control block can hold
them): ``base + ARMED`` 1 while a receiver sleeps; ``base + FD`` the descriptor to
write; ``base + ONE`` the constant 1 (the 8 bytes written); ``base + ARM_FD`` a
descriptor a ``watch`` thread blocks on while nobody is armed (-1: none);
``base + STOP`` non-zero tells that thread to return.
"""

from __future__ import annotations

from numba import njit

from pydotcompute.rings.atomics import (
    cas,
    cpu_pause,
    exchange,
    fd_read,
    fd_write,
    fence_seq_cst,
    load_acquire,
    monotonic_ns,
    sleep_us,
    store_release,
)
from pydotcompute.rings.host_ops import ring_ready

__all__ = [
    "ARMED",
    "FD",
    "ONE",
    "ARM_FD",
    "STOP",
    "NWORDS",
    "wake_arm",
    "wake_signal",
    "wake_watch",
]

ARMED = 0
FD = 1
ONE = 2
ARM_FD = 3
STOP = 4
NWORDS = 5

_jit = njit(nogil=True, cache=True)


@_jit
def wake_arm(words, base, buf):  # type: ignore[no-untyped-def]
    """Arm the wake word unless ``buf`` already has a record to claim. Returns True when
    armed (the caller may sleep), False when a record is there (the word is disarmed)."""
    exchange(words, 8 * (base + ARMED), 1)  # a full barrier: the check below comes after
    if ring_ready(buf):
        store_release(words, 8 * (base + ARMED), 0)
        return False
    return True


@_jit
def wake_disarm(words, base):  # type: ignore[no-untyped-def]
    """Disarm; True when a signal had already been sent (a wake-up is on its way)."""
    return exchange(words, 8 * (base + ARMED), 0) == 0


@_jit
def wake_signal(words, base):  # type: ignore[no-untyped-def]
    """Called after publishing records: wake the receiver if one is armed.

    Costs a full barrier and one load when nobody sleeps."""
    fence_seq_cst()  # the publication is visible before the load
    off = 8 * (base + ARMED)
    if load_acquire(words, off) != 0 and cas(words, off, 1, 0):
        fd_write(load_acquire(words, 8 * (base + FD)), words, 8 * (base + ONE), 8)


_WATCH_SPIN_NS = 20_000
_WATCH_FIRST_SLEEP_US = 5
_WATCH_MAX_SLEEP_US = 200


@_jit
def wake_watch(words, base, buf, scratch):  # type: ignore[no-untyped-def]
    """The loop of a thread that signals for a publisher that cannot (a GPU kernel).

    Blocks in ``read`` on the ARM_FD descriptor until a receiver arms, then polls
    ``buf`` (spinning ``_WATCH_SPIN_NS``, then sleeping 5 us doubling to 200 us) until a
    record is there, the receiver disarms, or STOP is set. Returns 0 on STOP, or the
    negative ``read`` result when the descriptor failed."""
    arm_fd = load_acquire(words, 8 * (base + ARM_FD))
    off = 8 * (base + ARMED)
    while True:
        if fd_read(arm_fd, scratch, 0, 8) != 8:
            if load_acquire(words, 8 * (base + STOP)) != 0:
                return 0
            return -1
        if load_acquire(words, 8 * (base + STOP)) != 0:
            return 0
        start = monotonic_ns()
        sleep = _WATCH_FIRST_SLEEP_US
        while load_acquire(words, off) != 0:
            if ring_ready(buf):
                if cas(words, off, 1, 0):
                    fd_write(load_acquire(words, 8 * (base + FD)), words, 8 * (base + ONE), 8)
                break
            if load_acquire(words, 8 * (base + STOP)) != 0:
                return 0
            if monotonic_ns() - start < _WATCH_SPIN_NS:
                cpu_pause()
            else:
                sleep_us(sleep)
                sleep = min(sleep * 2, _WATCH_MAX_SLEEP_US)
