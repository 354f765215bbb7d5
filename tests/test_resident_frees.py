"""Frees of device memory wait while a ring kernel is resident (no GPU needed: the
bookkeeping runs on numba-cuda's own pending-deallocation queue)."""

from __future__ import annotations

import gc
import logging

import pytest
from numba.cuda.cudadrv import driver
from numba.cuda.cudadrv.driver import _PendingDeallocs

from pydotcompute.device.resident import exited, hold_frees


class _Loop:
    """Stands for a kernel loop: only its identity matters."""


@pytest.fixture(autouse=True)
def _numba_logger(monkeypatch):  # type: ignore[no-untyped-def]
    # numba-cuda creates its driver's logger when the driver initialises; no GPU here.
    monkeypatch.setattr(driver, "_logger", logging.getLogger("numba.cuda"), raising=False)


def test_frees_wait_for_the_last_resident_kernel() -> None:
    pending = _PendingDeallocs(capacity=1 << 30)
    freed: list[int] = []
    a, b = _Loop(), _Loop()
    hold_frees(a, pending)
    hold_frees(b, pending)
    pending.add_item(freed.append, 1, 8)
    pending.clear()  # what numba does when its queue is long, or on an allocation failure
    assert freed == [] and len(pending) == 1
    exited(a)
    pending.clear()
    assert freed == []  # b is still resident
    exited(b)
    assert freed == [1]  # the last one out lets them run
    exited(b)  # twice is harmless
    assert not pending.is_disabled


def test_a_kernel_loop_that_is_garbage_lets_go() -> None:
    pending = _PendingDeallocs(capacity=1 << 30)
    freed: list[int] = []
    loop = _Loop()
    hold_frees(loop, pending)
    pending.add_item(freed.append, 2, 8)
    del loop
    gc.collect()
    assert freed == [2] and not pending.is_disabled
