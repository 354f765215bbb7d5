"""The ``host`` backend: an ``async def kernel(ctx)`` actor run as an asyncio task."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from operator import attrgetter
from typing import Any, Generic, TypeVar

from pydotcompute.backends.base import (
    ErrorFactory,
    ExitCallback,
    FailureCallback,
    KernelBackend,
    SendTo,
    renamed,
)
from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.backends.mailboxes import Mailbox
from pydotcompute.errors import KernelStateError
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.telemetry.snapshot import KernelTelemetry, LatencyRecorder

__all__ = ["KernelContext", "HostKernelBackend", "LATENCY_SAMPLE_EVERY"]

__getattr__ = renamed(
    __name__, {"HostKernelLoop": "HostKernelBackend"}
)  # the former names, deprecated

log = logging.getLogger("pydotcompute.backends")

_perf_ns = time.perf_counter_ns

LATENCY_SAMPLE_EVERY = 64
"""Host actors time one message in this many (a power of two) for latency percentiles:
the recorder's 4096-sample window then spans the last 262 144 messages."""
_SAMPLE_MASK = LATENCY_SAMPLE_EVERY - 1
In = TypeVar("In")
Out = TypeVar("Out")


class KernelContext(Generic[In, Out]):
    """What an ``async def`` ring kernel sees: its queues and its lifecycle flags.

    ``KernelContext[Request, Response]`` types an actor's parameter: it receives
    ``Request`` and sends ``Response``.

    ``receive()`` yields only while the kernel is ACTIVE: a deactivated kernel is
    simply not given messages. When the kernel is terminated, a ``receive()`` that
    is waiting (or called afterwards) raises ``asyncio.CancelledError`` so the actor
    unwinds through its ``finally`` blocks.
    """

    __slots__ = (
        "_backend",
        "_inbox",
        "_outbox",
        "_output_type",
        "_pending_t",
        "_holding",
        "_send_to",
        "kernel_id",
        "processed",
    )

    def __init__(self, backend: HostKernelBackend, send_to: SendTo) -> None:
        self._backend = backend
        self._inbox = backend.inbox
        self._outbox = backend.outbox
        self._output_type = backend.output_type
        self._pending_t = 0
        self._holding: Any = None  # the last message received: named if the actor raises
        self._send_to = send_to
        self.kernel_id: str = backend.kernel_id
        # Counted here, on the actor's side, where the per-message work happens. What
        # it sent is counted by its output mailbox (see HostKernelBackend.sent).
        self.processed = 0

    # Read on every turn of an actor's loop: a property whose getter is C code costs
    # half what a Python getter does (measured 0.2 us of a 15 us round trip).
    should_terminate = property(
        attrgetter("_backend.stopping"), doc="True once the runtime asked this kernel to stop."
    )
    is_active = property(
        attrgetter("_backend.active"),  # the backend keeps it False once stopping
        doc="True while the kernel is ACTIVE (not launched-only, deactivated or stopping).",
    )

    async def wait_active(self) -> None:
        """Wait until the kernel is ACTIVE, or until it is asked to terminate."""
        await self._backend.active_event.wait()

    async def receive(self, timeout: float | None = None) -> In:
        """The next input message; ``QueueTimeoutError`` if none within ``timeout`` s."""
        t = self._pending_t
        if t:  # the previous message is done (inline: this runs once per message)
            self._pending_t = 0
            self.processed += 1
            if t != 1:
                self._backend.latency.record(_perf_ns() - t)
        inbox = self._inbox
        items = inbox.items
        msg: In
        # The mailbox's no-wait get, inline: this runs once per message (a call costs
        # a measurable part of a round trip). Keep it in step with Mailbox.try_get.
        if len(items) > inbox.hold:
            t, msg = items.popleft()
            if inbox.putters:
                inbox.wake_putter()
        else:
            t, msg = await inbox.get(timeout)
        self._pending_t = t
        self._holding = msg
        return msg

    async def send(self, msg: Out, timeout: float | None = None) -> None:
        """Emit an output message (read by ``runtime.receive``)."""
        otype = self._output_type
        if otype is not None and not isinstance(msg, otype):
            raise TypeError(
                f"kernel {self.kernel_id!r} sends {otype.__name__}, got {type(msg).__name__}"
            )
        outbox = self._outbox
        items = outbox.items
        # The mailbox's no-wait put, inline (see receive). Keep it in step with
        # Mailbox.try_put.
        if len(items) < outbox.room:
            items.append(msg)
            outbox.enqueued += 1
            if outbox.getters:
                outbox.wake_getter()
        elif not outbox.try_put(msg):
            await outbox.put(msg, timeout)
        # The message in hand is done once its output is queued, not before.
        t = self._pending_t
        if t:
            self._pending_t = 0
            self.processed += 1
            if t != 1:
                self._backend.latency.record(_perf_ns() - t)

    def _finish(self, t_enqueued: int) -> None:
        self._pending_t = 0
        self.processed += 1
        if t_enqueued != 1:
            self._backend.latency.record(_perf_ns() - t_enqueued)

    async def send_to(self, kernel_id: str, msg: Any, timeout: float | None = None) -> None:
        """Send ``msg`` to another kernel's input queue (its backpressure applies)."""
        await self._send_to(kernel_id, msg, timeout)

    def finished(self) -> None:
        """Count the message in hand as processed (called when the actor returns)."""
        if self._pending_t:
            self._finish(self._pending_t)


class HostKernelBackend(KernelBackend):
    """Runs one ``async def`` actor as a task between an input and an output mailbox.

    Latency of a message is measured from its enqueue to the moment the actor is done
    with it: its next ``send`` or ``receive`` (or its exit). It is sampled on one
    message in ``LATENCY_SAMPLE_EVERY``.

    The runtime and the context take the no-wait paths of the two mailboxes inline
    (see ``RingKernelRuntime.send``); everything that may wait, drop, reject or fail
    goes through ``Mailbox``.
    """

    backend = "host"
    handler_kind = "actor"
    restartable = True

    def __init__(
        self,
        kernel_id: str,
        func: Callable[..., Any],
        config: RingKernelConfig,
        input_type: type | None,
        output_type: type | None,
        on_failure: FailureCallback,
        *,
        send_to: SendTo | None = None,
        on_exit: ExitCallback | None = None,
        telemetry: bool = True,
    ) -> None:
        super().__init__(
            kernel_id,
            func,
            config,
            input_type,
            output_type,
            on_failure,
            send_to=send_to,
            on_exit=on_exit,
            telemetry=telemetry,
        )
        self.inbox = Mailbox(config.queue_size, config.backpressure, f"input of {kernel_id!r}")
        self.inbox.sample_mask = _SAMPLE_MASK
        self.inbox.timed = telemetry
        self.outbox = Mailbox(
            config.effective_output_queue_size, self.output_strategy, f"output of {kernel_id!r}"
        )
        self.inbox.set_deliver(False)  # nothing is delivered before activate()
        self.active = False
        self.active_event = asyncio.Event()
        self.stopping = False
        self.task: asyncio.Task[None] | None = None
        self.ctx: KernelContext[Any, Any] = KernelContext(self, self.send_to)
        # The no-wait paths the runtime calls inline: the mailboxes' own methods.
        self.try_put = self.inbox.try_put_stamped  # type: ignore[method-assign,assignment]
        self.try_get = self.poll = self.outbox.try_get  # type: ignore[method-assign]
        self.get = self.outbox.get  # type: ignore[method-assign]  # no coroutine of our own
        self.errors = 0
        self.dropped_at_stop = 0
        self.latency = LatencyRecorder()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"pydotcompute-kernel-{self.kernel_id}"
        )

    async def _run(self) -> None:
        try:
            await self.func(self.ctx)
        except BaseException as exc:
            if not (isinstance(exc, asyncio.CancelledError) and self.stopping):
                # The actor crashed, or something other than the runtime cancelled it:
                # either way it is gone; the runtime restarts it or closes its queues.
                self._crash(exc)
                if not isinstance(exc, Exception):
                    raise
            # Cancelled by terminate: whatever the actor held when cancelled (an output
            # it could not queue, work it did not finish) is not processed.
            return
        finally:
            self.active_time.pause()
        self.ctx.finished()
        if not self.stopping:
            # The actor returned on its own: the kernel is over.
            self.stopping = True
            self.active = False
            self.dropped_at_stop += self.inbox.close(self._exited_error)
            self.outbox.close(self._exited_error, drain=True)
            self.active_event.set()
            self.on_exit()

    def _crash(self, exc: BaseException) -> None:
        # Everything the actor sent is already in its output mailbox; both mailboxes
        # stay open until the runtime decides between restart() and close_failed().
        self.errors += 1
        ctx = self.ctx
        # The message it received and had not answered yet (none once it has sent).
        self.failed_input = ctx._holding if ctx._pending_t else None
        self.on_failure(exc)

    async def restart(self) -> None:
        task = self.task
        if task is not None and not task.done():
            await asyncio.wait({task})  # it reported its crash and is unwinding
        ctx = self.ctx
        ctx._pending_t = 0  # the message that raised is not counted as processed
        ctx._holding = None
        self.failed_input = None
        self.stopping = False
        await self.start()

    def close_failed(self, error: ErrorFactory) -> int:
        self.failure = error()
        discarded = self.inbox.close(error)
        self.dropped_at_stop += discarded
        # Outputs the actor produced before it raised stay receivable.
        self.outbox.close(error, drain=True)
        self.active_event.set()
        return discarded

    def _exited_error(self) -> BaseException:
        return KernelStateError(f"kernel {self.kernel_id!r} has exited")

    def set_active(self, active: bool) -> None:
        self._track_active(active)
        self.active = active
        self.inbox.set_deliver(active)
        if active:
            self.active_event.set()
        else:
            self.active_event.clear()

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        self.active = False
        self.active_time.pause()
        # Wake the actor wherever it waits for input: receive() raises CancelledError,
        # wait_active() returns and should_terminate is True. Its output stays open
        # until it has finished, so the message in hand still gets its reply.
        discarded = self.inbox.close(asyncio.CancelledError, put_error=self.stopped_error)
        self.dropped_at_stop += discarded
        self.active_event.set()
        if discarded:
            log.warning(
                "kernel %r terminated with %d queued message(s) unprocessed",
                self.kernel_id,
                discarded,
            )
        task = self.task
        try:
            if task is None or task.done():
                return
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if done:
                return
            # The actor did not return in time (busy, or waiting on something else).
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=max(0.1, min(1.0, timeout)))
            if not done:
                raise KernelStateError(
                    f"kernel {self.kernel_id!r} ignored cancellation and is still running"
                )
        finally:
            if self.failure is None:  # outputs already produced stay readable
                self.outbox.close(self.stopped_error, drain=True)

    def _stopped_error(self) -> BaseException:
        return KernelStateError(f"kernel {self.kernel_id!r} is terminated")

    # -- messages --------------------------------------------------------------------

    async def put(self, msg: Any, timeout: float | None) -> None:
        inbox = self.inbox
        stamp = 1 if inbox.enqueued & _SAMPLE_MASK or not self.timed else _perf_ns()
        await inbox.put((stamp, msg), timeout)

    async def get(self, timeout: float | None) -> Any:
        return await self.outbox.get(timeout)  # replaced by the mailbox's own in __init__

    async def drain_outputs(self) -> list[Any]:
        return self.outbox.take_all()

    # -- telemetry -------------------------------------------------------------------

    @property
    def sent(self) -> int:
        """Messages the actor sent: queued on its output, or dropped there as newest."""
        out = self.outbox
        return out.enqueued + (
            out.dropped if out.strategy is BackpressureStrategy.DROP_NEWEST else 0
        )

    def telemetry(self, state: str) -> KernelTelemetry:
        p50, p99 = self.latency.percentiles(50, 99)
        return self._telemetry(
            state,
            self.ctx.processed,
            messages_sent=self.sent,
            messages_dropped=self.inbox.dropped + self.outbox.dropped + self.dropped_at_stop,
            messages_rejected=self.inbox.rejected,
            errors=self.errors,
            queue_depth=len(self.inbox),
            queue_capacity=self.inbox.capacity,
            output_queue_depth=len(self.outbox),
            latency_p50_us=p50,
            latency_p99_us=p99,
            latency_buckets=tuple(self.latency.buckets),
            latency_sum_s=self.latency.sum_ns / 1e9,
        )
