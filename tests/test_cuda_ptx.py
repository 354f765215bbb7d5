"""The composed device loop compiles to PTX for a real GPU architecture.

The simulator runs device code as Python and so cannot catch what only numba-cuda's
compiler rejects (types, intrinsics, inline PTX). This compiles the loop with NVVM
for sm_80 without a GPU. Compiling a call to a device function asks the current
device for its architecture; there is none here, so the test names one.
"""

from __future__ import annotations

import collections
import functools
import os
import re
from unittest import mock

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("needs numba-cuda's compiler, not the simulator", allow_module_level=True)


def _missing_toolchain() -> str | None:
    """Why numba-cuda cannot compile to PTX here, or None when it can.

    It needs libNVVM (a CUDA toolkit) and NVRTC (the ``nvidia-cuda-nvrtc`` wheel of the
    dev extra, or a toolkit), looked up the way numba-cuda itself loads them.
    """
    try:
        from numba.cuda.cudadrv import nvvm

        if not nvvm.is_available():
            return "libNVVM is not installed (no CUDA toolkit)"
    except Exception as exc:  # numba-cuda's compiler cannot even be imported
        return f"numba-cuda's compiler is unavailable: {exc}"
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        load_nvidia_dynamic_lib("nvrtc")
    except Exception as exc:
        return f"NVRTC is not installed: {exc}"
    return None


pytestmark = pytest.mark.skipif(_missing_toolchain() is not None, reason=str(_missing_toolchain()))

IN = np.dtype([("id", "<u4"), ("x", "<f4"), ("y", "<f4")])  # padded to 16-byte slots
OUT = np.dtype([("id", "<u4"), ("s", "<f8")], align=True)
CC = (8, 0)


class _Device:
    compute_capability = CC


def handler(msg, out, state):  # type: ignore[no-untyped-def]
    if msg.id % 3 == 0:
        return False
    out.id = msg.id
    out.s = msg.x + msg.y + state[0]
    return True


@functools.cache  # each compile takes seconds; tests share them
def _ptx(fn, in_link: int = 0, out_link: int = 0) -> str:  # type: ignore[no-untyped-def]
    from numba import cuda
    from numba.cuda import dispatcher

    from pydotcompute.backends.cuda_loop import compose_loop, loop_signature

    with mock.patch.object(dispatcher, "get_current_device", _Device):
        loop = compose_loop(fn, IN, OUT, 64, 8, 4000, in_link, out_link)
        ptx, _ = cuda.compile_ptx(loop, loop_signature(IN, OUT, np.zeros(1)), cc=CC)
    return str(ptx)


def _ops(ptx: str) -> collections.Counter[str]:
    """Memory instructions of the PTX by opcode, e.g. ``ld.relaxed.sys.b64``."""
    return collections.Counter(
        re.findall(r"^\s*(?:@%p\d+\s+)?((?:ld|st|atom|red|membar|fence)\.[\w.]+)", ptx, re.M)
    )


def test_loop_compiles_with_the_protocol_memory_operations() -> None:
    ptx = _ptx(handler)
    ops = _ops(ptx)
    assert ".entry" in ptx
    assert ops["ld.relaxed.sys.b64"] > 0  # slots read whole, in any order: tags say
    assert ops["ld.acquire.sys.b64"] > 0  # published, the state word, released if short
    assert ops["st.relaxed.sys.b64"] > 0  # output words and tags, mirrored counters
    # released once per batch; the other release stores are error codes and drop_before
    assert 1 <= ops["st.release.sys.b64"] <= 4
    assert not any(op.startswith(("membar", "fence")) for op in ops)  # no system fence
    assert ops["ld.acquire.gpu.b64"] and ops["st.release.gpu.b64"]  # the turn, device memory
    assert ops["atom.global.cas.b64"] == 1  # claims on the device-memory counter
    assert "nanosleep.u32" in ptx  # idle back-off
    assert "%globaltimer" in ptx  # counters mirrored on a period
    assert "bar.sync" in ptx


def test_a_linked_loop_moves_link_records_at_gpu_scope() -> None:
    """A link ring is device memory between two kernels of one GPU: its slots are read
    (ld.relaxed.gpu) and written (st.relaxed.gpu) and its ``released`` stored
    (st.release.gpu) at GPU scope; system scope stays for the host's words (the state
    word, the header checks at launch, mirrored counters, the mirror of ``released``)."""
    host = _ops(_ptx(handler))
    fed = _ops(_ptx(handler, in_link=1))
    feeding = _ops(_ptx(handler, out_link=1))
    assert fed["ld.relaxed.gpu.b64"] > 0 and host["ld.relaxed.gpu.b64"] == 0
    assert fed["ld.relaxed.sys.b64"] < host["ld.relaxed.sys.b64"]  # no slot read there
    # released moves to GPU scope; the host's mirror of it (after OUT_RESERVED) stays
    assert fed["st.release.gpu.b64"] == host["st.release.gpu.b64"] + 1
    assert fed["st.release.sys.b64"] == host["st.release.sys.b64"]
    assert fed["ld.acquire.sys.b64"] < host["ld.acquire.sys.b64"]  # published, drop_before
    assert feeding["st.relaxed.gpu.b64"] > 0 and host["st.relaxed.gpu.b64"] == 0
    assert feeding["st.relaxed.sys.b64"] < host["st.relaxed.sys.b64"]  # no slot written
    for ops in (fed, feeding):
        assert not any(op.startswith(("membar", "fence")) for op in ops)
        assert not [op for op in ops if re.search(r"\.(u8|s8|b8|u16|s16|b16)$", op)]


def test_a_link_between_two_gpus_is_ordered_at_system_scope() -> None:
    """Two GPUs order nothing between them at GPU scope: a link in the consumer's
    memory written peer to peer, or in pinned host memory, keeps system scope."""
    from pydotcompute.backends.cuda_loop import LINK_PEER

    # LINK_HOST differs from LINK_PEER only in the consumer's poll window.
    host = _ops(_ptx(handler))
    for kind in (LINK_PEER,):
        ops = _ops(_ptx(handler, in_link=kind, out_link=kind))
        assert ops["ld.relaxed.gpu.b64"] == 0 and ops["st.relaxed.gpu.b64"] == 0, kind
        # released, and its mirror for the host
        assert ops["st.release.sys.b64"] == host["st.release.sys.b64"] + 1, kind
        assert ops["ld.relaxed.sys.b64"] >= host["ld.relaxed.sys.b64"], kind


def test_records_move_as_whole_words_never_bytes() -> None:
    """The 12-byte input and 16-byte output records (u32, f32 and f64 fields) cross
    PCIe as 8-byte words, coalesced and staged in shared memory; the handler reads
    and writes its fields there. No byte load or store anywhere (the loop used to
    copy records byte by byte: 16 one-byte stores per output)."""
    ops = _ops(_ptx(handler))
    narrow = [op for op in ops if re.search(r"\.(u8|s8|b8|u16|s16|b16)$", op)]
    assert narrow == [], narrow
    ring = {op: n for op, n in ops.items() if ".sys." in op}
    assert ring and all(op.endswith(".b64") for op in ring), ring
    assert ops["ld.shared.u64"] and ops["st.shared.u64"]  # staged whole words


def test_only_host_memory_words_are_read_without_ordering_in_the_poll() -> None:
    """Reads of host memory are .sys words only: no plain ld.global of a slot, which an
    L1 line holding the slot's previous occupant could answer."""
    ops = _ops(_ptx(handler))
    plain_global = {op: n for op, n in ops.items() if op.startswith("ld.global.") and n}
    # the handler's `state` (device memory) is the only plain global load left
    assert set(plain_global) <= {"ld.global.f64"}, plain_global


def test_a_handler_that_does_not_type_is_refused_at_compile_time() -> None:
    def bad(msg, out, state):  # type: ignore[no-untyped-def]
        out.id = msg.id + "one"
        return True

    with pytest.raises(Exception) as info:
        _ptx(bad)
    assert type(info.value).__name__ == "TypingError"
    assert "one" in str(info.value)


def test_message_records_with_uuid_fields_compile() -> None:
    from numba import cuda
    from numba.cuda import dispatcher

    from pydotcompute.backends.cuda_loop import compose_loop, loop_signature
    from pydotcompute.messages import message

    @message
    class Reading:
        value: float
        sensor: int

    def reply(msg, out, state):  # type: ignore[no-untyped-def]
        for i in range(16):
            out.correlation_id[i] = msg.message_id[i]
        out.value = msg.value * 2.0
        out.sensor = msg.sensor
        return True

    dt = Reading.__record_dtype__
    with mock.patch.object(dispatcher, "get_current_device", _Device):
        loop = compose_loop(reply, dt, dt, 32, 4, 4000)
        ptx, _ = cuda.compile_ptx(loop, loop_signature(dt, dt, np.zeros(1)), cc=CC)
    assert ".entry" in ptx


def test_output_headers_are_written_as_whole_words() -> None:
    """Outputs of message records start as the blank header (priority 128) with the
    input's message_id as their correlation_id, which sits at byte 17, after the
    one-byte priority: the loop writes both as shifted and merged 8-byte words, so
    still no byte load or store (a read-modify-write of a word would let the
    compiler narrow it to a byte access)."""
    from numba import cuda
    from numba.cuda import dispatcher

    from pydotcompute.backends.cuda_loop import compose_loop, loop_signature
    from pydotcompute.messages import message

    @message
    class Request:
        value: float
        sensor: int

    def answer(msg, out, state):  # type: ignore[no-untyped-def]
        out.value = msg.value * 2.0
        out.sensor = msg.sensor
        return True

    dt = Request.__record_dtype__
    assert dt.fields["correlation_id"][1] % 8 != 0
    with mock.patch.object(dispatcher, "get_current_device", _Device):
        loop = compose_loop(answer, dt, dt, 32, 4, 4000)
        ptx, _ = cuda.compile_ptx(loop, loop_signature(dt, dt, np.zeros(1)), cc=CC)
    ops = _ops(str(ptx))
    narrow = [op for op in ops if re.search(r"\.(u8|s8|b8|u16|s16|b16)$", op)]
    assert narrow == [], narrow
    plain_global = {op for op, n in ops.items() if op.startswith("ld.global.") and n}
    assert plain_global <= {"ld.global.f64"}, plain_global


def test_the_floor_benchmark_kernels_compile() -> None:
    """gpu_floor.py's device code (ping-pong threads, zero-copy readers and writers)
    compiles for a real GPU: its first run on one must not be a compile error."""
    import sys
    from pathlib import Path

    from numba import cuda, types
    from numba.cuda import dispatcher

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_floor

    words = types.int64[::1]
    with mock.patch.object(dispatcher, "get_current_device", _Device):
        for kernel, sig in (
            (gpu_floor._echo_word, (words, words, types.int64)),
            (gpu_floor._echo_record, (words, words, types.int64)),
            (gpu_floor._read_mapped, (words, words)),
            (gpu_floor._write_mapped, (words,)),
        ):
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=CC)
            assert ".entry" in ptx
    ops = _ops(cuda.compile_ptx(gpu_floor._echo_record.py_func,
                                (words, words, types.int64), cc=CC)[0])  # fmt: skip
    assert ops["ld.acquire.sys.b64"] and ops["st.release.sys.b64"]


MID = np.dtype([("id", "<u4"), ("flag", "<u1"), ("s", "<f4")], align=True)  # a byte field


def to_mid(msg, out, state):  # type: ignore[no-untyped-def]
    out.id = msg.id
    out.s = msg.x * msg.y
    return True


def mid_filter(msg, out, state):  # type: ignore[no-untyped-def]
    out.id = msg.id
    out.s = msg.s + state[0]
    return msg.id % 3 != 0


def mid_to_out(msg, out, state):  # type: ignore[no-untyped-def]
    out.id = msg.id
    out.s = msg.s * state[0]
    return True


def _chain_ptx(handlers, dtypes) -> str:  # type: ignore[no-untyped-def]
    from numba import cuda
    from numba.cuda import dispatcher

    from pydotcompute.backends.cuda_loop import compose_chain_loop, loop_signature

    states = tuple(np.zeros(1) for _ in handlers)
    with mock.patch.object(dispatcher, "get_current_device", _Device):
        loop = compose_chain_loop(handlers, dtypes, 64, 8, 4000)
        ptx, _ = cuda.compile_ptx(loop, loop_signature(dtypes[0], dtypes[-1], states), cc=CC)
    return str(ptx)


def test_a_fused_chain_loop_compiles_and_moves_records_as_whole_words() -> None:
    """Three handlers in one device loop (IN -> MID -> MID -> OUT): the rings are read
    and written as 8-byte .sys words as in the one-handler loop, the inner records are
    reset as whole words in shared memory, and per-stage counts are shared-memory
    atomics; no byte load or store though MID has a one-byte field (handlers here do
    not write it)."""
    ptx = _chain_ptx((to_mid, mid_filter, mid_to_out), (IN, MID, MID, OUT))
    ops = _ops(ptx)
    assert ".entry" in ptx
    narrow = [op for op in ops if re.search(r"\.(u8|s8|b8|u16|s16|b16)$", op)]
    assert narrow == [], narrow
    ring = {op: n for op, n in ops.items() if ".sys." in op}
    assert ring and all(op.endswith(".b64") for op in ring), ring
    assert ops["ld.relaxed.sys.b64"] and ops["st.relaxed.sys.b64"]
    assert 1 <= ops["st.release.sys.b64"] <= 4
    assert not any(op.startswith(("membar", "fence")) for op in ops)
    assert ops["atom.global.cas.b64"] == 1  # still one claim: one poller, one loop
    assert ops["ld.shared.u64"] and ops["st.shared.u64"]
    assert any(op.startswith("atom.shared.add") for op in ops), ops  # per-stage counts
    plain_global = {op for op, n in ops.items() if op.startswith("ld.global.") and n}
    assert plain_global <= {"ld.global.f64"}, plain_global  # the handlers' states


def test_a_fused_chain_of_message_records_writes_headers_as_whole_words() -> None:
    """Inner and final records of ``@message`` types start as the blank header with the
    first input's message_id as correlation_id (at byte 17): shifted and merged words."""
    from pydotcompute.messages import message

    @message
    class Req:
        value: float
        sensor: int

    def scale(msg, out, state):  # type: ignore[no-untyped-def]
        out.value = msg.value * 2.0
        out.sensor = msg.sensor
        return msg.sensor != 7

    dt = Req.__record_dtype__
    ops = _ops(_chain_ptx((scale, scale, scale), (dt, dt, dt, dt)))
    narrow = [op for op in ops if re.search(r"\.(u8|s8|b8|u16|s16|b16)$", op)]
    assert narrow == [], narrow
    plain_global = {op for op, n in ops.items() if op.startswith("ld.global.") and n}
    assert plain_global <= {"ld.global.f64"}, plain_global
