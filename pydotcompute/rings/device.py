"""Device-side ring operations (``docs/ring-protocol.md``) for numba-cuda kernels.

Every function here is a ``cuda.jit(device=True)`` function or an intrinsic meant to
be called from device code; nothing runs on the host. Ring headers and control
blocks are handed to device code as ``int64`` arrays of 8-byte words (word ``i`` is
byte offset ``8 * i``), the slots as record arrays.

Memory ordering on a GPU (sm_70 or newer):

- ``load_sys(words, i)`` is ``ld.acquire.sys``: a real load every time (the compiler
  can neither cache it in a register nor hoist it out of a polling loop, and the
  hardware does not serve it from a stale L1 line), ordered before every later
  read of the thread. It is how the device polls an index the host writes.
- ``publish_sys(words, i, v)`` is ``fence.sc.sys`` (``cuda.threadfence_system()``)
  then ``st.relaxed.sys``: every write the thread has observed, including slot
  writes of other threads of its block made visible to it by ``syncthreads()``
  (fences are cumulative), reaches the host before the index does.
- ``load_gpu``/``store_gpu`` are the device-scope counterparts for words in device
  memory that blocks of one kernel hand to each other (the release turn).

Inline PTX is used rather than ``cuda.ldcv`` because a ``.cv`` load is only a cache
hint on a weak load: it forces a fresh fetch but orders nothing after it.

Under the numba-cuda simulator (``NUMBA_ENABLE_CUDASIM=1``) device code is plain
Python run by threads that share the GIL, so the same names are defined as plain
loads and stores (an aligned numpy element access is atomic under the GIL, and the
simulator has no fences to emit) and ``nanosleep`` sleeps with ``time.sleep``,
which also lets the host thread run.
"""

from __future__ import annotations

import time

import numpy as np
from numba import cuda, types

from pydotcompute.rings.layout import (
    HEADER_SIZE,
    OFF_BACKPRESSURE,
    OFF_CAPACITY,
    OFF_CONSUMER_SIDE,
    OFF_DEQUEUED,
    OFF_DROP_BEFORE,
    OFF_DROPPED_NEWEST,
    OFF_DROPPED_OLDEST,
    OFF_ENQUEUED,
    OFF_HEADER_SIZE,
    OFF_HIGH_WATER,
    OFF_MAGIC,
    OFF_PRODUCER_SIDE,
    OFF_PUBLISHED,
    OFF_RECORD_SIZE,
    OFF_RELEASED,
    OFF_SLOT_SIZE,
    OFF_VERSION,
    RING_MAGIC,
    RING_VERSION,
)

__all__ = [
    "SIMULATOR",
    "HEADER_WORDS",
    "load_sys",
    "publish_sys",
    "store_sys",
    "load_gpu",
    "store_gpu",
    "pause",
    "ring_check",
    "ring_claim",
    "ring_stale",
    "ring_room",
    "ring_release",
    "ring_publish",
    "RING_OK",
    "RING_BAD_MAGIC",
    "RING_BAD_SHAPE",
    "RING_BAD_SIDES",
]


def _simulator() -> bool:
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


SIMULATOR = _simulator()
"""True when numba-cuda runs its CPU simulator instead of a GPU."""

HEADER_WORDS = HEADER_SIZE // 8

# Word indices of the header fields (byte offset / 8).
W_MAGIC = OFF_MAGIC // 8
W_VERSION = OFF_VERSION // 8
W_HEADER_SIZE = OFF_HEADER_SIZE // 8
W_CAPACITY = OFF_CAPACITY // 8
W_SLOT_SIZE = OFF_SLOT_SIZE // 8
W_RECORD_SIZE = OFF_RECORD_SIZE // 8
W_BACKPRESSURE = OFF_BACKPRESSURE // 8
W_PRODUCER_SIDE = OFF_PRODUCER_SIDE // 8
W_CONSUMER_SIDE = OFF_CONSUMER_SIDE // 8
W_PUBLISHED = OFF_PUBLISHED // 8
W_RELEASED = OFF_RELEASED // 8
W_ENQUEUED = OFF_ENQUEUED // 8
W_DROPPED_NEWEST = OFF_DROPPED_NEWEST // 8
W_HIGH_WATER = OFF_HIGH_WATER // 8
W_DEQUEUED = OFF_DEQUEUED // 8
W_DROPPED_OLDEST = OFF_DROPPED_OLDEST // 8
W_DROP_BEFORE = OFF_DROP_BEFORE // 8

# The magic as a signed 64-bit value, as an int64 word holds it.
MAGIC_I64 = RING_MAGIC - (1 << 64) if RING_MAGIC >= 1 << 63 else RING_MAGIC

RING_OK = 0
RING_BAD_MAGIC = 1
"""The buffer is not a ring of this protocol version (magic, version, header size)."""
RING_BAD_SHAPE = 2
"""Capacity, slot size or record size differ from what the kernel was compiled for."""
RING_BAD_SIDES = 3
"""The ring's producer/consumer sides are not the ones the kernel expects."""

_device = cuda.jit(device=True)

if SIMULATOR:

    @_device
    def load_sys(words, i):  # type: ignore[no-untyped-def]
        """Acquire load of a word the other side writes."""
        return words[i]

    @_device
    def store_sys(words, i, value):  # type: ignore[no-untyped-def]
        """System-scope store of a word the host reads (no ordering of its own)."""
        words[i] = value

    @_device
    def load_gpu(words, i):  # type: ignore[no-untyped-def]
        """Acquire load (device scope) of a word in device memory."""
        return words[i]

    @_device
    def store_gpu(words, i, value):  # type: ignore[no-untyped-def]
        """Release store (device scope) of a word in device memory."""
        words[i] = value

    @_device
    def pause(ns):  # type: ignore[no-untyped-def]
        """Back off for about ``ns`` nanoseconds."""
        time.sleep(ns * 1e-9)

else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    _I64 = ir.IntType(64)

    def _word_ptr(context, builder, arrty, arr, index):  # type: ignore[no-untyped-def]
        data = context.make_array(arrty)(context, builder, arr).data
        base = builder.ptrtoint(data, _I64)
        addr = builder.add(base, builder.mul(index, ir.Constant(_I64, 8)))
        return addr

    def _loader(asm):  # type: ignore[no-untyped-def]
        def typer(typingctx, words, index):  # type: ignore[no-untyped-def]
            sig = types.int64(words, types.int64)

            def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
                addr = _word_ptr(context, builder, signature.args[0], args[0], args[1])
                fnty = ir.FunctionType(_I64, [_I64])
                # The memory clobber keeps LLVM from moving other accesses across it.
                op = ir.InlineAsm(fnty, asm, "=l,l,~{memory}", side_effect=True)
                return builder.call(op, [addr])

            return sig, codegen

        return intrinsic(typer)

    def _storer(asm):  # type: ignore[no-untyped-def]
        def typer(typingctx, words, index, value):  # type: ignore[no-untyped-def]
            sig = types.void(words, types.int64, types.int64)

            def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
                addr = _word_ptr(context, builder, signature.args[0], args[0], args[1])
                fnty = ir.FunctionType(ir.VoidType(), [_I64, _I64])
                op = ir.InlineAsm(fnty, asm, "l,l,~{memory}", side_effect=True)
                builder.call(op, [addr, args[2]])
                return context.get_dummy_value()

            return sig, codegen

        return intrinsic(typer)

    load_sys = _loader("ld.acquire.sys.b64 $0, [$1];")
    store_sys = _storer("st.relaxed.sys.b64 [$0], $1;")
    load_gpu = _loader("ld.acquire.gpu.b64 $0, [$1];")
    store_gpu = _storer("st.release.gpu.b64 [$0], $1;")

    @_device
    def pause(ns):  # type: ignore[no-untyped-def]
        """Back off for about ``ns`` nanoseconds (``nanosleep``, sm_70+)."""
        cuda.nanosleep(np.uint32(ns))


@_device
def publish_sys(words, i, value):  # type: ignore[no-untyped-def]
    """Store an index the host polls, after everything written before it."""
    cuda.threadfence_system()
    store_sys(words, i, value)


@_device
def ring_check(hdr, capacity, record_size, slot_size, producer_side, consumer_side):  # type: ignore[no-untyped-def]
    """Validate a ring header against what the kernel was compiled for (§2)."""
    if (
        load_sys(hdr, W_MAGIC) != MAGIC_I64
        or hdr[W_VERSION] != RING_VERSION
        or hdr[W_HEADER_SIZE] != HEADER_SIZE
    ):
        return RING_BAD_MAGIC
    if (
        hdr[W_CAPACITY] != capacity
        or hdr[W_RECORD_SIZE] != record_size
        or hdr[W_SLOT_SIZE] != slot_size
    ):
        return RING_BAD_SHAPE
    if hdr[W_PRODUCER_SIDE] != producer_side or hdr[W_CONSUMER_SIDE] != consumer_side:
        return RING_BAD_SIDES
    return RING_OK


@_device
def ring_stale(hdr, c, k):  # type: ignore[no-untyped-def]
    """How many of the claimed positions ``c .. c+k-1`` lie below ``drop_before``."""
    s = load_sys(hdr, W_DROP_BEFORE) - c
    if s < 0:
        return 0
    if s > k:
        return k
    return s


@_device
def ring_claim(hdr, side, w_claim, n, stale_only):  # type: ignore[no-untyped-def]
    """Claim up to ``n`` published positions of a ring the device consumes (§4.2).

    The claim counter is word ``w_claim`` of ``side``, in device memory, taken with
    device-scope compare-and-swap; the shared header is only read. With
    ``stale_only`` only positions below ``drop_before`` are taken (a paused consumer
    still discards what the producer marked stale). Returns ``(c, k)``."""
    c = cuda.atomic.add(side, w_claim, 0)
    while True:
        avail = load_sys(hdr, W_PUBLISHED) - c
        if stale_only:
            below = load_sys(hdr, W_DROP_BEFORE) - c
            if below < avail:
                avail = below
        if avail <= 0:
            return c, 0
        k = n if n < avail else avail
        old = cuda.atomic.cas(side, w_claim, c, c + k)
        if old == c:
            return c, k
        c = old


@_device
def ring_release(hdr, side, w_released, c, k, stale, fenced):  # type: ignore[no-untyped-def]
    """Release ``c .. c+k-1`` after their reads (§4.2); the caller holds the turn.

    ``side[w_released]`` shadows ``released`` in device memory and ``side[w_released
    + 1]``, ``side[w_released + 2]`` the consumer counters, so no word of host memory
    is ever read back or read-modify-written. ``fenced``: the caller has executed a
    system fence after the reads already (e.g. ``ring_publish`` of the outputs), so
    the release needs none of its own."""
    dequeued = side[w_released + 1] + (k - stale)
    dropped = side[w_released + 2] + stale
    side[w_released + 1] = dequeued
    side[w_released + 2] = dropped
    store_sys(hdr, W_DEQUEUED, dequeued)
    store_sys(hdr, W_DROPPED_OLDEST, dropped)
    if fenced:
        store_sys(hdr, W_RELEASED, c + k)
    else:
        publish_sys(hdr, W_RELEASED, c + k)
    # Pass the turn: device-scope release, after the host-visible release above.
    cuda.threadfence()
    store_gpu(side, w_released, c + k)


@_device
def ring_room(hdr, published, capacity):  # type: ignore[no-untyped-def]
    """Free slots of a ring the device produces into, ``published`` being its own
    (device-shadowed) index."""
    return capacity - (published - load_sys(hdr, W_RELEASED))


@_device
def ring_publish(hdr, side, w_published, r, k, dropped):  # type: ignore[no-untyped-def]
    """Publish ``r .. r+k-1`` after their slot writes (§4.1) and count ``dropped``
    records that did not fit; the caller holds the turn.

    ``side[w_published]`` shadows ``published`` in device memory; ``side[w_published +
    1 .. + 3]`` shadow ``enqueued``, ``dropped_newest`` and ``high_water``."""
    if k > 0:
        publish_sys(hdr, W_PUBLISHED, r + k)
        enq = side[w_published + 1] + k
        side[w_published + 1] = enq
        store_sys(hdr, W_ENQUEUED, enq)
        depth = r + k - load_sys(hdr, W_RELEASED)
        if depth > side[w_published + 3]:
            side[w_published + 3] = depth
            store_sys(hdr, W_HIGH_WATER, depth)
        store_gpu(side, w_published, r + k)
    if dropped > 0:
        dn = side[w_published + 2] + dropped
        side[w_published + 2] = dn
        store_sys(hdr, W_DROPPED_NEWEST, dn)
