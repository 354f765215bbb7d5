"""Requests to a kernel stage and their replies, matched by the request's identity.

A kernel stage sends each item's value with its ``message_id`` and takes the replies
that carry it back as their ``correlation_id`` (a compiled loop copies the input's id
there before the handler runs; a host actor sets it itself). So a kernel may answer
out of order, or not at all, without shifting anyone else's reply. A reply that names
no waiting request (no correlation id, or one nobody sent) goes to the oldest waiting
request: the order rule ``send_and_receive`` uses, for actors that set no ids.

A request whose handling raised gets the kernel's ``KernelFailedError`` (the runtime
tells the table which message raised, whether the kernel restarts or fails), so it
fails and is retried like any failed call. A request that gets no reply otherwise
is *filtered* once the kernel says it is done with it: ``settled_through(upto)``
(``cpu`` and ``cuda`` kernels, see ``KernelBackend``) answers, once every record
below input position ``upto`` has been handled and its outputs have their places,
where those outputs end; the reader takes outputs that far and settles every
request sent before as filtered. A kernel that handles its ring in order (a ``cuda``
kernel, whatever its blocks; a ``cpu`` kernel with one worker) also settles the
requests before a reply that have none. With several ``cpu`` workers outputs
interleave and no reply settles another, so the reader asks the kernel every few
milliseconds while replies come as well as when they stop. Other kernels (host actors, CUDA C++,
rings that drop records) cannot say: a request they never answer times out
(``QueueTimeoutError``), as a plain request does.

A *linked chain* (``cpu`` or ``cuda`` kernels joined by ``RingKernelRuntime.link``) is
asked like one kernel: requests go to its first kernel and replies come from its last,
which answers with the id the request entered with (a linked loop carries each input's
``message_id`` to its outputs). The end of a burst is seen kernel by kernel: where
the first one's outputs end in the second one's input ring (on ``cuda``, the link ring
in device memory) is what the second must be done with, and so on; it is in order end
to end when every kernel has one worker (always, on ``cuda``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from pydotcompute.errors import KernelFailedError, QueueFullError, QueueTimeoutError
from pydotcompute.messages.message import RingKernelMessage
from pydotcompute.messages.record import record_layout, uuid_offset
from pydotcompute.runtime.lifecycle import KernelState

__all__ = ["FILTERED_OUT", "KernelReplies", "Waiting", "replies_for"]


class _Filtered:
    __slots__ = ()

    def __repr__(self) -> str:
        return "FILTERED_OUT"


FILTERED_OUT: Any = _Filtered()
"""What a request gets when its kernel consumed it without output."""

_SETTLE_POLL_S = 0.002  # how often a reader with nothing to read looks for dropped records
_READ_POLL_S = 0.05  # how often a reader that cannot detect drops looks for no waiters
_BATCH = 1024


_PENDING: Any = object()  # a place whose reply has not come


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Batch:
    """The replies owed to one ``request_many`` call: one result per value, and one
    future, set when the last place is answered (a future per value cost as much as
    the rest of a kernel stage's per-item work)."""

    __slots__ = ("fut", "left", "results")

    def __init__(self, n: int) -> None:
        self.results: list[Any] = [_PENDING] * n
        self.left = 0  # places waiting
        self.fut: asyncio.Future[None] | None = None

    def give(self, index: int, value: Any) -> None:
        if self.results[index] is _PENDING:
            self.results[index] = value
            self.left -= 1
            if self.left == 0 and self.fut is not None and not self.fut.done():
                self.fut.set_result(None)


class Place:
    """Where the reply to one request goes: an index in a ``Batch``."""

    __slots__ = ("batch", "index")

    def __init__(self, batch: Batch, index: int) -> None:
        self.batch, self.index = batch, index
        batch.left += 1

    def done(self) -> bool:
        return self.batch.results[self.index] is not _PENDING

    def result(self) -> Any:
        return self.batch.results[self.index]


class Waiting:
    """Requests waiting for replies: by id (16 bytes; ids may repeat, the oldest is
    answered first) and in the order they were sent (sequence numbers from 1).

    Kept as flat tables a whole batch goes in and out of in one loop: by sequence
    number, the request's batch, index there and id; by id, the oldest sequence number
    waiting under it (later ones with the same id wait in ``_more``). Three tables of
    plain values rather than a tuple per request: nothing per request for the garbage
    collector to track while it waits."""

    __slots__ = ("_by_id", "_by_seq", "_index", "_more", "_next", "_oldest", "_rid")

    def __init__(self) -> None:
        self._by_seq: dict[int, Batch] = {}
        self._index: dict[int, int] = {}
        self._rid: dict[int, bytes | None] = {}
        self._by_id: dict[bytes | None, int] = {}
        self._more: dict[bytes | None, collections.deque[int]] = {}
        self._next = 1
        self._oldest = 1  # no request older than this one waits

    def __len__(self) -> int:
        return len(self._by_seq)

    def expect(self, rid: bytes | None, place: Place | None = None) -> tuple[int, Place]:
        """Wait for the reply to a request with id ``rid`` in ``place`` (a place of its
        own when None): (sequence number, place)."""
        if place is None:
            place = Place(Batch(1), 0)
        seq = self._next
        self._next += 1
        self._by_seq[seq] = place.batch
        self._index[seq] = place.index
        self._rid[seq] = rid
        self._file(rid, seq)
        return seq, place

    def expect_many(self, rids: list[bytes], batch: Batch, where: Sequence[int]) -> range:
        """``expect`` for requests ``rids``, their replies going to ``batch`` at the
        indexes ``where``: their sequence numbers (consecutive)."""
        n = len(rids)
        seqs = range(self._next, self._next + n)
        self._next += n
        self._by_seq.update(zip(seqs, itertools.repeat(batch, n), strict=True))
        self._index.update(zip(seqs, where, strict=True))
        self._rid.update(zip(seqs, rids, strict=True))
        batch.left += n
        by_id = self._by_id
        if by_id.keys().isdisjoint(rids) and len(set(rids)) == n:
            by_id.update(zip(rids, seqs, strict=True))  # ids all new: the common case, in one call
        else:
            for rid, seq in zip(rids, seqs, strict=True):
                self._file(rid, seq)
        return seqs

    def _file(self, rid: bytes | None, seq: int) -> None:
        if self._by_id.setdefault(rid, seq) != seq:
            self._more.setdefault(rid, collections.deque()).append(seq)

    def _pop(self, seq: int) -> tuple[Batch, int]:
        batch = self._by_seq.pop(seq)
        index = self._index.pop(seq)
        rid = self._rid.pop(seq)
        more = self._more.get(rid) if self._more else None
        if more is None:
            del self._by_id[rid]
        elif self._by_id[rid] == seq:
            self._by_id[rid] = more.popleft()
        else:
            more.remove(seq)
        if more is not None and not more:
            del self._more[rid]
        if seq == self._oldest:
            self._oldest = seq + 1
        return batch, index

    def _first(self) -> int | None:
        """The sequence number of the oldest waiting request, or None."""
        by_seq = self._by_seq
        if not by_seq:
            self._oldest = self._next
            return None
        seq = self._oldest
        while seq not in by_seq:
            seq += 1
        self._oldest = seq
        return seq

    def answer(self, rid: bytes | None, value: Any) -> int | None:
        """Give ``value`` to the oldest request with id ``rid``; its sequence number,
        or None when no request waits with that id."""
        seq = self._by_id.get(rid)
        if seq is None:
            return None
        batch, index = self._pop(seq)
        batch.give(index, value)
        return seq

    def answer_many(self, rids: list[bytes], values: list[Any], in_order: bool) -> None:
        """``answer`` each value by its id; a value whose id nobody waits for goes to
        the oldest request. ``in_order`` (one worker, answering in ring order): the
        requests before an answered one that have no reply were consumed without output."""
        by_id, by_seq, by_index, by_rid = self._by_id, self._by_seq, self._index, self._rid
        for rid, value in zip(rids, values, strict=True):
            seq = by_id.get(rid)
            if seq is None:
                self.answer_oldest(value)
                continue
            if in_order and seq != self._oldest:
                self.settle_before(seq)
            if self._more:
                batch, index = self._pop(seq)
            else:  # ``_pop`` for ids that do not repeat, inline: this runs per reply
                batch = by_seq.pop(seq)
                index = by_index.pop(seq)
                del by_rid[seq]
                del by_id[rid]
                if seq == self._oldest:
                    self._oldest = seq + 1
            results = batch.results
            if results[index] is _PENDING:
                results[index] = value
                batch.left -= 1
                if not batch.left and batch.fut is not None and not batch.fut.done():
                    batch.fut.set_result(None)

    def answer_oldest(self, value: Any) -> int | None:
        seq = self._first()
        if seq is None:
            return None
        batch, index = self._pop(seq)
        batch.give(index, value)
        return seq

    def settle_before(self, seq: int, value: Any = FILTERED_OUT) -> int:
        """Give ``value`` to every request older than ``seq``; how many there were."""
        n = 0
        while True:
            oldest = self._first()
            if oldest is None or oldest >= seq:
                return n
            batch, index = self._pop(oldest)
            batch.give(index, value)
            n += 1

    def forget(self, seq: int) -> None:
        """Its caller gave up: a reply owed to it goes to nobody."""
        if seq in self._by_seq:
            self._pop(seq)

    def fail_all(self, exc: BaseException) -> None:
        """Every waiting request gets ``exc`` as its result (the kernel failed or ended)."""
        waiting = list(zip(self._by_seq.values(), self._index.values(), strict=True))
        self._by_seq.clear()
        self._index.clear()
        self._rid.clear()
        self._by_id.clear()
        self._more.clear()
        self._oldest = self._next
        for batch, index in waiting:
            batch.give(index, exc)


def _message_class(t: Any) -> type | None:
    """``t`` when it is an ``@message`` class with a record layout."""
    if isinstance(t, type) and issubclass(t, RingKernelMessage):
        try:
            record_layout(t)
        except Exception:  # noqa: BLE001 - no layout: not sent as records
            return None
        return t
    return None


class KernelReplies:
    """One kernel's requests from kernel stages and the one task reading its replies."""

    def __init__(
        self, runtime: Any, kernel_id: str, launch: Any, chain: tuple[str, ...] = ()
    ) -> None:
        self.kernel_id = kernel_id
        # A linked chain: requests go to its first kernel, replies come from its last.
        self.chain = chain or (kernel_id,)
        self.reply_from = self.chain[-1]
        self._rt = runtime
        self._launch = launch  # the spec of the launch this was made for
        self._launches = tuple(runtime.get_kernel_spec(k) for k in self.chain[1:])
        handle = runtime.kernel_handle(kernel_id)
        self.backend: str = handle.backend
        spec = runtime.get_kernel_spec(kernel_id)
        specs = [spec, *self._launches]
        in_cls = _message_class(spec.input_type)
        out_cls = _message_class(specs[-1].output_type)
        # Records in one ring operation: compiled kernels between @message types, on
        # this machine (a cluster kernel batches its own way).
        self.records = (
            self.backend in ("cpu", "cuda")
            and in_cls is not None
            and out_cls is not None
            and runtime.get_placement(kernel_id) is None
        )
        self._in_cls = in_cls
        if self.records:
            assert in_cls is not None and out_cls is not None
            self._in = record_layout(in_cls)
            self._out = record_layout(out_cls)
            self._id_at = uuid_offset(self._in.dtype, "message_id")
            self._corr_at = uuid_offset(self._out.dtype, "correlation_id")
        self._handles = tuple(runtime.kernel_handle(k) for k in self.chain)
        # Whether a request consumed without output can be told (see the module text).
        self.tells_drops = self.records and all(
            h.input_position() is not None for h in self._handles
        )
        # Whether replies come in request order: a reply settles the requests before it.
        self.in_order = self.tells_drops and all(
            h.backend == "cuda" or sp.config.workers == 1
            for h, sp in zip(self._handles, specs, strict=True)
        )
        self._waiting = Waiting()
        self._send_lock = asyncio.Lock()
        self._sent = 0  # sequence number of the newest request in the kernel's ring
        # The first kernel's input position once the newest request was placed; None
        # when the kernel could not say (then nothing is settled until it can again).
        self._sent_at: int | None = 0
        self._reader: asyncio.Task[None] | None = None
        # (sent, kernel of the chain, its input position) while waiting for that kernel
        # to be done with its input below that position
        self._mark: tuple[int, int, int] | None = None
        # A request whose handling raised has no reply, yet it was not filtered out.
        runtime.watch_handler_errors(kernel_id, self._raised_on)
        for kid, sp in zip(self.chain[1:], self._launches, strict=True):
            runtime.watch_handler_errors(kid, self._raised_inside(sp.input_type))

    def current(self, runtime: Any) -> bool:
        """Whether this still stands for the kernels launched under its ids."""
        try:
            return runtime.get_kernel_spec(self.kernel_id) is self._launch and all(
                runtime.get_kernel_spec(k) is sp
                for k, sp in zip(self.chain[1:], self._launches, strict=True)
            )
        except Exception:  # noqa: BLE001 - terminated and gone: make a new one
            return False

    # -- requests --------------------------------------------------------------------

    async def request_many(self, values: list[Any], timeout: float | None) -> list[Any]:
        """One result per value: its reply, ``FILTERED_OUT``, or the exception for it."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        batch = Batch(len(values))
        sent: list[int] = []  # sequence numbers of the requests in the kernel's ring
        try:
            async with self._send_lock:
                if self.records:
                    await self._send_records(values, batch, sent, left())
                else:
                    await self._send_each(values, batch, sent, left)
            if batch.left:
                self._start_reader()
                fut = batch.fut = loop.create_future()
                # A timer on the one future, not ``asyncio.wait`` (a set, a second future
                # and callbacks per batch): the wait is the whole per-batch cost here.
                timer = None
                if deadline is not None:
                    timer = loop.call_later(deadline - loop.time(), _expire, fut)
                try:
                    await fut
                finally:
                    if timer is not None:
                        timer.cancel()
        finally:
            if batch.left:  # timed out (or cancelled): late replies go to nobody
                for seq in sent:
                    self._waiting.forget(seq)
                late = QueueTimeoutError(
                    f"no reply from kernel {self.kernel_id!r} within {timeout} s"
                )
                batch.results = [late if r is _PENDING else r for r in batch.results]
        return batch.results

    async def _send_records(
        self, values: list[Any], batch: Batch, sent: list[int], timeout: float | None
    ) -> None:
        cls = self._in_cls
        assert cls is not None
        blob: bytes | None = None
        where: Sequence[int] = range(len(values))
        if set(map(type, values)) == {cls}:
            try:  # the whole batch in one join: every value of the kernel's input type
                blob = b"".join(map(self._in.pack, values))
            except Exception:  # noqa: BLE001 - some value cannot be stored: one by one
                blob = None
        if blob is None:
            blob, where = self._pack_each(values, batch.results)
            if not where:
                return
        size, at = self._in.dtype.itemsize, self._id_at
        rids = [blob[k : k + 16] for k in range(at, len(blob), size)]
        records = np.frombuffer(bytearray(blob), self._in.dtype)
        mine = self._waiting.expect_many(rids, batch, where)
        sent.extend(mine)
        try:
            placed = await self._rt.send_batch(self.kernel_id, records, timeout)
        except Exception as exc:  # noqa: BLE001 - every item of the batch fails with it
            for seq, i in zip(mine, where, strict=True):
                self._waiting.forget(seq)
                batch.give(i, exc)
            return
        for seq, i in zip(mine[placed:], where[placed:], strict=True):
            # A DROP_NEWEST ring kept the older records.
            self._waiting.forget(seq)
            batch.give(
                i, QueueFullError(f"input ring of {self.kernel_id!r} is full: record dropped")
            )
        if placed:
            self._sent = mine[placed - 1]
            if self.tells_drops:
                self._sent_at = self._handles[0].input_position()

    def _pack_each(self, values: list[Any], results: list[Any]) -> tuple[bytes, list[int]]:
        """The records of the values that can be sent, and their indexes; each other
        value's result is why it cannot."""
        cls = self._in_cls
        assert cls is not None
        pack = self._in.to_bytes
        parts: list[bytes] = []
        where: list[int] = []
        for i, v in enumerate(values):
            if not isinstance(v, cls):
                results[i] = TypeError(
                    f"kernel {self.kernel_id!r} takes {cls.__name__}, got {type(v).__name__}"
                )
                continue
            try:
                parts.append(pack(v))
            except Exception as exc:  # noqa: BLE001 - this item's failure
                results[i] = exc
                continue
            where.append(i)
        return b"".join(parts), where

    async def _send_each(self, values: list[Any], batch: Batch, sent: list[int], left: Any) -> None:
        for i, v in enumerate(values):
            mid = getattr(v, "message_id", None)
            seq, _ = self._waiting.expect(mid.bytes if mid is not None else None, Place(batch, i))
            sent.append(seq)
            try:
                await self._rt.send(self.kernel_id, v, left())
            except Exception as exc:  # noqa: BLE001 - this item's failure
                self._waiting.forget(seq)
                batch.give(i, exc)
                continue
            self._sent = seq

    # -- replies ---------------------------------------------------------------------

    def _start_reader(self) -> None:
        if self._reader is None and len(self._waiting):
            self._reader = asyncio.get_running_loop().create_task(
                self._read(), name=f"pydotcompute-kernel-replies-{self.kernel_id}"
            )

    async def _read(self) -> None:
        poll = _SETTLE_POLL_S if self.tells_drops else _READ_POLL_S
        # Replies out of order settle nobody: look now and then while they come, too.
        looks = self.tells_drops and not self.in_order
        loop = asyncio.get_running_loop()
        looked = loop.time()
        try:
            while len(self._waiting):
                try:
                    got = await self._rt.receive_batch(self.reply_from, _BATCH, poll)
                except QueueTimeoutError:
                    got = None
                except Exception as exc:  # noqa: BLE001 - the kernel failed or ended
                    self._waiting.fail_all(exc)
                    return
                if got is not None and len(got):
                    self._route(got)
                    if looks and loop.time() - looked >= _SETTLE_POLL_S:
                        looked = loop.time()
                        await self._settle()
                    continue
                failed = self._inner_failure()
                if failed is not None:
                    self._waiting.fail_all(failed)
                    return
                if self.tells_drops:
                    looked = loop.time()
                    await self._settle()
        finally:
            self._reader = None

    def _route(self, got: Any) -> None:
        waiting = self._waiting
        in_order = self.in_order
        if not self.records:
            for msg in got:
                cid = getattr(msg, "correlation_id", None)
                seq = waiting.answer(cid.bytes, msg) if cid is not None else None
                if seq is None:
                    waiting.answer_oldest(msg)
            return
        size, at = got.dtype.itemsize, self._corr_at
        raw = got.tobytes()
        msgs = list(map(self._out.build, self._out.struct.iter_unpack(raw)))
        rids = [raw[k : k + 16] for k in range(at, len(raw), size)]
        # One worker answers in ring order: the requests before an answered one
        # without a reply were consumed without output.
        waiting.answer_many(rids, msgs, in_order)

    def _inner_failure(self) -> KernelFailedError | None:
        """The error of a kernel of the chain before its last that failed for good (its
        requests will get no reply), or None."""
        for kid in self.chain[:-1]:
            if self._rt.get_kernel_state(kid) is KernelState.FAILED:
                err = self._rt.get_error(kid)
                exc = KernelFailedError(
                    f"kernel {kid!r} of the linked chain {' >> '.join(self.chain)} failed: "
                    f"{type(err).__name__}: {err}",
                    kernel_id=kid,
                )
                exc.__cause__ = err
                return exc
        return None

    def _raised_inside(self, input_type: Any) -> Any:
        """A watcher for a kernel inside the chain: its input carries the request's id."""
        cls = _message_class(input_type)

        def raised(message: Any, error: BaseException) -> None:
            rid: bytes | None = None
            if cls is not None:
                layout = record_layout(cls)
                at = uuid_offset(layout.dtype, "message_id")
                if isinstance(message, np.void):
                    rid = message.tobytes()[at : at + 16]
                elif isinstance(message, cls):
                    rid = layout.to_bytes(message)[at : at + 16]
            if rid is not None:
                self._waiting.answer(rid, error)

        return raised

    def _raised_on(self, message: Any, error: BaseException) -> None:
        """The handler raised on ``message``: its request gets ``error``. Told before
        a restarted kernel handles the requests sent after it, so a later reply never
        settles it as filtered."""
        rid = self._id_of(message)
        if rid is not None:
            self._waiting.answer(rid, error)

    def _id_of(self, message: Any) -> bytes | None:
        """The 16 bytes a request was expected under, read from the message it became."""
        if self.records:
            at = self._id_at
            if isinstance(message, np.void):  # a record that did not decode
                return message.tobytes()[at : at + 16]
            if self._in_cls is not None and isinstance(message, self._in_cls):
                return self._in.to_bytes(message)[at : at + 16]
            return None
        mid = getattr(message, "message_id", None)
        return mid.bytes if mid is not None else None

    async def _settle(self) -> None:
        """Nothing came: once every kernel of the chain is done with what it was sent
        up to the newest request, and the outputs that made are taken and routed, the
        requests sent up to it that have no reply were dropped."""
        if self._mark is None:
            if self._sent == 0 or self._sent_at is None:
                return
            self._mark = (self._sent, 0, self._sent_at)
        upto, j, at = self._mark
        while j < len(self._handles):
            through = self._handles[j].settled_through(at)
            if through is None:  # still in hand: look again
                self._mark = (upto, j, at)
                return
            j, at = j + 1, through  # where kernel j's outputs end: the next one's input
        self._mark = (upto, j, at)
        last = self._handles[-1]
        while True:
            taken = last.outputs_taken()
            if taken is None:
                return  # its outputs go elsewhere now: it cannot say
            if taken >= at:
                break
            try:
                got = await self._rt.receive_batch(self.reply_from, _BATCH, 0)
            except QueueTimeoutError:
                return  # placed but not yet readable (a cuda output not sealed yet)
            except Exception as exc:  # noqa: BLE001 - the kernel failed or ended
                self._waiting.fail_all(exc)
                return
            if not len(got):
                return
            self._route(got)
        self._mark = None
        self._waiting.settle_before(upto + 1)


class KernelReplyTables:
    """The runtime's ``KernelReplies`` per kernel id, attached to it as an extension
    (so two runtimes never share one). At shutdown the tables are let go; their readers
    end on their own once the kernels terminate."""

    NAME = "pydotcompute.kernel-replies"

    def __init__(self) -> None:
        self.by_kernel: dict[str, KernelReplies] = {}

    def close(self) -> None:
        self.by_kernel.clear()


def replies_for(runtime: Any, kernel_id: str, chain: tuple[str, ...] = ()) -> KernelReplies:
    """The kernel's ``KernelReplies`` in ``runtime`` (one per launch, shared by every
    stage that uses the kernel, so each reply reaches the stage that asked); with
    ``chain`` (``kernel_id`` first), those of the linked chain."""
    tables = runtime.extension(KernelReplyTables.NAME)
    if not isinstance(tables, KernelReplyTables):
        tables = KernelReplyTables()
        runtime.attach(KernelReplyTables.NAME, tables)
    key = " >> ".join(chain) if len(chain) > 1 else kernel_id
    kr = tables.by_kernel.get(key)
    if kr is None or not kr.current(runtime):
        kr = KernelReplies(runtime, kernel_id, runtime.get_kernel_spec(kernel_id), chain)
        tables.by_kernel[key] = kr
    return kr
