"""Waiting for a ring kernel's output on the event loop, woken natively.

``asyncio.sleep`` of less than a millisecond sleeps a millisecond (the selector's
timeout is in milliseconds), so a receiver that has spun in vain must not poll with
it. Instead it arms a wake word and awaits a file descriptor the event loop watches
(``add_reader``); the kernel's host side writes the descriptor when it publishes
records while the word is armed (``pydotcompute.rings.wake`` has the handshake). A
``cpu`` kernel's worker threads signal themselves; a GPU cannot write a descriptor,
so a ``cuda`` kernel has an ``OutputWatcher`` thread that polls the output ring only
while a receiver is armed and signals for the kernel.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys
import threading

import numpy as np

from pydotcompute.rings import wake
from pydotcompute.rings.layout import aligned_buffer

__all__ = ["ReplyWakeup", "OutputWatcher"]

_ONE = (1).to_bytes(8, sys.byteorder)


def _event_fd() -> tuple[int, int]:
    """(read end, write end): one eventfd where there is one, else a pipe."""
    if hasattr(os, "eventfd"):
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd, fd
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


class ReplyWakeup:
    """The receivers of one output ring asleep on the event loop, and the descriptor
    that wakes them.

    ``words``/``base`` place the wake words (``rings.wake``) where the publisher can
    reach them, e.g. in a kernel's control block; by default they get a line of their
    own. Several receivers may wait at once: a signal wakes them all and each checks
    the ring again.
    """

    def __init__(self, words: np.ndarray | None = None, base: int = 0) -> None:
        if words is None:
            words = aligned_buffer(128).view(np.int64)
        self.words = words
        self.base = base
        self._read_fd, self._write_fd = _event_fd()
        words[base + wake.ARMED] = 0
        words[base + wake.FD] = self._write_fd
        words[base + wake.ONE] = 1
        words[base + wake.ARM_FD] = -1
        words[base + wake.STOP] = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arm_fd = -1  # a watcher's descriptor, written when arming
        self.closed = False

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        self._detach()
        loop.add_reader(self._read_fd, self._readable)
        self._loop = loop

    def _detach(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._read_fd)

    def _readable(self) -> None:
        try:
            os.read(self._read_fd, 4096)  # an eventfd resets; a pipe drains
        except BlockingIOError:
            pass  # another reader of the descriptor took it: the waiters still check
        self.notify()

    def notify(self) -> None:
        """Wake every waiting receiver (they check the ring, and the kernel's state)."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self, ring: np.ndarray, timeout: float | None) -> None:
        """Sleep until ``ring`` may have a record to claim, ``timeout`` seconds pass, or
        ``notify()`` is called; returns at once when a record is there already. The
        caller checks the ring (and its own deadline) after every return."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        self._attach(loop)
        if not wake.wake_arm(self.words, self.base, ring):
            return
        if self._arm_fd >= 0:
            os.write(self._arm_fd, _ONE)
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        timer = None if timeout is None else loop.call_later(timeout, _finish, fut)
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            if fut in self._waiters:
                self._waiters.remove(fut)
            if not self._waiters:
                wake.wake_disarm(self.words, self.base)

    def close(self) -> None:
        """Wake every waiter, stop watching the descriptor and close it."""
        if self.closed:
            return
        self.closed = True
        self.notify()
        self._detach()
        os.close(self._read_fd)
        if self._write_fd != self._read_fd:
            os.close(self._write_fd)


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_PR_SET_TIMERSLACK = 29


def _fine_timer_slack() -> None:
    """Let this thread's short sleeps be short: Linux otherwise lets a sleep overrun by
    the thread's timer slack, 50 us by default."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)


class OutputWatcher:
    """A thread that signals a ``ReplyWakeup`` for a publisher that cannot: it sleeps
    in ``read`` until a receiver arms, then polls the ring (natively, without the
    GIL) until a record is there. ``start()`` and ``stop()`` bound its life."""

    def __init__(self, wakeup: ReplyWakeup, ring: np.ndarray, name: str) -> None:
        self.wakeup = wakeup
        self.ring = ring
        self.name = name
        self._arm_r, self._arm_w = -1, -1
        self._thread: threading.Thread | None = None
        self.error: int = 0

    def start(self) -> None:
        if hasattr(os, "eventfd"):
            self._arm_r = self._arm_w = os.eventfd(0, os.EFD_CLOEXEC)  # blocking reads
        else:
            self._arm_r, self._arm_w = os.pipe()
        w, b = self.wakeup.words, self.wakeup.base
        w[b + wake.ARM_FD] = self._arm_r
        w[b + wake.STOP] = 0
        self.wakeup._arm_fd = self._arm_w
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _fine_timer_slack()
        scratch = np.zeros(1, np.int64)
        self.error = int(wake.wake_watch(self.wakeup.words, self.wakeup.base, self.ring, scratch))

    def stop(self) -> None:
        """Tell the thread to return and wait for it (it wakes from its ``read``)."""
        if self._thread is None:
            return
        w, b = self.wakeup.words, self.wakeup.base
        w[b + wake.STOP] = 1
        os.write(self._arm_w, _ONE)
        self._thread.join()
        self._thread = None
        self.wakeup._arm_fd = -1
        os.close(self._arm_r)
        if self._arm_w != self._arm_r:
            os.close(self._arm_w)
