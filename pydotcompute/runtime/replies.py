"""Replies to ``send_and_receive``: many requests in flight, each caller its own reply.

A kernel answers in the order it was asked (a host actor's queue and the ring backends
are FIFO), so a reply belongs to the oldest request still waiting for one. Per kernel,
``ReplyQueue`` keeps the callers' places in the order their requests were sent. A
caller alone reads its reply itself; while several wait, one reader task hands each
output to the oldest. A caller that gave up (timeout, cancellation) leaves its place:
the reply owed to it is read and dropped, so the replies of later callers are not
shifted. A request whose handling raised gets no reply: when the kernel is restarted,
its caller is told (``no_reply``) and gives up its place for the same reason.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

from pydotcompute.errors import KernelStateError, QueueTimeoutError

__all__ = ["ReplyQueue"]


class ReplyQueue:
    """The callers of one kernel waiting for replies, in the order they sent."""

    __slots__ = ("kernel_id", "send_lock", "_receive", "_waiting", "_reader", "_inline")

    def __init__(self, kernel_id: str, receive: Callable[[float | None], Awaitable[Any]]) -> None:
        self.kernel_id = kernel_id
        # Held from a request's send until its place is taken: places follow sends.
        self.send_lock = asyncio.Lock()
        self._receive = receive
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._reader: asyncio.Task[None] | None = None
        self._inline: asyncio.Task[Any] | None = None  # a caller reading its own reply

    def expect(self) -> asyncio.Future[Any]:
        """A place for the reply to the request just sent."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        return fut

    async def wait(
        self, place: asyncio.Future[Any], timeout: float | None, asked: float | None = None
    ) -> Any:
        """The reply for ``place``; ``QueueTimeoutError`` after ``timeout`` (the error
        names ``asked``, the caller's whole timeout, when given)."""
        try:
            alone = len(self._waiting) == 1 and self._waiting[0] is place
            if alone and self._reader is None and self._inline is None:
                return await self._read_own(place, timeout)
            self._start_reader()
            return await asyncio.wait_for(asyncio.shield(place), timeout)
        except asyncio.TimeoutError:  # QueueTimeoutError too
            raise QueueTimeoutError(
                f"no reply from kernel {self.kernel_id!r} within "
                f"{timeout if asked is None else asked} s"
            ) from None
        finally:
            place.cancel()  # no-op once answered; else its reply goes to nobody
            self._start_reader()  # callers that came while this one read its own

    async def _read_own(self, place: asyncio.Future[Any], timeout: float | None) -> Any:
        # Alone: no hand-off between tasks. Callers that come meanwhile wait for the
        # reader this one starts when it is done.
        self._inline = task = asyncio.current_task()
        try:
            reply = await self._receive(timeout)
        except asyncio.CancelledError:
            if place.done() and not place.cancelled():  # woken by no_reply
                uncancel = getattr(task, "uncancel", None)  # Python 3.11+
                if uncancel is not None:
                    uncancel()
                raise place.exception() from None  # type: ignore[misc]
            raise
        except QueueTimeoutError:
            raise
        except Exception as exc:  # the kernel failed or ended: every caller hears
            self._fail(exc)
            raise
        finally:
            self._inline = None
        if self._waiting and self._waiting[0] is place:
            self._waiting.popleft()
        return reply

    def _start_reader(self) -> None:
        # Only for a caller still waiting: a reply owed to nobody is dropped by the
        # reader the next caller starts.
        if (
            self._reader is None
            and self._inline is None
            and any(not place.done() for place in self._waiting)
        ):
            self._reader = asyncio.get_running_loop().create_task(
                self._read(), name=f"pydotcompute-replies-{self.kernel_id}"
            )

    async def _read(self) -> None:
        try:
            while self._waiting:
                try:
                    reply = await self._receive(None)
                except asyncio.CancelledError:
                    self._fail(KernelStateError(f"kernel {self.kernel_id!r} is terminated"))
                    raise
                except Exception as exc:  # the kernel failed or ended: every caller hears
                    self._fail(exc)
                    return
                place = self._waiting.popleft()
                if not place.done():  # done: its caller gave up, the reply goes to nobody
                    place.set_result(reply)
        finally:
            self._reader = None

    def no_reply(self, index: int, exc: BaseException) -> None:
        """The request at ``index`` (0: the oldest waiting) will get no reply: its
        handling raised. Its caller gets ``exc``; later callers keep their order."""
        if index >= len(self._waiting):
            return  # it was not a send_and_receive request
        place = self._waiting[index]
        del self._waiting[index]
        if place.done():
            return  # its caller has given up already
        place.set_exception(exc)
        if index == 0 and self._inline is not None:
            self._inline.cancel()  # it waits in receive: wake it (see _read_own)

    def _fail(self, exc: BaseException) -> None:
        while self._waiting:
            place = self._waiting.popleft()
            if not place.done():
                place.set_exception(exc)

    async def close(self) -> None:
        """Stop reading (the kernel is gone); callers still waiting get
        ``KernelStateError``."""
        reader = self._reader
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self._fail(KernelStateError(f"kernel {self.kernel_id!r} is terminated"))
