"""The Numba atomics the host ring is built on: real LLVM atomics, never hoisted."""

from __future__ import annotations

import threading
import time

import numpy as np
from numba import njit

from pydotcompute.rings.atomics import (
    cas,
    copy_bytes,
    fetch_add,
    load_acquire,
    store_release,
    zero_bytes,
)


@njit(nogil=True)
def wait_for_flag(buf, limit):  # type: ignore[no-untyped-def]
    # Would spin forever if the load were hoisted out of the loop.
    n = 0
    while load_acquire(buf, 8) == 0 and n < limit:
        n += 1
    return n


@njit(nogil=True)
def exercise(buf, src):  # type: ignore[no-untyped-def]
    store_release(buf, 0, 5)
    swapped = cas(buf, 0, 5, 7)
    failed = cas(buf, 0, 5, 9)
    before = fetch_add(buf, 16, 3)
    copy_bytes(buf, 24, src, 1, 4)
    zero_bytes(buf, 32, 8)
    return swapped, failed, before, load_acquire(buf, 0)


def test_operations():
    buf = np.zeros(64, np.uint8)
    buf[32:40] = 0xFF
    buf[16:24].view("<i8")[0] = 10
    src = np.arange(10, dtype=np.uint8)
    assert exercise(buf, src) == (True, False, 10, 7)
    assert int(buf[16:24].view("<i8")[0]) == 13
    assert list(buf[24:28]) == [1, 2, 3, 4]
    assert not buf[32:40].any()


def test_llvm_ir_has_atomic_instructions():
    buf = np.zeros(64, np.uint8)
    exercise(buf, np.zeros(8, np.uint8))
    ir = exercise.inspect_llvm(exercise.signatures[0])
    assert "load atomic" in ir and "acquire" in ir
    assert "store atomic" in ir and "release" in ir
    assert "cmpxchg" in ir and "acq_rel" in ir
    assert "atomicrmw add" in ir


def test_spin_wait_sees_a_store_from_another_thread():
    buf = np.zeros(64, np.uint8)
    wait_for_flag(buf, 1)  # compile first
    result = []
    t = threading.Thread(target=lambda: result.append(wait_for_flag(buf, 1 << 62)))
    t.start()
    time.sleep(0.02)
    buf[8:16].view("<i8")[0] = 1
    t.join(10)
    assert not t.is_alive() and result and result[0] > 0
