"""The persistent device loop of the ``cuda`` backend, composed around a user handler.

``compose_loop`` turns ``def handler(msg, out, state) -> bool`` (the same source the
``cpu`` backend runs) into a numba-cuda device function and wraps it in a kernel
that is launched once and runs until the host writes TERMINATE into the control
block. The rings follow ``docs/ring-protocol.md`` version 2: their slots carry tags,
so the read of a slot says whether its record is there.

**One agent polls.** Only warp 0 of block 0 reads host memory while waiting: each
round it reads, in one coalesced read of whole words, the next slots of the input
ring (up to 256 bytes) together with the ring's ``published`` index, and now and then
the control block's state word. Records whose tags seal them, and everything below
``published``, become *available*: the agent advances a word in device memory, and
every block (block 0 included) claims ranges of available positions from it with a
device-scope compare-and-swap. ``blocks`` adds compute, never pollers; idle blocks
other than the agent wait on device memory.

**Whole words, coalesced, staged.** A block copies its claim out of the mapped ring
into shared memory with consecutive threads reading consecutive 8-byte words, every
load issued before any is used; the agent's own poll already holds the first records,
so a single record is handled after a single read across PCIe. The handler reads its
record and writes its output in shared memory; outputs leave the same way, consecutive
threads writing consecutive words of consecutive slots, each with its tag. Each output
starts as the blank header (default priority) with the input's ``message_id`` as its
``correlation_id``, written as whole words too.

**A handler that raises** (only possible under the simulator: on a GPU, launch refuses
a ``raise``) leaves 1 + the position of its record in ``SideWords.FAILED_AT``; its
round releases nothing, so the host reads the record from its slot.

**Outputs in claim order.** After its handlers, a block waits for its *turn* (a word in
device memory that says how far the input has been handled in order), reserves its
output positions, stores the input ring's ``released`` (one ``st.release.sys`` per
batch) and passes the turn on: the turn is held for a few device-memory operations,
not across a copy or a fence (only a full output ring, under BLOCK, makes it wait).
Then it writes its outputs. The output ring is therefore **FIFO with respect to the
input ring**, whatever the number of blocks and threads, and needs no fence: the host
takes an output once its tag seals it. Before releasing, the turn holder stores the
end of its reserved outputs in the control block (``OUT_RESERVED``): once the host
reads a ``released`` that covers an input, the outputs of that input lie below the
``OUT_RESERVED`` it reads next, so having taken outputs that far it has all of them
(how a request the handler dropped is told apart from one whose output is late).

**A chain of handlers** (the coordinator's fused ``cuda`` stages, see ``cuda_fused``)
runs in the same loop: ``compose_chain_loop`` generates a record step that calls the
handlers in order, each inner record in a per-thread scratch of shared memory reset as
whole words; a handler returning False ends the record, and per handler the records
it passed on are counted in shared memory, then in device memory once per round. One
handler is a chain of one.

**Links.** A loop compiled with ``in_link`` reads a *link ring* instead of a ring in
host memory (producer ``DEVICE``, consumer ``LINK``) that another resident kernel,
compiled with ``out_link``, writes its outputs into. The protocol is the same (tagged
slots, ``released`` stored once per batch). Where the ring lives says how its words
are ordered and read: ``LINK_DEVICE``, device memory of the one GPU both kernels run
on (GPU scope: ``ld.relaxed.gpu``, ``st.release.gpu``..., nothing crosses PCIe);
``LINK_PEER``, device memory of the consumer's GPU that the producer's GPU writes
peer to peer; ``LINK_HOST``, mapped pinned host memory both GPUs reach over PCIe
(those two at system scope, since two GPUs order nothing between them at GPU scope).
A consumer whose link is in its own GPU's memory polls a whole claim's worth of
slots each round (reading it is cheap), so it never waits for the producer's
``published``, which is only mirrored.

Counters live in device memory and are mirrored into the control block and the ring
headers by the agent about once a millisecond, and by the last block to exit.

``max_iterations`` > 0 bounds the number of rounds of each block; it exists for the
simulator, which launches synchronously. Below zero it bounds them by
``-max_iterations`` and ends the launch at the first round that found nothing to do
(a *slice*: how the simulator takes turns between kernels). Zero means run until
TERMINATE, or HALT (finish the batch in hand, then exit: the host relaunches the loop
on other rings).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numba import cuda

from pydotcompute.errors import InvalidConfigurationError
from pydotcompute.messages.record import output_header, uuid_offset
from pydotcompute.rings.control import ControlBlock as _Layout
from pydotcompute.rings.device import (
    HEADER_WORDS,
    RING_OK,
    SIMULATOR,
    TAG_WORDS,
    W_BACKPRESSURE,
    W_DEQUEUED,
    W_DROP_BEFORE,
    W_DROPPED_NEWEST,
    W_DROPPED_OLDEST,
    W_ENQUEUED,
    W_HIGH_WATER,
    W_PUBLISHED,
    W_RELEASED,
    global_ns,
    load_acquire_sys,
    load_gpu,
    load_relaxed_gpu,
    load_relaxed_sys,
    pause,
    records_view,
    ring_check,
    seal_words,
    store_gpu,
    store_relaxed_gpu,
    store_relaxed_sys,
    store_release_sys,
)
from pydotcompute.rings.layout import TAG_SIZE

__all__ = [
    "LINK_NONE",
    "LINK_DEVICE",
    "LINK_PEER",
    "LINK_HOST",
    "ControlWords",
    "SideWords",
    "compose_loop",
    "compose_chain_loop",
    "compile_loop",
    "compile_chain_loop",
    "slot_dtype",
    "loop_shape",
    "ERROR_TEXT",
]


LINK_NONE = 0
"""The loop's ring is the kernel's own, in mapped host memory, facing the host."""
LINK_DEVICE = 1
"""A link ring in device memory of the GPU both kernels run on (GPU scope)."""
LINK_PEER = 2
"""A link ring in device memory of the consumer's GPU, written peer to peer."""
LINK_HOST = 3
"""A link ring in mapped pinned host memory, between two GPUs without peer access."""


class ControlWords:
    """Word indices of the control block: the ``rings.control.ControlBlock`` layout
    (one field per 128-byte line), as word indices for device code. The host writes
    ``STATE``; the device writes the rest."""

    STATE = _Layout.STATE // 8
    PROCESSED = _Layout.PROCESSED // 8
    EMITTED = _Layout.EMITTED // 8
    DROPPED = _Layout.DROPPED // 8
    IDLE_POLLS = _Layout.IDLE_POLLS // 8
    ERRORS = _Layout.ERRORS // 8
    HEARTBEAT = _Layout.HEARTBEAT // 8
    ERROR_CODE = _Layout.ERROR_CODE // 8
    OUT_RESERVED = _Layout.OUT_RESERVED // 8
    IN_RELEASED = _Layout.IN_RELEASED // 8
    NWORDS = _Layout.NBYTES // 8

    INACTIVE = _Layout.INACTIVE
    ACTIVE = _Layout.ACTIVE
    TERMINATE = _Layout.TERMINATE
    HALT = _Layout.HALT
    """Finish the batch in hand (waiting for output room, unlike TERMINATE) and exit:
    the host relaunches the kernel on other rings (a link made or ended)."""

    ERR_NONE = _Layout.ERR_NONE
    ERR_HANDLER = _Layout.ERR_HANDLER
    """The handler faulted (a CUDA error on the stream, or an exception in the simulator)."""
    ERR_INPUT_RING = 20
    """Plus a ``RING_BAD_*`` code: the input ring's header is not what was compiled for;
    plus 4: a record below ``published`` never matched its tag."""
    ERR_OUTPUT_RING = 30
    """Plus a ``RING_BAD_*`` code: the same for the output ring."""
    ERR_BLOCK_SIZE = 40
    """Launched with a block size other than the one the loop was compiled for."""


ERR_INPUT_SEAL = ControlWords.ERR_INPUT_RING + 4

ERROR_TEXT = {
    ControlWords.ERR_HANDLER: "the handler faulted",
    ControlWords.ERR_INPUT_RING + 1: "the input ring's header is not a version-2 ring",
    ControlWords.ERR_INPUT_RING + 2: "the input ring's capacity or record size is not "
    "the one the loop was compiled for",
    ControlWords.ERR_INPUT_RING + 3: "the input ring is not host-to-device",
    ERR_INPUT_SEAL: "a record of the input ring never matched its tag (a producer that "
    "does not follow the ring protocol)",
    ControlWords.ERR_OUTPUT_RING + 1: "the output ring's header is not a version-2 ring",
    ControlWords.ERR_OUTPUT_RING + 2: "the output ring's capacity or record size is not "
    "the one the loop was compiled for",
    ControlWords.ERR_OUTPUT_RING + 3: "the output ring is not device-to-host",
    ControlWords.ERR_BLOCK_SIZE: "launched with a block size the loop was not compiled for",
}


class SideWords:
    """Word indices of the kernel's own words (device memory). ``initial`` fills them
    from the rings before a launch (protocol 3.1)."""

    AVAIL = 0  # input positions known complete (the agent advances it)
    CLAIM = 1  # next input position to claim
    IN_DONE = 2  # input handled and released in claim order: the output turn
    OUT_NEXT = 3  # next output position to reserve (the turn holder's)
    OUT_SEEN = 4  # last reading of the output ring's released
    COMMAND = 5  # the host's state word, as the agent last read it
    DROP_BEFORE = 6  # the input ring's drop_before, as the agent last read it
    OUT_DROP_BEFORE = 7  # the output ring's drop_before, as raised by the kernel
    PROCESSED = 8
    EMITTED = 9
    DROPPED = 10
    IDLE_POLLS = 11
    EXITED = 12
    ERROR_CODE = 13
    IN_DEQUEUED = 14
    IN_DROPPED_OLDEST = 15
    OUT_PUBLISHED = 16
    OUT_ENQUEUED = 17
    OUT_DROPPED_NEWEST = 18
    OUT_HIGH_WATER = 19
    MIRRORED_AT = 20
    HEARTBEAT = 21
    FAILED_AT = 22
    """Simulator only: 1 + the input position whose handler raised (0: none)."""
    FAILED_STAGE = 23
    """Simulator only: which handler of a chain raised (its index)."""
    NWORDS = 32
    PASSED = NWORDS
    """A chain of handlers only: from here, per handler, the records it passed on."""

    @classmethod
    def initial(cls, in_ring: Any, out_ring: Any, command: int, stages: int = 1) -> np.ndarray:
        """The words for a launch on these rings (``HostRing`` views of them), with a
        word per handler after ``NWORDS`` for a chain of ``stages`` handlers."""
        w = np.zeros(cls.NWORDS + (stages if stages > 1 else 0), np.int64)
        cls._from_rings(w, in_ring.counters(), out_ring.counters(), command)
        return w

    @classmethod
    def _from_rings(cls, w: np.ndarray, inc: Any, outc: Any, command: int) -> None:
        """Positions and ring counters from the rings' ``RingCounters``."""
        w[cls.AVAIL] = w[cls.CLAIM] = w[cls.IN_DONE] = inc.released
        w[cls.OUT_NEXT] = w[cls.OUT_PUBLISHED] = outc.published
        w[cls.OUT_SEEN] = outc.released
        w[cls.COMMAND] = command
        w[cls.DROP_BEFORE] = inc.drop_before
        w[cls.OUT_DROP_BEFORE] = outc.drop_before
        w[cls.IN_DEQUEUED] = inc.dequeued
        w[cls.IN_DROPPED_OLDEST] = inc.dropped_oldest
        w[cls.OUT_ENQUEUED] = outc.enqueued
        w[cls.OUT_DROPPED_NEWEST] = outc.dropped_newest
        w[cls.OUT_HIGH_WATER] = outc.high_water

    # What a relaunch on other rings carries over: the kernel's own counters.
    _KEPT = (PROCESSED, EMITTED, DROPPED, IDLE_POLLS, HEARTBEAT)

    @classmethod
    def rebased(
        cls, old: np.ndarray, in_counters: Any, out_counters: Any, command: int
    ) -> np.ndarray:
        """The words for a relaunch of a loop that exited with ``old`` on rings whose
        counters (``RingCounters``) are these: positions from the rings, the kernel's
        counters (and a chain's per-handler ones) carried over."""
        w = np.zeros_like(old)
        cls._from_rings(w, in_counters, out_counters, command)
        for i in cls._KEPT:
            w[i] = old[i]
        w[cls.NWORDS :] = old[cls.NWORDS :]
        return w


# Plain ints for device code (numba cannot read class attributes there).
_C_ACTIVE = ControlWords.ACTIVE
_C_DROPPED = ControlWords.DROPPED
_C_EMITTED = ControlWords.EMITTED
_C_ERROR_CODE = ControlWords.ERROR_CODE
_C_ERR_BLOCK_SIZE = ControlWords.ERR_BLOCK_SIZE
_C_ERR_INPUT_RING = ControlWords.ERR_INPUT_RING
_C_ERR_OUTPUT_RING = ControlWords.ERR_OUTPUT_RING
_C_HEARTBEAT = ControlWords.HEARTBEAT
_C_IDLE_POLLS = ControlWords.IDLE_POLLS
_C_PROCESSED = ControlWords.PROCESSED
_C_STATE = ControlWords.STATE
_C_TERMINATE = ControlWords.TERMINATE
_C_HALT = ControlWords.HALT
_C_OUT_RESERVED = ControlWords.OUT_RESERVED
_C_IN_RELEASED = ControlWords.IN_RELEASED
_S_AVAIL = SideWords.AVAIL
_S_CLAIM = SideWords.CLAIM
_S_IN_DONE = SideWords.IN_DONE
_S_OUT_NEXT = SideWords.OUT_NEXT
_S_OUT_SEEN = SideWords.OUT_SEEN
_S_COMMAND = SideWords.COMMAND
_S_DROP_BEFORE = SideWords.DROP_BEFORE
_S_OUT_DROP_BEFORE = SideWords.OUT_DROP_BEFORE
_S_PROCESSED = SideWords.PROCESSED
_S_EMITTED = SideWords.EMITTED
_S_DROPPED = SideWords.DROPPED
_S_IDLE_POLLS = SideWords.IDLE_POLLS
_S_EXITED = SideWords.EXITED
_S_ERROR_CODE = SideWords.ERROR_CODE
_S_IN_DEQUEUED = SideWords.IN_DEQUEUED
_S_IN_DROPPED_OLDEST = SideWords.IN_DROPPED_OLDEST
_S_OUT_PUBLISHED = SideWords.OUT_PUBLISHED
_S_OUT_ENQUEUED = SideWords.OUT_ENQUEUED
_S_OUT_DROPPED_NEWEST = SideWords.OUT_DROPPED_NEWEST
_S_OUT_HIGH_WATER = SideWords.OUT_HIGH_WATER
_S_MIRRORED_AT = SideWords.MIRRORED_AT
_S_HEARTBEAT = SideWords.HEARTBEAT
_S_FAILED_AT = SideWords.FAILED_AT
_S_FAILED_STAGE = SideWords.FAILED_STAGE
_S_PASSED = SideWords.PASSED
_BLOCK = 0
_DROP_OLDEST = 2
_DROP_NEWEST = 3
_MIRROR_PERIOD_NS = 1_000_000  # counters reach the host about once a millisecond
_SPIN_ROUNDS = 64  # idle polls without a pause (each is a PCIe round trip, ~1 us)
_FIRST_SLEEP_NS = 256
_WORKER_FIRST_SLEEP_NS = 32
_PAUSED_SLEEP_NS = 100_000  # a paused agent polls rarely: reactivation may take 0.1 ms
_STATE_EVERY = 8  # a busy agent reads the state word every 8th round
_OUT_WAIT_POLLS = 4096  # DROP_OLDEST output: polls waiting for the host to skip stale
_SEAL_RETRIES = 1000  # re-reads of a record below `published` before it is an error
_WINDOW_WORDS = 32  # the agent's poll: 256 bytes of slots
_STAGING_BYTES = 40 * 1024  # shared memory for staged records, inputs and outputs
_POLL_LANES = 32


def blank_slot(in_dtype: np.dtype, out_dtype: np.dtype) -> np.ndarray:
    """The words every output slot starts as before its handler runs: the blank output
    record of ``messages.record.output_header`` (zeros but for the default priority)
    after a zero tag."""
    blank, _, _ = output_header(in_dtype, out_dtype)
    words = np.zeros(slot_dtype(out_dtype).itemsize // 8, np.int64)
    words.view(np.uint8)[TAG_SIZE : TAG_SIZE + out_dtype.itemsize] = blank.view(np.uint8)
    return words


def uuid_copy(src_byte: int, dst_byte: int, blank: np.ndarray) -> Any:
    """A device function ``copy(src, s, dst, d)``: the 16 bytes at byte ``src_byte`` of
    the words ``src[s:]`` into byte ``dst_byte`` of the words ``dst[d:]``, moved as
    8-byte words, shifted and merged where the field is not word-aligned (records are
    little-endian on both sides). A record's ``correlation_id`` usually is not: it
    follows the one-byte ``priority``. The bytes the field shares its words with are
    taken from ``blank`` (the words ``dst`` starts as), never read back from ``dst``:
    a read-modify-write of a word lets the compiler narrow it to a byte access."""
    sw, ss = src_byte // 8, (src_byte % 8) * 8
    dw, ds = dst_byte // 8, (dst_byte % 8) * 8
    # Constants that fit an int64 (a larger one would type as uint64).
    low_src = (1 << (64 - ss)) - 1 if ss else -1  # the bits a right shift by ss keeps
    low_dst = (1 << ds) - 1 if ds else -1  # the bits a right shift by 64 - ds keeps
    below = int(blank[dw]) & low_dst if ds else 0  # blank bytes before the field
    above = int(blank[dw + 2]) & ~low_dst if ds else 0  # and after it

    def copy(src, s, dst, d):  # type: ignore[no-untyped-def]
        s += sw
        d += dw
        if ss == 0:
            lo = src[s]
            hi = src[s + 1]
        else:
            lo = ((src[s] >> ss) & low_src) | (src[s + 1] << (64 - ss))
            hi = ((src[s + 1] >> ss) & low_src) | (src[s + 2] << (64 - ss))
        if ds == 0:
            dst[d] = lo
            dst[d + 1] = hi
        else:
            dst[d] = below | (lo << ds)
            dst[d + 1] = ((lo >> (64 - ds)) & low_dst) | (hi << ds)
            dst[d + 2] = above | ((hi >> (64 - ds)) & low_dst)

    return cuda.jit(device=True)(copy)


def _apart(a: int, b: int) -> bool:
    """Whether 16-byte fields at bytes ``a`` and ``b`` of a record share no 8-byte word
    of its slot (each copy writes whole words, taking the rest of them from the blank)."""
    if b < 0:
        return True
    words_a = range((TAG_SIZE + a) // 8, (TAG_SIZE + a + 15) // 8 + 1)
    return not set(words_a) & set(range((TAG_SIZE + b) // 8, (TAG_SIZE + b + 15) // 8 + 1))


def slot_dtype(dtype: np.dtype) -> np.dtype:
    """The record dtype as it sits in a slot of a crossing ring: its fields after the
    8-byte tag, the whole slot a multiple of 8 bytes; field names and types unchanged.
    A handler's ``msg`` and ``out`` are records of this dtype."""
    size = TAG_SIZE + ((dtype.itemsize + 7) & ~7)
    fields: dict[str, Any] = dict(dtype.fields or {})
    names = list(dtype.names or ())
    return np.dtype(
        {
            "names": names,
            "formats": [fields[n][0] for n in names],
            "offsets": [TAG_SIZE + fields[n][1] for n in names],
            "itemsize": size,
        }
    )


def loop_shape(
    in_dtype: np.dtype, out_dtype: np.dtype, threads: int, items: int, scratch_bytes: int = 0
) -> int:
    """Records a block takes per round: ``threads * items``, as many as fit the block's
    staging in shared memory (less ``scratch_bytes``, a chain's inner records). Raises
    for records too large to stage at all."""
    per_slot = slot_dtype(in_dtype).itemsize + slot_dtype(out_dtype).itemsize + 8
    fits = (_STAGING_BYTES - scratch_bytes) // per_slot
    if fits < 1:
        raise InvalidConfigurationError(
            f"records of {in_dtype.itemsize} and {out_dtype.itemsize} bytes"
            + (f" and {scratch_bytes} bytes of inner records" if scratch_bytes else "")
            + f" do not fit the cuda loop's {_STAGING_BYTES} bytes of staging in shared memory"
        )
    return max(1, min(threads * items, fits))


# The record step of a chain of handlers, generated per chain length: each handler
# reads the record the one before wrote (inner records sit in a per-thread scratch of
# shared memory, reset to their blank slot as whole words) and a handler returning
# False ends the record. It returns how many handlers passed the record on.
_CHAIN_STEP = """\
    for w in range(SW{j}):
        scratch[s + AT{j} + w] = ZERO{j}[w]
    if CORRELATE{j}:
        corr{j}(stage_in, in_at, scratch, s + AT{j})
    x{j} = view{j}(scratch[s + AT{j} : s + AT{j} + SW{j}])[0]
"""


def chain_step_source(n: int) -> str:
    """The Python source of the record step of a chain of ``n`` handlers."""
    lines = ["def step(msg, out, states, scratch, s, stage_in, in_at, side, position):\n"]
    for j in range(n):
        src = "msg" if j == 0 else f"x{j}"
        if j < n - 1:
            lines.append(_CHAIN_STEP.format(j=j + 1))
            dst = f"x{j + 1}"
        else:
            dst = "out"
        st = "states" if n == 1 else f"states[{j}]"
        lines.append(f"    if not h{j}({src}, {dst}, {st}, side, position):\n")
        lines.append(f"        return {j}\n")
    lines.append(f"    return {n}\n")
    return "".join(lines)


def _chain_step(
    handlers: Sequence[Callable[..., Any]], dtypes: Sequence[np.dtype]
) -> tuple[Any, int]:
    """(The record step of the chain as a device function, the words of scratch each
    thread needs for the inner records.) ``dtypes`` are the chain's record types, the
    first input to the last output."""
    n = len(handlers)
    ns: dict[str, Any] = {}
    at = 0
    first = dtypes[0]
    for j in range(1, n):
        inner = dtypes[j]
        zero = blank_slot(first, inner)
        _, id_at, corr_at = output_header(first, inner)
        ns[f"SW{j}"] = slot_dtype(inner).itemsize // 8
        ns[f"AT{j}"] = at
        ns[f"ZERO{j}"] = zero
        ns[f"CORRELATE{j}"] = id_at >= 0
        ns[f"corr{j}"] = uuid_copy(TAG_SIZE + max(id_at, 0), TAG_SIZE + max(corr_at, 0), zero)
        ns[f"view{j}"] = records_view(slot_dtype(inner))
        at += ns[f"SW{j}"]
    for j, h in enumerate(handlers):
        ns[f"h{j}"] = _device_handler(h, j)
    exec(compile(chain_step_source(n), "<cuda chain step>", "exec"), ns)  # noqa: S102 - our own template
    return cuda.jit(device=True)(ns["step"]), at


def _device_handler(handler: Callable[..., Any], stage: int) -> Any:
    """``handler`` as a device function of ``(msg, out, state, side, position)``; under
    the simulator (plain Python) a handler that raises notes for the host which record
    and which handler of a chain it was. The round that raised never releases its
    claim, so the record stays in its slot."""
    device = cuda.jit(device=True)(handler)
    if not SIMULATOR:

        def on_gpu(msg, out, state, side, position):  # type: ignore[no-untyped-def]
            return device(msg, out, state)

        return cuda.jit(device=True)(on_gpu)

    def simulated(msg: Any, out: Any, state: Any, side: Any, position: int) -> Any:
        try:
            return device(msg, out, state)
        except BaseException:
            side[_S_FAILED_STAGE] = stage
            side[_S_FAILED_AT] = position + 1
            raise

    return simulated


def compose_loop(
    handler: Callable[..., Any],
    in_dtype: np.dtype,
    out_dtype: np.dtype,
    threads: int,
    items: int,
    idle_sleep_ns: int,
    in_link: int = LINK_NONE,
    out_link: int = LINK_NONE,
) -> Any:
    """The persistent kernel around ``handler`` (a Python function), not yet compiled.

    Arguments of the kernel: ``in_words``/``out_words`` (int64 views of the whole ring
    buffers, in mapped host memory), ``ctrl`` (int64 control block, mapped), ``side``
    (``SideWords``, device memory), ``state`` (the handler's state array, device memory)
    and ``max_iterations``. ``in_link``/``out_link``: that ring is a link ring instead,
    where ``LINK_DEVICE``/``LINK_PEER``/``LINK_HOST`` say (see the module's docstring).
    """
    return compose_chain_loop(
        (handler,), (in_dtype, out_dtype), threads, items, idle_sleep_ns, in_link, out_link
    )


def compose_chain_loop(
    handlers: Sequence[Callable[..., Any]],
    dtypes: Sequence[np.dtype],
    threads: int,
    items: int,
    idle_sleep_ns: int,
    in_link: int = LINK_NONE,
    out_link: int = LINK_NONE,
) -> Any:
    """The persistent kernel around a chain of handlers called in order for each record
    (one handler: ``compose_loop``), not yet compiled. ``dtypes`` are the record types
    from the first handler's input to the last one's output; the kernel's ``state`` is
    then a tuple of the handlers' state arrays, and ``side`` has a word per handler
    after ``SideWords.NWORDS`` (records it passed on)."""
    if len(dtypes) != len(handlers) + 1:
        raise ValueError("a chain of n handlers has n + 1 record types")
    in_dtype, out_dtype = dtypes[0], dtypes[-1]
    nstages = len(handlers)
    chained = nstages > 1
    step, chain_sw = _chain_step(handlers, dtypes)
    on_gpu = not SIMULATOR

    # Every output starts as ``out_zero``, the blank slot (default priority: see
    # messages.record's output_header), a constant array, so its loads are ld.const
    # and never plain global loads; the input's message_id becomes the output's
    # correlation_id where both records have those fields. Both as whole words.
    out_zero = blank_slot(in_dtype, out_dtype)
    _, id_at, corr_at = output_header(in_dtype, out_dtype)
    correlate = id_at >= 0
    correlation = uuid_copy(TAG_SIZE + max(id_at, 0), TAG_SIZE + max(corr_at, 0), out_zero)
    # Feeding a link, an output keeps its input's message_id as its own, so the far
    # kernel's output correlates with the message that entered the linked chain.
    out_id_at = uuid_offset(out_dtype, "message_id")
    carry = out_link != LINK_NONE and id_at >= 0 and out_id_at >= 0
    if carry and not _apart(out_id_at, corr_at):
        raise InvalidConfigurationError(
            "the output record's message_id and correlation_id share an 8-byte word"
        )
    carry_id = uuid_copy(TAG_SIZE + max(id_at, 0), TAG_SIZE + max(out_id_at, 0), out_zero)
    in_slot, out_slot = slot_dtype(in_dtype), slot_dtype(out_dtype)
    in_view, out_view = records_view(in_slot), records_view(out_slot)
    in_rs, out_rs = in_dtype.itemsize, out_dtype.itemsize
    in_sw, out_sw = in_slot.itemsize // 8, out_slot.itemsize // 8
    nthreads = threads
    per_round = loop_shape(in_dtype, out_dtype, threads, items, threads * chain_sw * 8)
    scratch_words = max(1, threads * chain_sw)
    items_t = (per_round + threads - 1) // threads  # records per thread and round
    lanes = min(_POLL_LANES, threads)
    # A link ring is in device memory: the agent's poll may cover a whole claim.
    local = in_link in (LINK_DEVICE, LINK_PEER)
    win_slots = per_round if local else max(1, min(_WINDOW_WORDS // in_sw, per_round))
    win_words = win_slots * in_sw
    win_per_lane = (win_words + lanes - 1) // lanes
    in_per_thread = (per_round * in_sw + threads - 1) // threads
    out_per_thread = (per_round * out_sw + threads - 1) // threads
    stage_in_words = per_round * in_sw
    stage_out_words = per_round * out_sw
    max_sleep = idle_sleep_ns
    lane_drop = 1 % lanes
    lane_state = 2 % lanes
    # Sides the rings' headers must declare, and the scope of their words.
    in_sides = (1, 2) if in_link != LINK_NONE else (0, 1)
    out_sides = (1, 2) if out_link != LINK_NONE else (1, 0)
    in_load = load_relaxed_gpu if in_link == LINK_DEVICE else load_relaxed_sys
    in_acquire = load_gpu if in_link == LINK_DEVICE else load_acquire_sys
    in_release = store_gpu if in_link == LINK_DEVICE else store_release_sys
    out_store = store_relaxed_gpu if out_link == LINK_DEVICE else store_relaxed_sys

    def ring_loop(in_words, out_words, ctrl, side, state, max_iterations):  # type: ignore[no-untyped-def]
        tid = cuda.threadIdx.x
        lead = tid == 0
        agent = cuda.blockIdx.x == 0
        # Orders the leader gives its block, and what the agent's lanes read:
        # 0 action (<0 exit, 0 nothing, >0 claimed count), 1 first position, 2 stale,
        # 3 use the poll window, 4 output position, 5 outputs placed now, 6 last chunk,
        # 7 a seal failed, 8 published, 9 drop_before, 10 state word, 11 sealed in the
        # window, 12 window start, 13 read the state word this round
        sh = cuda.shared.array(16, np.int64)
        stage_in = cuda.shared.array(stage_in_words, np.int64)
        stage_out = cuda.shared.array(stage_out_words, np.int64)
        flags = cuda.shared.array(per_round, np.int32)
        emit_src = cuda.shared.array(per_round, np.int32)
        scan = cuda.shared.array(nthreads, np.int32)
        win_ok = cuda.shared.array(win_slots, np.int32)
        held = cuda.local.array(in_per_thread, np.int64)
        held_out = cuda.local.array(out_per_thread, np.int64)
        held_win = cuda.local.array(win_per_lane, np.int64)
        scratch = cuda.shared.array(scratch_words, np.int64)  # a chain's inner records
        passed_sh = cuda.shared.array(nstages, np.int64)  # per handler: passed this round
        passed = cuda.local.array(nstages, np.int64)
        in_recs = in_view(stage_in)
        out_recs = out_view(stage_out)
        in_cap = (in_words.shape[0] - HEADER_WORDS) // in_sw
        out_cap = (out_words.shape[0] - HEADER_WORDS) // out_sw
        in_mask = in_cap - 1
        out_mask = out_cap - 1
        if lead:
            code = 0
            if cuda.blockDim.x != nthreads:
                code = _C_ERR_BLOCK_SIZE
            else:
                chk = ring_check(in_words, in_cap, in_rs, in_sw * 8, in_sides[0], in_sides[1])
                if chk != RING_OK:
                    code = _C_ERR_INPUT_RING + chk
                else:
                    chk = ring_check(
                        out_words, out_cap, out_rs, out_sw * 8, out_sides[0], out_sides[1]
                    )
                    if chk != RING_OK:
                        code = _C_ERR_OUTPUT_RING + chk
            sh[0] = code
            if code != 0:
                store_gpu(side, _S_ERROR_CODE, code)
                store_release_sys(ctrl, _C_ERROR_CODE, code)
            else:
                sh[14] = load_relaxed_sys(out_words, W_BACKPRESSURE)
                sh[15] = load_relaxed_sys(in_words, W_BACKPRESSURE)
        cuda.syncthreads()
        k = -1 if sh[0] != 0 else 0
        out_strategy = sh[14]
        in_drop_oldest = sh[15] == _DROP_OLDEST
        cuda.syncthreads()
        idle = 0
        sleep = 0
        iteration = 0
        while k >= 0:
            base = 0
            k0 = 0
            # -- 1. the agent polls: warp 0 reads the next slots and the indices
            if agent:
                if lead:
                    sh[12] = load_gpu(side, _S_AVAIL)
                    sh[13] = 1 if (iteration % _STATE_EVERY == 0 or idle > 0) else 0
                cuda.syncthreads()
                base = sh[12]
                if tid < lanes:
                    for j in range(win_per_lane):  # every load issued before any use
                        i = tid + j * lanes
                        if i < win_words:
                            s = i // in_sw
                            at = HEADER_WORDS + ((base + s) & in_mask) * in_sw + (i - s * in_sw)
                            held_win[j] = in_load(in_words, at)
                    if tid == 0:
                        sh[8] = in_acquire(in_words, W_PUBLISHED)
                    if tid == lane_drop and in_drop_oldest:
                        sh[9] = in_acquire(in_words, W_DROP_BEFORE)
                    if tid == lane_state and sh[13] != 0:
                        sh[10] = load_acquire_sys(ctrl, _C_STATE)
                    for j in range(win_per_lane):
                        i = tid + j * lanes
                        if i < win_words:
                            stage_in[i] = held_win[j]
                cuda.syncthreads()
                i = tid
                while i < win_slots:
                    at = i * in_sw
                    ok = stage_in[at] == seal_words(stage_in, at + TAG_WORDS, in_rs, base + i)
                    win_ok[i] = 1 if ok else 0
                    i += nthreads
                cuda.syncthreads()
                if lead:
                    while k0 < win_slots and win_ok[k0] != 0:
                        k0 += 1
                    sh[11] = k0
                    avail = base + k0
                    if sh[8] > avail:
                        avail = sh[8]
                    if avail > base:
                        store_gpu(side, _S_AVAIL, avail)
                    if sh[13] != 0 and sh[10] != load_gpu(side, _S_COMMAND):
                        store_gpu(side, _S_COMMAND, sh[10])
                    if in_drop_oldest and sh[9] > load_gpu(side, _S_DROP_BEFORE):
                        store_gpu(side, _S_DROP_BEFORE, sh[9])
            # -- 2. the leader claims available positions for its block
            if lead:
                command = load_gpu(side, _S_COMMAND)
                k = 0
                c = 0
                stale = 0
                if (
                    command == _C_TERMINATE
                    or command == _C_HALT
                    or (max_iterations > 0 and iteration >= max_iterations)
                    or (max_iterations < 0 and (iteration >= -max_iterations or idle > 0))
                    or load_gpu(side, _S_ERROR_CODE) != 0
                ):
                    k = -1
                else:
                    c = load_gpu(side, _S_CLAIM)
                    while True:
                        limit = load_gpu(side, _S_AVAIL)
                        dropped = load_gpu(side, _S_DROP_BEFORE)
                        if command != _C_ACTIVE and dropped < limit:
                            limit = dropped  # paused: only discard what is stale
                        avail = limit - c
                        if avail <= 0:
                            break
                        k = per_round if avail > per_round else avail
                        old = cuda.atomic.cas(side, _S_CLAIM, c, c + k)
                        if old == c:
                            stale = dropped - c
                            if stale < 0:
                                stale = 0
                            if stale > k:
                                stale = k
                            break
                        c = old
                        k = 0
                if k == 0:
                    if agent and command == _C_ACTIVE:
                        cuda.atomic.add(side, _S_IDLE_POLLS, 1)
                    idle += 1
                    limit_ns = max_sleep if command == _C_ACTIVE else _PAUSED_SLEEP_NS
                    if not agent:
                        sleep = _WORKER_FIRST_SLEEP_NS if sleep == 0 else sleep * 2
                    elif idle > _SPIN_ROUNDS or command != _C_ACTIVE:
                        sleep = _FIRST_SLEEP_NS if sleep == 0 else sleep * 2
                    if sleep > limit_ns:
                        sleep = limit_ns
                elif k > 0:
                    idle = 0
                    sleep = 0
                sh[0] = k
                sh[1] = c
                sh[2] = stale
                sh[3] = 1 if (agent and c == base and stale == 0 and k <= k0) else 0
                sh[7] = 0
                if chained:
                    for j in range(nstages):
                        passed_sh[j] = 0
            cuda.syncthreads()
            k = sh[0]
            c = sh[1]
            stale = sh[2]
            use_window = sh[3]
            # Everyone has read this round's orders before the leader writes the next.
            cuda.syncthreads()
            if k > 0:
                n = k - stale
                first = c + stale
                # -- 3. stage the claim in shared memory, as whole coalesced words
                tries = 0
                while n > 0:
                    if use_window == 0:
                        words = n * in_sw
                        for j in range(in_per_thread):  # every load issued before any use
                            i = tid + j * nthreads
                            if i < words:
                                s = i // in_sw
                                at = HEADER_WORDS + ((first + s) & in_mask) * in_sw
                                held[j] = in_load(in_words, at + i - s * in_sw)
                        for j in range(in_per_thread):
                            i = tid + j * nthreads
                            if i < words:
                                stage_in[i] = held[j]
                        cuda.syncthreads()
                        i = tid
                        while i < n:
                            at = i * in_sw
                            if stage_in[at] != seal_words(
                                stage_in, at + TAG_WORDS, in_rs, first + i
                            ):
                                sh[7] = 1
                            i += nthreads
                    cuda.syncthreads()
                    if sh[7] == 0:
                        break
                    # Below `published` (or sealed before): it must seal when read again.
                    tries += 1
                    cuda.syncthreads()
                    if lead:
                        sh[7] = 0
                        if tries >= _SEAL_RETRIES:
                            store_gpu(side, _S_ERROR_CODE, ERR_INPUT_SEAL)
                            store_release_sys(ctrl, _C_ERROR_CODE, ERR_INPUT_SEAL)
                    cuda.syncthreads()
                    if tries >= _SEAL_RETRIES:
                        n = 0  # nothing unverified reaches a handler; the loop exits
                        break
                    use_window = 0
                # -- 4. the handlers: thread t takes records t*items_t .. +items_t-1
                count = 0
                if chained:
                    for j in range(nstages):
                        passed[j] = 0
                for j in range(items_t):
                    i = tid * items_t + j
                    emit = 0
                    if i < n:
                        at = i * out_sw
                        for w in range(out_sw):
                            stage_out[at + w] = out_zero[w]
                        if correlate:
                            correlation(stage_in, i * in_sw, stage_out, at)
                        if carry:
                            carry_id(stage_in, i * in_sw, stage_out, at)
                        reached = step(
                            in_recs[i], out_recs[i], state, scratch, tid * chain_sw,
                            stage_in, i * in_sw, side, first + i,
                        )  # fmt: skip
                        if reached == nstages:
                            emit = 1
                        if chained:
                            for h in range(nstages):
                                if h < reached:
                                    passed[h] += 1
                    if i < per_round:
                        flags[i] = emit
                    count += emit
                if chained:
                    for h in range(nstages):
                        if passed[h] != 0:
                            cuda.atomic.add(passed_sh, h, passed[h])
                # Block-wide inclusive prefix sum of the counts (Hillis-Steele): thread
                # tid's outputs take places scan[tid] - count .. scan[tid] - 1.
                scan[tid] = count
                cuda.syncthreads()
                if not on_gpu and side[_S_FAILED_AT] != 0:
                    # Simulator: a handler raised and its thread is gone; the others
                    # leave without releasing the round (the launch raises its error).
                    return
                d = 1
                while d < nthreads:
                    v = scan[tid - d] if tid >= d else 0
                    cuda.syncthreads()
                    scan[tid] += v
                    cuda.syncthreads()
                    d *= 2
                place = scan[tid] - count
                m = scan[nthreads - 1]
                for j in range(items_t):
                    i = tid * items_t + j
                    if i < n and flags[i] != 0:
                        emit_src[place] = i
                        place += 1
                cuda.syncthreads()
                # -- 5. in claim order: reserve outputs, release inputs, pass the turn
                done = 0
                lost_total = 0
                r = 0
                fit = 0
                while True:
                    if lead:
                        if done == 0:
                            wait = 0
                            while load_gpu(side, _S_IN_DONE) != c:
                                wait = 1024 if wait >= 512 else wait * 2 + 32
                                pause(wait)
                        r = load_gpu(side, _S_OUT_NEXT)
                        fit, lost = output_fit(
                            out_words, ctrl, side, r, m - done, out_cap, out_strategy
                        )
                        store_gpu(side, _S_OUT_NEXT, r + fit)
                        final = 1 if done + fit + lost >= m else 0
                        if lost > 0:
                            which = _S_DROPPED if out_strategy == _BLOCK else _S_OUT_DROPPED_NEWEST
                            cuda.atomic.add(side, which, lost)
                        if final:
                            # Where the outputs of the input released so far end: before
                            # the release, which makes it visible with it (the host's
                            # test that dropped records are done, see cuda.py).
                            store_relaxed_sys(ctrl, _C_OUT_RESERVED, r + fit)
                            # The batch's reads are done: one release store for it.
                            in_release(in_words, W_RELEASED, c + k)
                            if in_link != LINK_NONE:  # the host cannot read a link's
                                store_release_sys(ctrl, _C_IN_RELEASED, c + k)
                            store_gpu(side, _S_IN_DONE, c + k)  # the next claim's turn
                        sh[4] = r
                        sh[5] = fit
                        sh[6] = final + 2 * lost
                    cuda.syncthreads()
                    r = sh[4]
                    fit = sh[5]
                    final = sh[6] & 1
                    lost = sh[6] >> 1
                    # each output's tag, then every word of the outputs, coalesced
                    i = tid
                    while i < fit:
                        at = emit_src[done + i] * out_sw
                        stage_out[at] = seal_words(stage_out, at + TAG_WORDS, out_rs, r + i)
                        i += nthreads
                    cuda.syncthreads()
                    words = fit * out_sw
                    for j in range(out_per_thread):  # every shared load before a store
                        i = tid + j * nthreads
                        if i < words:
                            s = i // out_sw
                            held_out[j] = stage_out[emit_src[done + s] * out_sw + i - s * out_sw]
                    for j in range(out_per_thread):
                        i = tid + j * nthreads
                        if i < words:
                            s = i // out_sw
                            at = HEADER_WORDS + ((r + s) & out_mask) * out_sw + i - s * out_sw
                            out_store(out_words, at, held_out[j])
                    done += fit + lost
                    lost_total += lost
                    cuda.syncthreads()
                    if final:
                        break
                if lead:
                    placed = m - lost_total
                    cuda.atomic.add(side, _S_PROCESSED, n)
                    cuda.atomic.add(side, _S_IN_DEQUEUED, n)
                    cuda.atomic.add(side, _S_IN_DROPPED_OLDEST, stale)
                    cuda.atomic.add(side, _S_EMITTED, placed)
                    cuda.atomic.add(side, _S_OUT_ENQUEUED, placed)
                    cuda.atomic.add(side, _S_OUT_PUBLISHED, placed)
                    if placed > 0:  # the depth this block can vouch for
                        depth = r + fit - load_gpu(side, _S_OUT_SEEN)
                        cuda.atomic.max(side, _S_OUT_HIGH_WATER, depth)
                    if chained:
                        for h in range(nstages):
                            cuda.atomic.add(side, _S_PASSED + h, passed_sh[h])
            if lead:
                if agent:
                    store_gpu(side, _S_HEARTBEAT, iteration + 1)
                    now = global_ns()
                    if now - load_gpu(side, _S_MIRRORED_AT) >= _MIRROR_PERIOD_NS:
                        store_gpu(side, _S_MIRRORED_AT, now)
                        mirror(in_words, out_words, ctrl, side)
                if k == 0 and sleep > 0:
                    pause(sleep)
            iteration += 1
        # -- exit: the last block out mirrors every counter once more
        if lead:
            gone = cuda.atomic.add(side, _S_EXITED, 1) + 1
            if gone == cuda.gridDim.x:
                mirror(in_words, out_words, ctrl, side)

    return ring_loop


@cuda.jit(device=True)
def mirror(in_words, out_words, ctrl, side):  # type: ignore[no-untyped-def]
    """The kernel's counters into the control block and the ring headers (plain
    stores: they are advisory, and each has one writer at a time)."""
    store_relaxed_sys(ctrl, _C_PROCESSED, load_gpu(side, _S_PROCESSED))
    store_relaxed_sys(ctrl, _C_EMITTED, load_gpu(side, _S_EMITTED))
    store_relaxed_sys(ctrl, _C_DROPPED, load_gpu(side, _S_DROPPED))
    store_relaxed_sys(ctrl, _C_IDLE_POLLS, load_gpu(side, _S_IDLE_POLLS))
    store_relaxed_sys(ctrl, _C_HEARTBEAT, load_gpu(side, _S_HEARTBEAT))
    store_relaxed_sys(in_words, W_DEQUEUED, load_gpu(side, _S_IN_DEQUEUED))
    store_relaxed_sys(in_words, W_DROPPED_OLDEST, load_gpu(side, _S_IN_DROPPED_OLDEST))
    store_relaxed_sys(out_words, W_PUBLISHED, load_gpu(side, _S_OUT_PUBLISHED))
    store_relaxed_sys(out_words, W_ENQUEUED, load_gpu(side, _S_OUT_ENQUEUED))
    store_relaxed_sys(out_words, W_DROPPED_NEWEST, load_gpu(side, _S_OUT_DROPPED_NEWEST))
    store_relaxed_sys(out_words, W_HIGH_WATER, load_gpu(side, _S_OUT_HIGH_WATER))


@cuda.jit(device=True)
def output_fit(out_words, ctrl, side, r, want, cap, strategy):  # type: ignore[no-untyped-def]
    """(The caller holds the turn; the words it reads were written by earlier turn
    holders on other multiprocessors, hence device-scope loads, never L1-cached ones.)

    How many of ``want`` outputs to place at position ``r`` now, and how many to
    give up: ``(fit, lost)``. Room is judged from the kernel's last reading of the
    output ring's ``released``, read again only when that looks short. BLOCK waits for
    room (gives up only on TERMINATE, read from the host's own word: the agent may be
    the block waiting here); DROP_NEWEST drops what does not fit; DROP_OLDEST raises
    the ``drop_before`` watermark so the host skips stale outputs (6.3.2), waits a
    bounded number of polls, then drops the rest as newest. Places what fits when
    some room is free."""
    polls = 0
    seen = load_gpu(side, _S_OUT_SEEN)
    while True:
        room = cap - (r - seen)
        if room < want:
            fresh = load_acquire_sys(out_words, W_RELEASED)
            if fresh > seen:
                seen = fresh
                store_gpu(side, _S_OUT_SEEN, seen)
            room = cap - (r - seen)
        if room >= want:
            return want, 0
        if strategy == _DROP_NEWEST:
            return room, want - room
        if room > 0:
            return room, 0
        if load_acquire_sys(ctrl, _C_STATE) == _C_TERMINATE or (
            strategy == _DROP_OLDEST and polls >= _OUT_WAIT_POLLS
        ):
            return 0, want
        if strategy == _DROP_OLDEST:
            mark = r + (want if want < cap else cap) - cap
            if mark > load_gpu(side, _S_OUT_DROP_BEFORE):
                store_gpu(side, _S_OUT_DROP_BEFORE, mark)
                store_release_sys(out_words, W_DROP_BEFORE, mark)
        polls += 1
        pause(1024)


# One compiled loop per kernel type: (handler, record dtypes, state type, block size,
# back-off). A kernel type launched many times compiles once. Weak keys: a handler
# that goes away takes its compiled code with it.
_LOOPS: weakref.WeakKeyDictionary[Callable[..., Any], dict[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)
_LOOPS_LOCK = threading.Lock()


def _composing() -> Any:
    """What composing device code holds: nothing on a GPU; under the simulator, the
    launch lock (no simulated kernel runs meanwhile: see ``SimulatedDevice.launching``)."""
    if not SIMULATOR:
        return contextlib.nullcontext()
    from pydotcompute.backends.cuda_simulated import SimulatedDevice

    return SimulatedDevice.launching


def compile_loop(
    handler: Callable[..., Any],
    in_dtype: np.dtype,
    out_dtype: np.dtype,
    state: np.ndarray,
    threads: int,
    items: int,
    idle_sleep_ns: int,
    in_link: int = LINK_NONE,
    out_link: int = LINK_NONE,
) -> Any:
    """The persistent kernel for this handler and these types, compiled once (cached).

    On a GPU the kernel is compiled here for its one signature; under the simulator
    there is nothing to compile. Raises numba's typing error when the handler does
    not compile for these record dtypes."""
    py = getattr(handler, "py_func", handler)
    key: tuple[Any, ...] = (in_dtype, out_dtype, state.dtype, state.ndim, threads, items)
    key += (idle_sleep_ns, in_link, out_link)
    with _LOOPS_LOCK, _composing():
        per_handler = _LOOPS.setdefault(py, {})
        kernel = per_handler.get(key)
        if kernel is None:
            kernel = cuda.jit(
                compose_loop(
                    py, in_dtype, out_dtype, threads, items, idle_sleep_ns, in_link, out_link
                )
            )
            if not SIMULATOR:
                kernel.compile(loop_signature(in_dtype, out_dtype, state))
            per_handler[key] = kernel
    return kernel


def loop_signature(
    in_dtype: np.dtype, out_dtype: np.dtype, state: np.ndarray | tuple[np.ndarray, ...]
) -> tuple[Any, ...]:
    """Argument types of the composed kernel (see ``compose_loop``); for a chain,
    ``state`` is the tuple of its handlers' state arrays."""
    from numba import typeof, types

    def array_t(a: np.ndarray) -> Any:
        return types.Array(typeof(a).dtype, a.ndim, "C")

    words = types.int64[::1]
    if isinstance(state, tuple):
        state_t = types.Tuple([array_t(a) for a in state])
    else:
        state_t = array_t(state)
    return (words, words, words, words, state_t, types.int64)


# One compiled loop per chain: (handlers, record dtypes, state types, block size,
# back-off). Keyed by the handlers themselves, as the cpu backend's fused loops are.
_CHAINS: dict[tuple[Any, ...], Any] = {}


def compile_chain_loop(
    handlers: Sequence[Callable[..., Any]],
    dtypes: Sequence[np.dtype],
    states: tuple[np.ndarray, ...],
    threads: int,
    items: int,
    idle_sleep_ns: int,
    in_link: int = LINK_NONE,
    out_link: int = LINK_NONE,
) -> Any:
    """The persistent kernel for a chain of handlers (see ``compose_chain_loop``),
    compiled once per chain and types (cached)."""
    pys = tuple(getattr(h, "py_func", h) for h in handlers)
    key = (
        pys,
        tuple(dtypes),
        tuple((a.dtype, a.ndim) for a in states),
        threads,
        items,
        idle_sleep_ns,
        in_link,
        out_link,
    )
    with _LOOPS_LOCK, _composing():
        kernel = _CHAINS.get(key)
        if kernel is None:
            kernel = cuda.jit(
                compose_chain_loop(pys, dtypes, threads, items, idle_sleep_ns, in_link, out_link)
            )
            if not SIMULATOR:
                kernel.compile(loop_signature(dtypes[0], dtypes[-1], states))
            _CHAINS[key] = kernel
    return kernel
