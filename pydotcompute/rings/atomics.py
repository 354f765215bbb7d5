"""LLVM atomics, raw copies and CPU back-off for Numba ``nopython`` code.

Every function takes an array and a *byte* offset into it, so the ring code can
address header fields of any buffer (a plain numpy array, pinned or mapped memory)
without creating views. The loads and stores are real LLVM atomic instructions:
the compiler may neither tear them nor hoist them out of a polling loop.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

__all__ = [
    "load_acquire",
    "store_release",
    "cas",
    "fetch_add",
    "exchange",
    "fence_seq_cst",
    "copy_bytes",
    "zero_bytes",
    "load_word",
    "store_word",
    "load_byte",
    "store_byte",
    "cpu_pause",
    "cpu_yield",
    "sleep_us",
    "monotonic_ns",
    "fd_write",
    "fd_read",
]

_I64 = ir.IntType(64)
_I8P = ir.IntType(8).as_pointer()


def _check_array(arr: types.Type) -> None:
    if not isinstance(arr, types.Array):
        raise TypeError(f"expected a numpy array, got {arr}")


def _addr(context, builder, arrty, arr, offset):  # type: ignore[no-untyped-def]
    """Address of byte ``offset`` inside ``arr`` as an ``i64*``."""
    data = context.make_array(arrty)(context, builder, arr).data
    base = builder.ptrtoint(data, _I64)
    return builder.inttoptr(builder.add(base, offset), _I64.as_pointer())


def _byte_ptr(context, builder, arrty, arr, offset):  # type: ignore[no-untyped-def]
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(builder.bitcast(data, _I8P), [offset])


@intrinsic
def load_acquire(typingctx, arr, offset):  # type: ignore[no-untyped-def]
    """Atomic 64-bit load with acquire order of the word at byte ``offset``."""
    _check_array(arr)
    sig = types.int64(arr, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = _addr(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def store_release(typingctx, arr, offset, value):  # type: ignore[no-untyped-def]
    """Atomic 64-bit store with release order."""
    _check_array(arr)
    sig = types.void(arr, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = _addr(context, builder, signature.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def cas(typingctx, arr, offset, expected, desired):  # type: ignore[no-untyped-def]
    """Compare-and-swap (acq_rel on success, acquire on failure); True when it swapped."""
    _check_array(arr)
    sig = types.boolean(arr, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = _addr(context, builder, signature.args[0], args[0], args[1])
        pair = builder.cmpxchg(ptr, args[2], args[3], "acq_rel", "acquire")
        return builder.extract_value(pair, 1)

    return sig, codegen


@intrinsic
def fetch_add(typingctx, arr, offset, value):  # type: ignore[no-untyped-def]
    """Atomic add (monotonic order: counters only); returns the previous value."""
    _check_array(arr)
    sig = types.int64(arr, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = _addr(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "monotonic")

    return sig, codegen


@intrinsic
def exchange(typingctx, arr, offset, value):  # type: ignore[no-untyped-def]
    """Atomic exchange (sequentially consistent: a full barrier); returns the old value."""
    _check_array(arr)
    sig = types.int64(arr, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = _addr(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("xchg", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def fence_seq_cst(typingctx):  # type: ignore[no-untyped-def]
    """A full memory barrier: no load after it is performed before a store before it
    (``mfence`` on x86). The StoreLoad order a sleep/wake handshake needs."""
    sig = types.void()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_bytes(typingctx, dst, dst_offset, src, src_offset, nbytes):  # type: ignore[no-untyped-def]
    """memcpy ``nbytes`` from byte ``src_offset`` of ``src`` to ``dst_offset`` of ``dst``.
    Bounds are the caller's job."""
    _check_array(dst)
    _check_array(src)
    sig = types.void(dst, types.int64, src, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        d = _byte_ptr(context, builder, signature.args[0], args[0], args[1])
        s = _byte_ptr(context, builder, signature.args[2], args[2], args[3])
        cgutils.raw_memcpy(builder, d, s, args[4], 1)
        return context.get_dummy_value()

    return sig, codegen


def _plain_store(width: int):  # type: ignore[no-untyped-def]
    ty = ir.IntType(width)

    def typer(typingctx, arr, offset, value):  # type: ignore[no-untyped-def]
        _check_array(arr)
        sig = types.void(arr, types.int64, types.int64)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            ptr = builder.bitcast(
                _byte_ptr(context, builder, signature.args[0], args[0], args[1]), ty.as_pointer()
            )
            builder.store(builder.trunc(args[2], ty) if width < 64 else args[2], ptr, align=1)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _plain_load(width: int):  # type: ignore[no-untyped-def]
    ty = ir.IntType(width)

    def typer(typingctx, arr, offset):  # type: ignore[no-untyped-def]
        _check_array(arr)
        sig = types.int64(arr, types.int64)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            ptr = builder.bitcast(
                _byte_ptr(context, builder, signature.args[0], args[0], args[1]), ty.as_pointer()
            )
            value = builder.load(ptr, align=1)
            return builder.zext(value, _I64) if width < 64 else value

        return sig, codegen

    return intrinsic(typer)


load_word = _plain_load(64)
load_word.__doc__ = """The 8 bytes at byte ``offset`` as an int64, any alignment, no ordering."""
store_word = _plain_store(64)
store_word.__doc__ = """Store an int64 as 8 bytes at byte ``offset``, any alignment, no ordering."""
load_byte = _plain_load(8)
load_byte.__doc__ = """The byte at byte ``offset`` (0-255)."""
store_byte = _plain_store(8)
store_byte.__doc__ = """Store the low byte of a value at byte ``offset``."""


@intrinsic
def zero_bytes(typingctx, dst, dst_offset, nbytes):  # type: ignore[no-untyped-def]
    """memset ``nbytes`` of ``dst`` from byte ``dst_offset`` to zero."""
    _check_array(dst)
    sig = types.void(dst, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        d = _byte_ptr(context, builder, signature.args[0], args[0], args[1])
        cgutils.memset(builder, d, args[2], 0)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def cpu_pause(typingctx):  # type: ignore[no-untyped-def]
    """A spin-wait hint (``pause`` on x86) that frees the core's pipeline for a moment."""
    sig = types.void()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            fnty = ir.FunctionType(ir.VoidType(), [])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


def _libc_call(builder, name, args, argtys):  # type: ignore[no-untyped-def]
    fnty = ir.FunctionType(ir.IntType(32), argtys)
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, args)


@intrinsic
def cpu_yield(typingctx):  # type: ignore[no-untyped-def]
    """Give the CPU to another runnable thread (``sched_yield``)."""
    sig = types.void()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        _libc_call(builder, "sched_yield", [], [])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def sleep_us(typingctx, micros):  # type: ignore[no-untyped-def]
    """Sleep for about ``micros`` microseconds (``usleep``); call it without the GIL."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32 = ir.IntType(32)
        _libc_call(builder, "usleep", [builder.trunc(args[0], i32)], [i32])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def monotonic_ns(typingctx):  # type: ignore[no-untyped-def]
    """``CLOCK_MONOTONIC`` in nanoseconds (``clock_gettime``), for bounded spins."""
    sig = types.int64()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ts_t = ir.LiteralStructType([_I64, _I64])  # struct timespec on LP64
        ts = cgutils.alloca_once(builder, ts_t)
        i32 = ir.IntType(32)
        _libc_call(builder, "clock_gettime", [ir.Constant(i32, 1), ts], [i32, ts_t.as_pointer()])
        sec = builder.load(cgutils.gep_inbounds(builder, ts, 0, 0))
        nsec = builder.load(cgutils.gep_inbounds(builder, ts, 0, 1))
        return builder.add(builder.mul(sec, ir.Constant(_I64, 1_000_000_000)), nsec)

    return sig, codegen


def _fd_io(name: str):  # type: ignore[no-untyped-def]
    def typer(typingctx, fd, arr, offset, nbytes):  # type: ignore[no-untyped-def]
        _check_array(arr)
        sig = types.int64(types.int64, arr, types.int64, types.int64)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            ptr = _byte_ptr(context, builder, signature.args[1], args[1], args[2])
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(_I64, [i32, _I8P, _I64])
            fn = cgutils.get_or_insert_function(builder.module, fnty, name)
            return builder.call(fn, [builder.trunc(args[0], i32), ptr, args[3]])

        return sig, codegen

    return intrinsic(typer)


fd_write = _fd_io("write")
fd_write.__doc__ = """``write(fd, &arr[offset], nbytes)``: returns what the system call returns."""
fd_read = _fd_io("read")
fd_read.__doc__ = (
    """``read(fd, &arr[offset], nbytes)``: blocks like the system call (call it nogil)."""
)
