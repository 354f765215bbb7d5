"""Device-side ring operations (``docs/ring-protocol.md``, version 2) for numba-cuda.

Everything here is a ``cuda.jit(device=True)`` function or an intrinsic meant to be
called from device code; nothing runs on the host. Ring buffers and control blocks
are handed to device code as ``int64`` arrays of 8-byte words (word ``i`` is byte
offset ``8 * i``): the header is words 0-127, slot ``s`` of a ring starts at word
``128 + s * slot_words``, its tag first on a crossing ring.

Memory operations on a GPU (sm_70 or newer), all on whole 8-byte words:

- ``load_relaxed_sys`` (``ld.relaxed.sys.b64``): a real load every time, neither
  cached in a register nor served from a stale L1 line, ordered with nothing. How
  the device reads slots the host writes: any order, all loads issued before use,
  the seal (protocol 4.4) says whether what came back is a record.
- ``load_acquire_sys`` (``ld.acquire.sys.b64``): an index of the host's (`published`,
  `released` when room is short, the state word), ordered before later reads.
- ``store_relaxed_sys`` (``st.relaxed.sys.b64``): slot words and tags the host reads
  (it checks seals, so no order is needed) and mirrored counters.
- ``store_release_sys`` (``st.release.sys.b64``): ``released`` of the input ring,
  once per batch, after the batch's reads.
- ``load_gpu``/``store_gpu`` (``ld.acquire.gpu``/``st.release.gpu``): words in
  device memory that blocks of one kernel hand to each other, and the indices of a
  link ring (device memory, between two kernels of one GPU).
- ``load_relaxed_gpu``/``store_relaxed_gpu`` (``ld.relaxed.gpu``/``st.relaxed.gpu``):
  the slots of a link ring, as the ``sys`` pair for a ring in host memory; GPU scope
  is enough there, and the words never cross PCIe.

Inline PTX is used rather than ``cuda.ldcv`` because a ``.cv`` load is only a cache
hint on a weak load: it forces a fresh fetch but orders nothing after it.

Under the numba-cuda simulator (``NUMBA_ENABLE_CUDASIM=1``) device code is plain
Python run by threads that share the GIL, so the same names are defined as plain
loads and stores (an aligned numpy element access is atomic under the GIL, and the
simulator has no fences to emit) and ``pause`` sleeps with ``time.sleep``, which
also lets the host thread run.
"""

from __future__ import annotations

import time
from typing import Any

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
    OFF_RECORD_OFFSET,
    OFF_RECORD_SIZE,
    OFF_RELEASED,
    OFF_SLOT_SIZE,
    OFF_VERSION,
    RING_MAGIC,
    RING_VERSION,
    TAG_SIZE,
)

__all__ = [
    "SIMULATOR",
    "HEADER_WORDS",
    "load_relaxed_sys",
    "load_acquire_sys",
    "store_relaxed_sys",
    "store_release_sys",
    "load_gpu",
    "store_gpu",
    "load_relaxed_gpu",
    "store_relaxed_gpu",
    "pause",
    "global_ns",
    "seal_words",
    "ring_check",
    "records_view",
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
W_RECORD_OFFSET = OFF_RECORD_OFFSET // 8
W_PUBLISHED = OFF_PUBLISHED // 8
W_RELEASED = OFF_RELEASED // 8
W_ENQUEUED = OFF_ENQUEUED // 8
W_DROPPED_NEWEST = OFF_DROPPED_NEWEST // 8
W_HIGH_WATER = OFF_HIGH_WATER // 8
W_DEQUEUED = OFF_DEQUEUED // 8
W_DROPPED_OLDEST = OFF_DROPPED_OLDEST // 8
W_DROP_BEFORE = OFF_DROP_BEFORE // 8
TAG_WORDS = TAG_SIZE // 8

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
    def load_relaxed_sys(words, i):  # type: ignore[no-untyped-def]
        """A word the other side writes, whole, unordered."""
        return words[i]

    @_device
    def load_acquire_sys(words, i):  # type: ignore[no-untyped-def]
        """Acquire load of a word the other side writes."""
        return words[i]

    @_device
    def store_relaxed_sys(words, i, value):  # type: ignore[no-untyped-def]
        """A word the host reads, whole, unordered."""
        words[i] = value

    @_device
    def store_release_sys(words, i, value):  # type: ignore[no-untyped-def]
        """Release store of a word the host reads (after everything before it)."""
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
    def load_relaxed_gpu(words, i):  # type: ignore[no-untyped-def]
        """A word another kernel writes, whole, unordered (device memory)."""
        return words[i]

    @_device
    def store_relaxed_gpu(words, i, value):  # type: ignore[no-untyped-def]
        """A word another kernel reads, whole, unordered (device memory)."""
        words[i] = value

    @_device
    def pause(ns):  # type: ignore[no-untyped-def]
        """Back off for about ``ns`` nanoseconds."""
        time.sleep(ns * 1e-9)

    @_device
    def global_ns():  # type: ignore[no-untyped-def]
        """A nanosecond clock shared by the whole device (``%globaltimer``)."""
        return time.monotonic_ns()

else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    _I64 = ir.IntType(64)

    def _word_ptr(context, builder, arrty, arr, index):  # type: ignore[no-untyped-def]
        data = context.make_array(arrty)(context, builder, arr).data
        base = builder.ptrtoint(data, _I64)
        return builder.add(base, builder.mul(index, ir.Constant(_I64, 8)))

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

    load_relaxed_sys = _loader("ld.relaxed.sys.b64 $0, [$1];")
    load_acquire_sys = _loader("ld.acquire.sys.b64 $0, [$1];")
    store_relaxed_sys = _storer("st.relaxed.sys.b64 [$0], $1;")
    store_release_sys = _storer("st.release.sys.b64 [$0], $1;")
    load_gpu = _loader("ld.acquire.gpu.b64 $0, [$1];")
    store_gpu = _storer("st.release.gpu.b64 [$0], $1;")
    load_relaxed_gpu = _loader("ld.relaxed.gpu.b64 $0, [$1];")
    store_relaxed_gpu = _storer("st.relaxed.gpu.b64 [$0], $1;")

    @intrinsic
    def _globaltimer(typingctx):  # type: ignore[no-untyped-def]
        sig = types.int64()

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            fnty = ir.FunctionType(_I64, [])
            op = ir.InlineAsm(fnty, "mov.u64 $0, %globaltimer;", "=l", side_effect=True)
            return builder.call(op, [])

        return sig, codegen

    @_device
    def pause(ns):  # type: ignore[no-untyped-def]
        """Back off for about ``ns`` nanoseconds (``nanosleep``, sm_70+)."""
        cuda.nanosleep(np.uint32(ns))

    @_device
    def global_ns():  # type: ignore[no-untyped-def]
        """A nanosecond clock shared by the whole device (``%globaltimer``)."""
        return _globaltimer()


# seal() of protocol 4.4: splitmix64's constants.
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xBF58476D1CE4E5B9)
_K3 = np.uint64(0x94D049BB133111EB)
_S29 = np.uint64(29)
_S32 = np.uint64(32)
_ONE = np.uint64(1)


if SIMULATOR:
    _M64 = (1 << 64) - 1

    @_device
    def seal_words(words, start, rs, pos):  # type: ignore[no-untyped-def]
        """The tag of position ``pos`` whose ``rs`` record bytes are the words from
        index ``start`` of ``words`` (Python integers here: numpy warns on the
        wrap-around the seal is made of)."""
        h = ((int(pos) + 1) * 0x9E3779B97F4A7C15) & _M64
        for j in range((rs + 7) >> 3):
            x = int(words[start + j]) & _M64
            if 8 * j + 8 > rs:
                x &= (1 << (8 * (rs - 8 * j))) - 1
            h = ((h ^ x) * 0xBF58476D1CE4E5B9) & _M64
            h ^= h >> 32
        h = ((h ^ (h >> 29)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 32
        return h - (1 << 64) if h >= 1 << 63 else h

else:

    @_device
    def seal_words(words, start, rs, pos):  # type: ignore[no-untyped-def]
        """The tag of position ``pos`` whose ``rs`` record bytes are the words from
        index ``start`` of ``words`` (any int64 array: shared memory, typically)."""
        return _seal_words(words, start, rs, pos)


@_device
def _seal_words(words, start, rs, pos):  # type: ignore[no-untyped-def]
    h = np.uint64(pos + 1) * _K1
    full = rs >> 3
    for j in range(full):
        h = (h ^ np.uint64(words[start + j])) * _K2
        h ^= h >> _S32
    tail = rs & 7
    if tail:
        last = np.uint64(words[start + full]) & ((_ONE << np.uint64(8 * tail)) - _ONE)
        h = (h ^ last) * _K2
        h ^= h >> _S32
    h = (h ^ (h >> _S29)) * _K3
    return np.int64(h ^ (h >> _S32))


@_device
def ring_check(hdr, capacity, record_size, slot_size, producer_side, consumer_side):  # type: ignore[no-untyped-def]
    """Validate a ring header against what the kernel was compiled for (§2)."""
    if (
        load_acquire_sys(hdr, W_MAGIC) != MAGIC_I64
        or load_relaxed_sys(hdr, W_VERSION) != RING_VERSION
        or load_relaxed_sys(hdr, W_HEADER_SIZE) != HEADER_SIZE
    ):
        return RING_BAD_MAGIC
    if (
        load_relaxed_sys(hdr, W_CAPACITY) != capacity
        or load_relaxed_sys(hdr, W_RECORD_SIZE) != record_size
        or load_relaxed_sys(hdr, W_SLOT_SIZE) != slot_size
    ):
        return RING_BAD_SHAPE
    if (
        load_relaxed_sys(hdr, W_PRODUCER_SIDE) != producer_side
        or load_relaxed_sys(hdr, W_CONSUMER_SIDE) != consumer_side
        or load_relaxed_sys(hdr, W_RECORD_OFFSET)
        != (TAG_SIZE if producer_side != consumer_side else 0)
    ):
        return RING_BAD_SIDES
    return RING_OK


def records_view(dtype: np.dtype) -> Any:
    """A device function ``view(words) -> records``: the 1-d array of ``dtype``
    records over the same memory as the int64 array ``words`` (shared memory, say),
    so a handler reads and writes records where the block staged their words."""
    if SIMULATOR:

        def numpy_view(words):  # type: ignore[no-untyped-def]
            return words.view(dtype).view(np.recarray)

        return numpy_view

    from numba import from_dtype
    from numba.cuda.extending import intrinsic

    rec = from_dtype(dtype)
    itemsize = dtype.itemsize

    @intrinsic
    def view(typingctx, words):  # type: ignore[no-untyped-def]
        if not isinstance(words, types.Array) or words.dtype != types.int64 or words.ndim != 1:
            return None
        ret = types.Array(rec, 1, "C")
        sig = ret(words)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            src = context.make_array(signature.args[0])(context, builder, args[0])
            dst = context.make_array(signature.return_type)(context, builder)
            size = context.get_constant(types.intp, itemsize)
            count = builder.udiv(builder.mul(src.nitems, context.get_constant(types.intp, 8)), size)
            context.populate_array(
                dst,
                data=builder.bitcast(src.data, dst.data.type),
                shape=[count],
                strides=[size],
                itemsize=size,
                meminfo=None,
            )
            return dst._getvalue()

        return sig, codegen

    return view
