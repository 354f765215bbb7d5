"""The caller's side of a kernel placed on a Ray actor: a ``KernelBackend`` that moves batches.

Messages cross to and from the actor (``ray_actor.KernelActor``) in batches, never one
by one:

- Sends are coalesced. ``send`` encodes the message into a local buffer and returns; a
  flush, scheduled for the next turn of the event loop, hands everything buffered to
  the actor in one Ray call, and while that call is out the next batch gathers. One
  batch is in flight per kernel, so the actor receives the messages in the order they
  were sent. The buffer holds at most ``queue_size`` messages: beyond that, a BLOCK
  send waits for room (``QueueFullError`` after its timeout). A REJECT send waits for
  its batch's answer, since only the actor's ring can tell whether it fitted.
- Receives fetch a batch. A receive with nothing buffered asks the actor for as many
  outputs as are ready (waiting up to 0.2 s per call for the first) and serves from
  the buffer; while outputs keep coming the next fetch is already under way (at most
  one output queue's worth is held here). A fetch belongs to the loop, not to the
  caller: a caller that times out or is cancelled leaves the fetched outputs for the
  next receive; nothing is lost.

So a single message pays about one Ray round trip more than on a local kernel, and
whatever many callers send in one turn of the event loop travels as one batch.

A crash of the kernel's loop on the actor, or the death of the actor (its process or
node), makes the kernel FAILED with that exception as the cause, as on any backend.
Inputs still buffered here are then discarded and counted as dropped.

A host actor's ``ctx.send_to`` is relayed here: a task long-polls the actor's outbox
(``KernelActor.outbox``) and delivers each message with the runtime's ``send``, one at
a time, in the order the actor sent them, and hands the outcomes back with the next
poll. While a delivery waits for room, the outbox fills and the actor's ``send_to``
waits in turn. At stop the relay delivers what the actor had queued; a message that
cannot be delivered then is logged and counted as dropped.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pydotcompute.backends.base import (
    ErrorFactory,
    FailureCallback,
    KernelBackend,
    kernel_record_dtype,
    renamed,
)
from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.cluster.placement import KernelPlacement
from pydotcompute.cluster.ray_actor import OutboxItem, picklable
from pydotcompute.errors import (
    InvalidConfigurationError,
    KernelFailedError,
    KernelStateError,
    QueueFullError,
    QueueTimeoutError,
)
from pydotcompute.messages.record_codec import RecordCodec
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.telemetry.snapshot import KernelTelemetry

if TYPE_CHECKING:
    from pydotcompute.cluster.ray_cluster import RayCluster

__all__ = ["RayKernelBackend"]

__getattr__ = renamed(
    __name__, {"RayKernelLoop": "RayKernelBackend"}
)  # the former names, deprecated

FETCH_WAIT_S = 0.2
"""Longest one fetch waits on the actor; a receive without timeout fetches again."""
_CALL_TIMEOUT_S = 10.0  # telemetry and state reads, which the caller waits for
RELAY_WAIT_S = 0.5
"""Longest one poll of a host actor's outbox waits for a message."""

log = logging.getLogger(__name__)


def _cause(exc: BaseException) -> BaseException:
    """The exception raised on the actor, for one that Ray wrapped."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        return exc.cause
    return exc


def _reported_by_watch(exc: BaseException) -> bool:
    """True when a call failed because the kernel's loop had ended on a live actor:
    the actor's ``watch`` then brings the exception the loop itself ended with."""
    from ray.exceptions import RayActorError

    cause = _cause(exc)
    return (
        cause is not exc
        and not isinstance(exc, RayActorError)
        and isinstance(cause, (KernelFailedError, KernelStateError))
    )


class RayKernelBackend(KernelBackend):
    """A kernel that runs on a Ray actor, reached through batches (see the module)."""

    backend = "ray"

    def __init__(
        self,
        kernel_id: str,
        func: Callable[..., Any],
        config: RingKernelConfig,
        input_type: type | None,
        output_type: type | None,
        on_failure: FailureCallback,
        *,
        cluster: RayCluster,
        **links: Any,
    ) -> None:
        super().__init__(kernel_id, func, config, input_type, output_type, on_failure, **links)
        if config.backend == "cuda" and not config.num_gpus:
            raise InvalidConfigurationError(
                f"cuda kernel {kernel_id!r} on a cluster must ask for a GPU (num_gpus=1, "
                "or a fraction): Ray hides the GPUs from actors that ask for none"
            )
        self.backend = config.backend  # "auto" until the actor has resolved it
        self._cluster = cluster
        self.records = config.backend != "host"
        if self.records:
            self.in_dtype = kernel_record_dtype(input_type, "input", kernel_id, "cluster")
            self.out_dtype = kernel_record_dtype(output_type, "output", kernel_id, "cluster")
            owner = f"kernel {kernel_id!r}"
            # Outputs come from the actor with their ids already given.
            self._in_codec = RecordCodec(input_type, self.in_dtype, owner)
            self._out_codec = RecordCodec(output_type, self.out_dtype, owner, fill_ids=False)
        self.capacity = config.queue_size
        self._reject = config.backpressure is BackpressureStrategy.REJECT
        self.placement: KernelPlacement | None = None
        self._actor: Any = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        # _stopped (the skeleton's): the actor is gone; what was fetched stays readable
        # Inputs: encoded records (or messages) not yet sealed into a batch, sealed
        # batches waiting for the flusher, and how many inputs are held here in all.
        self._pending: bytearray | list[Any] = bytearray() if self.records else []
        self._pending_n = 0
        self._pending_answer: asyncio.Future[int] | None = None  # REJECT senders wait on it
        self._batches: collections.deque[
            tuple[Any, int, asyncio.Future[int] | None, float | None]
        ] = collections.deque()
        self._held = 0
        self._room: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        # The last activation or pause on its way to the actor. An async actor may run
        # calls out of submission order, so records sent after it wait for it.
        self._activation: Any = None
        # Outputs fetched and not yet taken: record arrays (with a read position in the
        # first) or messages; and the fetch under way, if any.
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._chunk_pos = 0
        self._items: collections.deque[Any] = collections.deque()
        self._buffered = 0
        self._fetch: asyncio.Future[Any] | None = None
        self._dropped = 0
        self._rejected = 0
        self._last: KernelTelemetry | None = None
        self._final_state: np.ndarray | None = None
        self._exit_task: asyncio.Task[None] | None = None
        self._relay: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._room = asyncio.Event()
        types = (
            (self.in_dtype, self.out_dtype)
            if self.records
            else (
                self.input_type,
                self.output_type,
            )
        )
        args = (self.kernel_id, self.func, self.config, *types)
        self._actor = await self._cluster.spawn(self.kernel_id, self.config, args)
        try:
            await self._cluster.placed(self.kernel_id, self.config, self._actor)
            info = await self._actor.start.remote()
        except BaseException as exc:
            self._cluster.kill(self._actor)
            self._actor = None
            self._stopped = True
            cause = _cause(exc)
            if cause is exc:
                raise
            raise cause from exc  # what the kernel failed with on the actor, not Ray's wrapper
        self.placement = KernelPlacement(**info)
        self.backend = self.placement.backend
        watch = self._actor.watch.remote().future()
        watch.add_done_callback(self._watched_threadsafe)
        if not self.records:
            self._relay = self._event_loop.create_task(
                self._relay_outbox(self._actor), name=f"pydotcompute-ray-relay-{self.kernel_id}"
            )

    async def _relay_outbox(self, actor: Any) -> None:
        """Deliver what the actor's ``ctx.send_to`` queued, in order (see the module)."""
        results: list[tuple[int, str, BaseException | None]] = []
        while True:
            try:
                items, closed = await actor.outbox.remote(RELAY_WAIT_S, results)
            except Exception as exc:  # noqa: BLE001 - the actor is gone; watch reports why
                log.debug("kernel %r: relay ends with its actor: %r", self.kernel_id, exc)
                return
            results = []
            for item in items:
                outcome = await self._deliver(item, closed)
                if outcome is not None:
                    results.append(outcome)
            if closed and not items:
                return

    async def _deliver(
        self, item: OutboxItem, closed: bool
    ) -> tuple[int, str, BaseException | None] | None:
        """Send one relayed message; the outcome the actor must hear, if any."""
        seq, target, msg, timeout, confirm = item
        if closed:  # nobody waits any more: do not let one full queue hold the stop
            timeout = _CALL_TIMEOUT_S if timeout is None else min(timeout, _CALL_TIMEOUT_S)
        try:
            await self.send_to(target, msg, timeout)
        except Exception as exc:  # noqa: BLE001 - the sender is told, or it is logged
            if closed:
                self._dropped += 1
                log.warning(
                    "kernel %r stopped with a message for %r it could not deliver: %r",
                    self.kernel_id,
                    target,
                    exc,
                )
                return None
            return seq, target, picklable(exc)
        return (seq, target, None) if confirm else None

    def _watched_threadsafe(self, fut: Any) -> None:
        loop = self._event_loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._watched, fut)
        except RuntimeError:
            return  # the event loop is closed: nobody is left to tell

    def _watched(self, fut: Any) -> None:
        if self._stopping:
            return
        exc = fut.exception()
        if exc is not None:
            self._fail(_cause(exc))
            return
        error = fut.result()
        if error is not None:
            self._fail(error)
        else:  # a host actor returned on its own: the kernel is over
            self._discard_inputs(KernelStateError(f"kernel {self.kernel_id!r} has exited"))
            self.on_exit()
            # Collect its last outputs and end the actor; the runtime will not stop it.
            assert self._event_loop is not None
            self._exit_task = self._event_loop.create_task(self.stop(_CALL_TIMEOUT_S))

    def _fail(self, exc: BaseException) -> None:
        if self.failure is not None or self._stopping:
            return
        self.failure = exc
        self._discard_inputs(self.failed_error())
        self.on_failure(exc)

    def close_failed(self, error: ErrorFactory) -> int:
        # A cluster kernel is closed at its crash already (_fail): it is never
        # restarted (Ray restarts actors, not the queues this side holds).
        return 0

    def _discard_inputs(self, error: BaseException) -> None:
        """Inputs not yet handed to the actor are discarded, counted as dropped, and
        their waiting senders get ``error``."""
        n = self._pending_n + sum(b[1] for b in self._batches)
        for fut in [self._pending_answer, *(b[2] for b in self._batches)]:
            if fut is not None and not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: a sender that gave up must not log it
        self._pending = bytearray() if self.records else []
        self._pending_n = 0
        self._pending_answer = None
        self._batches.clear()
        self._held -= n
        self._dropped += n
        if self._room is not None:
            self._room.set()

    def set_active(self, active: bool) -> None:
        if self.failure is None and not self._stopping and self._actor is not None:
            # No reply is awaited here; the next batch handed to the actor waits for it.
            self._activation = self._actor.set_active.remote(active)

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        self._discard_inputs(self.stopped_error())
        actor = self._actor
        if actor is None:
            return
        try:
            if self.failure is None:
                if self._fetch is not None:  # its outputs are ours: let it land
                    await asyncio.wait({self._fetch}, timeout=FETCH_WAIT_S + _CALL_TIMEOUT_S)
                try:
                    outputs, final, state = await asyncio.wait_for(
                        _awaitable(actor.stop.remote(timeout)), timeout + _CALL_TIMEOUT_S
                    )
                except asyncio.TimeoutError as exc:
                    raise KernelStateError(
                        f"the Ray actor of kernel {self.kernel_id!r} did not answer stop "
                        f"within {timeout + _CALL_TIMEOUT_S} s"
                    ) from exc
                except Exception as exc:
                    cause = _cause(exc)
                    raise cause from (exc if cause is not exc else None)
                self._add_outputs(outputs)
                self._last = final
                self._final_state = state
            if self._relay is not None:  # delivers what the actor had queued, then ends
                await asyncio.wait({self._relay}, timeout=_CALL_TIMEOUT_S + RELAY_WAIT_S)
            if self._flusher is not None:  # its call ends now that the actor has stopped
                await asyncio.wait({self._flusher}, timeout=_CALL_TIMEOUT_S)
        finally:
            self._actor = None
            self._stopped = True
            self._cluster.kill(actor)

    # -- input -----------------------------------------------------------------------

    def _check_open(self) -> None:
        # Input is refused from the moment a stop begins, not only once it is over.
        if self.failure is not None:
            raise self.failed_error()
        if self._stopping:
            raise self.stopped_error()

    def _encode(self, msg: Any) -> Any:
        """One input as the bytes of its record (compiled kernels) or as itself."""
        if not self.records:
            return msg
        return self._in_codec.to_bytes(msg)

    def _hold(self, encoded: Any) -> None:
        if self.records:
            self._pending += encoded
        else:
            self._pending.append(encoded)
        self._pending_n += 1
        self._held += 1
        if self._flusher is None:
            assert self._event_loop is not None
            self._flusher = self._event_loop.create_task(
                self._flush(), name=f"pydotcompute-ray-flush-{self.kernel_id}"
            )

    def try_put(self, msg: Any) -> bool:
        if self.failure is not None or self._stopping:
            self._check_open()
        if self._reject or self._held >= self.capacity:
            return False
        self._hold(self._encode(msg))
        return True

    async def put(self, msg: Any, timeout: float | None) -> None:
        self._check_open()
        encoded = self._encode(msg)
        if self._reject:
            if self._held >= self.capacity:
                self._rejected += 1
                raise QueueFullError(
                    f"{self._held} input(s) of {self.kernel_id!r} are on their way: rejected"
                )
            if self._pending_answer is None:
                assert self._event_loop is not None
                self._pending_answer = self._event_loop.create_future()
            answer, position = self._pending_answer, self._pending_n
            self._hold(encoded)
            if position >= await answer:
                raise QueueFullError(f"input ring of {self.kernel_id!r} is full: rejected")
            return
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        assert self._room is not None
        while self._held >= self.capacity:
            self._room.clear()
            left = None if deadline is None else deadline - loop.time()
            try:
                if left is not None and left <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(self._room.wait(), left)
            except asyncio.TimeoutError:
                self._rejected += 1
                raise QueueFullError(
                    f"inputs of {self.kernel_id!r} stayed {self._held} deep for {timeout} s"
                ) from None
            self._check_open()
        self._hold(encoded)

    async def put_batch(self, records: np.ndarray, timeout: float | None) -> int:
        self._check_open()
        if not self.records:
            return await super().put_batch(records, timeout)
        if not isinstance(records, np.ndarray) or records.dtype != self.in_dtype:
            got = records.dtype if isinstance(records, np.ndarray) else type(records).__name__
            raise TypeError(
                f"kernel {self.kernel_id!r} takes record arrays of dtype {self.in_dtype}, got {got}"
            )
        records = np.ascontiguousarray(records.reshape(-1))
        n = len(records)
        if n == 0:
            return 0
        self._seal()  # messages sent before this batch go before it
        assert self._event_loop is not None
        answer: asyncio.Future[int] = self._event_loop.create_future()
        self._batches.append((records, n, answer, timeout))
        self._held += n
        if self._flusher is None:
            self._flusher = self._event_loop.create_task(
                self._flush(), name=f"pydotcompute-ray-flush-{self.kernel_id}"
            )
        return await answer

    def _seal(self) -> None:
        """Turn the pending messages into one batch at the end of the queue."""
        if not self._pending_n:
            return
        pending = self._pending
        batch = np.frombuffer(pending, self.in_dtype) if isinstance(pending, bytearray) else pending
        self._batches.append((batch, self._pending_n, self._pending_answer, None))
        self._pending = bytearray() if self.records else []
        self._pending_n = 0
        self._pending_answer = None

    async def _flush(self) -> None:
        """Hand the batches to the actor one at a time, in order (see the module)."""
        try:
            while self.failure is None and not self._stopping:
                if not self._batches:
                    self._seal()
                    if not self._batches:
                        return
                batch, n, answer, timeout = self._batches.popleft()
                try:
                    activation, self._activation = self._activation, None
                    if activation is not None:
                        await activation  # the state change lands before these records
                    placed = await self._actor.put.remote(batch, timeout)
                except Exception as exc:
                    self._held -= n
                    cause = _cause(exc)
                    if self._stopping:
                        self._dropped += n
                    elif isinstance(cause, QueueFullError) and answer is not None:
                        answer.set_exception(cause)  # a put_batch that timed out
                        continue
                    elif _reported_by_watch(exc):
                        self._dropped += n
                    else:
                        self._fail(cause)
                    if answer is not None and not answer.done():
                        answer.set_exception(
                            self.failed_error() if self.failure is not None else cause
                        )
                        answer.exception()
                    continue
                self._held -= n
                assert self._room is not None
                self._room.set()
                if answer is not None and not answer.done():
                    answer.set_result(placed)
        finally:
            self._flusher = None

    # -- output ----------------------------------------------------------------------

    def _add_outputs(self, outputs: Any) -> None:
        n = len(outputs)
        if not n:
            return
        if self.records:
            # A copy of our own: writable, and it releases Ray's shared-memory object.
            self._chunks.append(np.array(outputs))
        else:
            self._items.extend(outputs)
        self._buffered += n

    def _fetched(self, fut: asyncio.Future[Any]) -> None:
        self._fetch = None
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            outputs = fut.result()
            self._add_outputs(outputs)
            # Read ahead while outputs flow: the next batch travels while the caller
            # handles this one. The buffer stays within one fetch of the output queue.
            size = self.config.effective_output_queue_size
            if len(outputs) and self._buffered < size and not self._stopping and self._actor:
                self._start_fetch(size, FETCH_WAIT_S)
        elif not _reported_by_watch(exc):
            self._fail(_cause(exc))

    def _start_fetch(self, max_items: int, wait_s: float) -> asyncio.Future[Any]:
        ref = self._actor.get.remote(max_items, wait_s)
        fut = asyncio.wrap_future(ref.future(), loop=self._event_loop)
        fut.add_done_callback(self._fetched)
        self._fetch = fut
        return fut

    async def _wait_output(self, max_items: int, timeout: float | None) -> None:
        """Wait until at least one output is buffered; ``QueueTimeoutError`` after
        ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._buffered:
            if self.failure is not None:
                raise self.failed_error()
            if self._stopped or self._actor is None:
                raise KernelStateError(
                    f"kernel {self.kernel_id!r} is terminated and has no outputs left"
                )
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise QueueTimeoutError(
                    f"no output from kernel {self.kernel_id!r} within {timeout} s"
                )
            if self._stopping:  # stop() collects the last outputs; no fetch may race it
                await asyncio.sleep(0.005)
                continue
            fetch = self._fetch
            if fetch is not None and fetch.done():
                # Landed; its done callback (_fetched) runs at the next turn of the
                # event loop. Awaiting a finished future would not yield to it.
                await asyncio.sleep(0)
                continue
            if fetch is None:
                wait_s = FETCH_WAIT_S if left is None else min(FETCH_WAIT_S, left)
                fetch = self._start_fetch(
                    max(max_items, self.config.effective_output_queue_size), wait_s
                )
            try:
                await asyncio.wait_for(asyncio.shield(fetch), left)
            except asyncio.TimeoutError:
                continue  # the deadline check above raises
            except Exception:
                continue  # _fetched has recorded what it means

    def _take_one(self) -> Any:
        self._buffered -= 1
        if not self.records:
            return self._items.popleft()
        chunk = self._chunks[0]
        i = self._chunk_pos
        self._chunk_pos += 1
        if self._chunk_pos == len(chunk):
            self._chunks.popleft()
            self._chunk_pos = 0
        return self._out_codec.message_at(chunk, i)

    def _take_many(self, max_items: int) -> Any:
        if not self.records:
            n = min(max_items, self._buffered)
            self._buffered -= n
            return [self._items.popleft() for _ in range(n)]
        parts = []
        want = max_items
        while want and self._chunks:
            chunk = self._chunks[0]
            part = chunk[self._chunk_pos : self._chunk_pos + want]
            parts.append(part)
            want -= len(part)
            self._chunk_pos += len(part)
            if self._chunk_pos == len(chunk):
                self._chunks.popleft()
                self._chunk_pos = 0
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._buffered -= len(out)
        return out

    def try_get(self, default: Any) -> Any:
        return self._take_one() if self._buffered else default

    async def get(self, timeout: float | None) -> Any:
        if not self._buffered:
            await self._wait_output(1, timeout)
        return self._take_one()

    async def get_batch(self, max_items: int, timeout: float | None) -> Any:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if not self.records:
            return await super().get_batch(max_items, timeout)
        if not self._buffered:
            await self._wait_output(max_items, timeout)
        return self._take_many(max_items)

    # -- state and telemetry ---------------------------------------------------------

    def read_state(self) -> np.ndarray:
        if not self.records:
            return super().read_state()
        if self._actor is None or self.failure is not None:
            if self._final_state is not None:
                return self._final_state.copy()
            raise KernelStateError(
                f"the state of kernel {self.kernel_id!r} went with its Ray actor"
            )
        import ray

        return ray.get(self._actor.read_state.remote(), timeout=_CALL_TIMEOUT_S)  # type: ignore[no-any-return]

    def telemetry(self, state: str) -> KernelTelemetry:
        """The actor's counters (one Ray call) plus what waits here in either direction."""
        base = self._last
        if self._actor is not None and self.failure is None:
            import ray

            try:
                base = self._last = ray.get(
                    self._actor.telemetry.remote(state), timeout=_CALL_TIMEOUT_S
                )
            except Exception:  # noqa: BLE001 - a dying actor: report what was last read
                base = self._last
        if base is None:
            base = KernelTelemetry(kernel_id=self.kernel_id, backend=self.backend, state=state)
        return dataclasses.replace(
            base,
            kernel_id=self.kernel_id,
            state=state,
            errors=base.errors + (1 if self.failure is not None and base.errors == 0 else 0),
            messages_dropped=base.messages_dropped + self._dropped,
            messages_rejected=base.messages_rejected + self._rejected,
            queue_depth=base.queue_depth + max(0, self._held),
            output_queue_depth=base.output_queue_depth + self._buffered,
            uptime_s=time.monotonic() - self.launched_at,
            timestamp=time.time(),
        )


async def _awaitable(ref: Any) -> Any:
    return await ref
