"""The persistent device loop of the ``cuda`` backend, composed around a user handler.

``compose_loop`` turns ``def handler(msg, out, state) -> bool`` (the same source the
``cpu`` backend runs) into a numba-cuda device function and wraps it in a kernel
that is launched once and then, until the host writes TERMINATE into the control
block:

1. thread 0 of each block reads the command word; when ACTIVE it claims up to
   ``threads`` input positions with a device-scope compare-and-swap on a claim
   counter in device memory (never on the shared ring header);
2. every thread copies one claimed record out of the mapped input ring into its
   local memory and calls the handler on it, with a zeroed local output record;
3. thread 0 waits for its *turn* (the input ring's ``released`` index, shadowed in
   device memory, equals its first claimed position), reserves room in the output
   ring, the emitting threads write their outputs, and thread 0 publishes them and
   then releases the input positions, which passes the turn to the next claim.

Because outputs are published in claim order, **the output ring is FIFO with respect
to the input ring**, whatever the number of blocks and threads: the handlers of one
batch run in parallel, only the copy-out is ordered. A record for which the handler
returns False produces nothing.

Idle blocks back off with ``nanosleep`` (32 ns doubling up to ``idle_sleep_ns``;
paused blocks up to 100 us).
Counters live in device memory (``side``, device-scope atomics) and are mirrored
into the mapped control block by single writers: the turn holder for the message
counters, block 0 for heartbeat and idle polls, the last block to exit for all.

``max_iterations`` > 0 bounds the number of loop iterations of each block; it exists
for the simulator, which launches synchronously. Zero means run until TERMINATE.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda, from_dtype

from pydotcompute.backends.cpu import ControlBlock as _Layout
from pydotcompute.rings.device import (
    RING_OK,
    SIMULATOR,
    W_BACKPRESSURE,
    W_DROP_BEFORE,
    load_gpu,
    load_sys,
    pause,
    publish_sys,
    ring_check,
    ring_claim,
    ring_publish,
    ring_release,
    ring_room,
    ring_stale,
    store_sys,
)

__all__ = [
    "ControlWords",
    "SideWords",
    "compose_loop",
    "compile_loop",
    "slot_dtype",
    "ERROR_TEXT",
]


class ControlWords:
    """Word indices of the control block: the ``cpu`` backend's ``ControlBlock`` layout
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
    NWORDS = _Layout.NBYTES // 8

    INACTIVE = _Layout.INACTIVE
    ACTIVE = _Layout.ACTIVE
    TERMINATE = _Layout.TERMINATE

    ERR_NONE = _Layout.ERR_NONE
    ERR_HANDLER = _Layout.ERR_HANDLER
    """The handler faulted (a CUDA error on the stream, or an exception in the simulator)."""
    ERR_INPUT_RING = 20
    """Plus a ``RING_BAD_*`` code: the input ring's header is not what was compiled for."""
    ERR_OUTPUT_RING = 30
    """Plus a ``RING_BAD_*`` code: the same for the output ring."""
    ERR_BLOCK_SIZE = 40
    """Launched with a block size other than the one the loop was compiled for."""


ERROR_TEXT = {
    ControlWords.ERR_HANDLER: "the handler faulted",
    ControlWords.ERR_INPUT_RING + 1: "the input ring's header is not a version-1 ring",
    ControlWords.ERR_INPUT_RING + 2: "the input ring's capacity or record size is not "
    "the one the loop was compiled for",
    ControlWords.ERR_INPUT_RING + 3: "the input ring is not host-to-device",
    ControlWords.ERR_OUTPUT_RING + 1: "the output ring's header is not a version-1 ring",
    ControlWords.ERR_OUTPUT_RING + 2: "the output ring's capacity or record size is not "
    "the one the loop was compiled for",
    ControlWords.ERR_OUTPUT_RING + 3: "the output ring is not device-to-host",
    ControlWords.ERR_BLOCK_SIZE: "launched with a block size the loop was not compiled for",
}


class SideWords:
    """Word indices of the device-side words (device memory, owned by the kernel)."""

    IN_CLAIM = 0
    IN_RELEASED = 1  # then dequeued, dropped_oldest (see ring_release)
    OUT_PUBLISHED = 4  # then enqueued, dropped_newest, high_water (see ring_publish)
    PROCESSED = 8
    EMITTED = 9
    DROPPED = 10
    IDLE_POLLS = 11
    EXITED = 12
    ERROR_CODE = 13
    FAILED_AT = 14
    """Simulator only: 1 + the input position whose handler raised (0: none)."""
    NWORDS = 16


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
_S_DROPPED = SideWords.DROPPED
_S_EMITTED = SideWords.EMITTED
_S_ERROR_CODE = SideWords.ERROR_CODE
_S_EXITED = SideWords.EXITED
_S_FAILED_AT = SideWords.FAILED_AT
_S_IDLE_POLLS = SideWords.IDLE_POLLS
_S_IN_CLAIM = SideWords.IN_CLAIM
_S_IN_RELEASED = SideWords.IN_RELEASED
_S_OUT_PUBLISHED = SideWords.OUT_PUBLISHED
_S_PROCESSED = SideWords.PROCESSED
_BLOCK = 0
_DROP_OLDEST = 2
_DROP_NEWEST = 3
_FIRST_SLEEP_NS = 32
_PAUSED_SLEEP_NS = 100_000  # a paused block polls rarely: reactivation may take 0.1 ms
_OUT_WAIT_POLLS = 4096  # DROP_OLDEST output: polls waiting for the host to skip stale


@cuda.jit(device=True)
def output_fit(out_hdr, ctrl, r, remaining, cap, strategy):  # type: ignore[no-untyped-def]
    """How many of ``remaining`` outputs to place at position ``r`` now, and how many
    to give up: ``(fit, lost)``. BLOCK waits for room (gives up only on TERMINATE);
    DROP_NEWEST drops what does not fit; DROP_OLDEST raises the ``drop_before``
    watermark so the host skips stale outputs (6.3.2), waits a bounded number of
    polls, then drops the rest as newest. Places what fits when some room is free."""
    polls = 0
    while True:
        room = ring_room(out_hdr, r, cap)
        if room >= remaining:
            return remaining, 0
        if strategy == _DROP_NEWEST:
            return room, remaining - room
        if room > 0:
            return room, 0
        if load_sys(ctrl, _C_STATE) == _C_TERMINATE or (
            strategy == _DROP_OLDEST and polls >= _OUT_WAIT_POLLS
        ):
            return 0, remaining
        if strategy == _DROP_OLDEST:
            want = r + (remaining if remaining < cap else cap) - cap
            if want > out_hdr[W_DROP_BEFORE]:
                publish_sys(out_hdr, W_DROP_BEFORE, want)
        polls += 1
        pause(1024)


def _uuid_field(dtype: np.dtype, name: str) -> bool:
    fields = dtype.fields
    field = fields.get(name) if fields is not None else None
    return field is not None and field[0].subdtype == (np.dtype(np.uint8), (16,))


def slot_dtype(dtype: np.dtype) -> np.dtype:
    """The record dtype widened to the ring's slot size (a multiple of 8 bytes), so the
    slots of a ring can be viewed as one record array; fields are unchanged."""
    size = (dtype.itemsize + 7) & ~7
    if size == dtype.itemsize:
        return dtype
    fields: dict[str, Any] = dict(dtype.fields or {})
    names = list(dtype.names or ())
    return np.dtype(
        {
            "names": names,
            "formats": [fields[n][0] for n in names],
            "offsets": [fields[n][1] for n in names],
            "itemsize": size,
        }
    )


def compose_loop(
    handler: Callable[..., Any],
    in_dtype: np.dtype,
    out_dtype: np.dtype,
    threads: int,
    items: int,
    idle_sleep_ns: int,
) -> Any:
    """The persistent kernel around ``handler`` (a Python function), not yet compiled.

    Arguments of the kernel: ``in_hdr``/``out_hdr`` (int64 views of the ring headers),
    ``in_slots``/``out_slots`` (record views of the slots), ``ctrl`` (int64 control
    block), ``side`` (int64 device words), ``state`` (the handler's state array),
    ``out_zero`` (one zeroed output record) and ``max_iterations``. Rings, ``ctrl``
    in mapped host memory; ``side``, ``state`` and ``out_zero`` in device memory.
    """
    device_handler = cuda.jit(device=True)(handler)
    # Outputs start from ``out_zero`` (the blank header, see messages.record's
    # ``output_header``); the input's message_id becomes their correlation_id.
    correlate = _uuid_field(in_dtype, "message_id") and _uuid_field(out_dtype, "correlation_id")

    def simulated_handler(msg, out, state, side, position):  # type: ignore[no-untyped-def]
        # Simulator only (plain Python): note which record raised for the host.
        try:
            return device_handler(msg, out, state)
        except BaseException:
            side[_S_FAILED_AT] = position + 1
            raise

    in_slot, out_slot = slot_dtype(in_dtype), slot_dtype(out_dtype)
    in_rec: Any = in_slot if SIMULATOR else from_dtype(in_slot)
    out_rec: Any = out_slot if SIMULATOR else from_dtype(out_slot)
    in_rs, in_ss = in_dtype.itemsize, in_slot.itemsize
    out_rs, out_ss = out_dtype.itemsize, out_slot.itemsize
    nthreads = threads
    per_round = threads * items
    max_sleep = idle_sleep_ns
    on_gpu = not SIMULATOR

    def ring_loop(
        in_hdr, in_slots, out_hdr, out_slots, ctrl, side, state, out_zero, max_iterations
    ):  # type: ignore[no-untyped-def]
        tid = cuda.threadIdx.x
        lead = tid == 0
        # shared: 0 action (<0 exit, 0 nothing, >0 claimed count), 1 first position,
        # 2 stale count, 3 output start, 4 outputs placed now, 5 last chunk
        sh = cuda.shared.array(6, np.int64)
        scan = cuda.shared.array(nthreads, np.int32)
        msg = cuda.local.array(1, in_rec)
        out = cuda.local.array(items, out_rec)
        flags = cuda.local.array(items, np.int32)
        in_cap = in_slots.shape[0]
        out_cap = out_slots.shape[0]
        if lead:
            code = 0
            if cuda.blockDim.x != nthreads:
                code = _C_ERR_BLOCK_SIZE
            else:
                chk = ring_check(in_hdr, in_cap, in_rs, in_ss, 0, 1)
                if chk != RING_OK:
                    code = _C_ERR_INPUT_RING + chk
                else:
                    chk = ring_check(out_hdr, out_cap, out_rs, out_ss, 1, 0)
                    if chk != RING_OK:
                        code = _C_ERR_OUTPUT_RING + chk
            sh[0] = code
            if code != 0:
                side[_S_ERROR_CODE] = code
                publish_sys(ctrl, _C_ERROR_CODE, code)
        cuda.syncthreads()
        k = -1 if sh[0] != 0 else 0
        cuda.syncthreads()
        out_strategy = out_hdr[W_BACKPRESSURE]
        in_drop_oldest = in_hdr[W_BACKPRESSURE] == _DROP_OLDEST
        idle_sleep = 0
        iteration = 0
        while k >= 0:
            # -- 1. the leader decides what this block does this round
            if lead:
                command = load_sys(ctrl, _C_STATE)
                k = 0
                c = 0
                stale = 0
                if (
                    command == _C_TERMINATE
                    or (max_iterations > 0 and iteration >= max_iterations)
                    or load_gpu(side, _S_ERROR_CODE) != 0
                ):
                    k = -1
                else:
                    c, k = ring_claim(in_hdr, side, _S_IN_CLAIM, per_round, command != _C_ACTIVE)
                    if k > 0 and in_drop_oldest:  # only then can records be stale
                        stale = ring_stale(in_hdr, c, k)
                if k == 0:
                    if command == _C_ACTIVE:
                        cuda.atomic.add(side, _S_IDLE_POLLS, 1)
                    idle_sleep = _FIRST_SLEEP_NS if idle_sleep == 0 else idle_sleep * 2
                    limit = max_sleep if command == _C_ACTIVE else _PAUSED_SLEEP_NS
                    if idle_sleep > limit:
                        idle_sleep = limit
                else:
                    idle_sleep = 0
                if cuda.blockIdx.x == 0:
                    store_sys(ctrl, _C_HEARTBEAT, iteration + 1)
                    store_sys(ctrl, _C_IDLE_POLLS, cuda.atomic.add(side, _S_IDLE_POLLS, 0))
                sh[0] = k
                sh[1] = c
                sh[2] = stale
                if idle_sleep > 0:
                    pause(idle_sleep)
            cuda.syncthreads()
            k = sh[0]
            c = sh[1]
            stale = sh[2]
            # Everyone has read this round's orders before the leader writes the next.
            cuda.syncthreads()
            if k > 0:
                # -- 2. every thread runs the handler on its `items` consecutive records
                count = 0
                for j in range(items):
                    i = tid * items + j
                    emit = False
                    if i >= stale and i < k:
                        if on_gpu:
                            # One pass of loads over PCIe; the handler reads local memory.
                            msg[0] = in_slots[(c + i) & (in_cap - 1)]
                            out[j] = out_zero[0]  # the blank header: default priority
                            if correlate:
                                for b in range(16):
                                    out[j].correlation_id[b] = msg[0].message_id[b]
                            emit = device_handler(msg[0], out[j], state)
                        else:
                            # The simulator hands out records of kernel arguments
                            # wrapped: read the slot in place, copy with numpy.
                            out[j : j + 1] = out_zero[0:1].copy_to_host()
                            rec = out.view(np.recarray)[j]  # takes attribute writes
                            src = in_slots[(c + i) & (in_cap - 1)]
                            if correlate:
                                rec.correlation_id[:] = src.message_id
                            emit = simulated_handler(src, rec, state, side, c + i)
                    flags[j] = 1 if emit else 0
                    count += flags[j]
                # Block-wide inclusive prefix sum of the counts (Hillis-Steele): thread
                # tid's outputs go to places scan[tid] - count .. scan[tid] - 1.
                scan[tid] = count
                cuda.syncthreads()
                d = 1
                while d < nthreads:
                    v = scan[tid - d] if tid >= d else 0
                    cuda.syncthreads()
                    scan[tid] += v
                    cuda.syncthreads()
                    d *= 2
                base = scan[tid] - count
                m = scan[nthreads - 1]
                # -- 3. in claim order: reserve output, write it, publish, release input
                if lead:
                    wait = 0
                    while load_gpu(side, _S_IN_RELEASED) != c:
                        wait = 1024 if wait >= 512 else wait * 2 + 32
                        pause(wait)
                # Outputs go out in chunks as room appears (a batch may exceed the ring).
                done = 0
                while True:
                    fit = 0
                    lost = 0
                    if lead:
                        r = load_gpu(side, _S_OUT_PUBLISHED)
                        fit, lost = output_fit(out_hdr, ctrl, r, m - done, out_cap, out_strategy)
                        sh[3] = r
                        sh[4] = fit
                        sh[5] = 1 if done + fit + lost >= m else 0
                    cuda.syncthreads()
                    r = sh[3]
                    chunk = sh[4]
                    final = sh[5]
                    place = base - done
                    for j in range(items):
                        if flags[j]:
                            if place >= 0 and place < chunk:
                                out_slots[(r + place) & (out_cap - 1)] = out[j]
                            place += 1
                    cuda.syncthreads()
                    if lead:
                        if lost > 0 and out_strategy == _BLOCK:
                            # Only a terminating kernel gives up on a blocking output.
                            dropped = side[_S_DROPPED] + lost
                            side[_S_DROPPED] = dropped
                            store_sys(ctrl, _C_DROPPED, dropped)
                            lost = 0
                        ring_publish(out_hdr, side, _S_OUT_PUBLISHED, r, fit, lost)
                    done += chunk
                    if final:
                        break
                if lead:
                    processed = side[_S_PROCESSED] + (k - stale)
                    side[_S_PROCESSED] = processed
                    emitted = side[_S_EMITTED] + done
                    side[_S_EMITTED] = emitted
                    store_sys(ctrl, _C_PROCESSED, processed)
                    store_sys(ctrl, _C_EMITTED, emitted)
                    # A publish of this round (done > 0) fenced after all its reads.
                    ring_release(in_hdr, side, _S_IN_RELEASED, c, k, stale, done > 0)
            iteration += 1
        # -- exit: the last block out mirrors every counter once more
        if lead:
            gone = cuda.atomic.add(side, _S_EXITED, 1) + 1
            if gone == cuda.gridDim.x:
                store_sys(ctrl, _C_PROCESSED, side[_S_PROCESSED])
                store_sys(ctrl, _C_EMITTED, side[_S_EMITTED])
                store_sys(ctrl, _C_DROPPED, side[_S_DROPPED])
                store_sys(ctrl, _C_IDLE_POLLS, side[_S_IDLE_POLLS])
                cuda.threadfence_system()

    return ring_loop


# One compiled loop per kernel type: (handler, record dtypes, state type, block size,
# back-off). A kernel type launched many times compiles once. Weak keys: a handler
# that goes away takes its compiled code with it.
_LOOPS: weakref.WeakKeyDictionary[Callable[..., Any], dict[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)
_LOOPS_LOCK = threading.Lock()


def compile_loop(
    handler: Callable[..., Any],
    in_dtype: np.dtype,
    out_dtype: np.dtype,
    state: np.ndarray,
    threads: int,
    items: int,
    idle_sleep_ns: int,
) -> Any:
    """The persistent kernel for this handler and these types, compiled once (cached).

    On a GPU the kernel is compiled here for its one signature; under the simulator
    there is nothing to compile. Raises numba's typing error when the handler does
    not compile for these record dtypes."""
    py = getattr(handler, "py_func", handler)
    key = (in_dtype, out_dtype, state.dtype, state.ndim, threads, items, idle_sleep_ns)
    with _LOOPS_LOCK:
        per_handler = _LOOPS.setdefault(py, {})
        kernel = per_handler.get(key)
        if kernel is None:
            kernel = cuda.jit(compose_loop(py, in_dtype, out_dtype, threads, items, idle_sleep_ns))
            if not SIMULATOR:
                kernel.compile(loop_signature(in_dtype, out_dtype, state))
            per_handler[key] = kernel
    return kernel


def loop_signature(in_dtype: np.dtype, out_dtype: np.dtype, state: np.ndarray) -> tuple[Any, ...]:
    """Argument types of the composed kernel (see ``compose_loop``)."""
    from numba import typeof, types

    in_slot, out_slot = slot_dtype(in_dtype), slot_dtype(out_dtype)
    words = types.int64[::1]
    in_recs = types.Array(from_dtype(in_slot), 1, "C")
    out_recs = types.Array(from_dtype(out_slot), 1, "C")
    state_t = types.Array(typeof(state).dtype, state.ndim, "C")
    return (words, in_recs, words, out_recs, words, words, state_t, out_recs, types.int64)
