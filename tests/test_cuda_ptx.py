"""The composed device loop compiles to PTX for a real GPU architecture.

The simulator runs device code as Python and so cannot catch what only numba-cuda's
compiler rejects (types, intrinsics, inline PTX). This compiles the loop with NVVM
for sm_80 without a GPU. Compiling a call to a device function asks the current
device for its architecture; there is none here, so the test names one.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("needs numba-cuda's compiler, not the simulator", allow_module_level=True)


def _nvvm_available() -> bool:
    try:
        from numba.cuda.cudadrv import nvvm

        return bool(nvvm.is_available())
    except Exception:  # no CUDA toolkit pieces at all
        return False


pytestmark = pytest.mark.skipif(not _nvvm_available(), reason="libNVVM is not installed")

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


def _ptx(fn) -> str:  # type: ignore[no-untyped-def]
    from numba import cuda
    from numba.cuda import dispatcher

    from pydotcompute.backends.cuda_loop import compose_loop, loop_signature

    with mock.patch.object(dispatcher, "get_current_device", _Device):
        loop = compose_loop(fn, IN, OUT, 64, 8, 4000)
        ptx, _ = cuda.compile_ptx(loop, loop_signature(IN, OUT, np.zeros(1)), cc=CC)
    return str(ptx)


def test_loop_compiles_with_the_protocol_memory_operations() -> None:
    ptx = _ptx(handler)
    assert ".entry" in ptx
    assert "ld.acquire.sys.b64" in ptx  # polling the host's indices and command
    assert "membar.sys" in ptx and "st.relaxed.sys.b64" in ptx  # fence, then publish
    assert "ld.acquire.gpu.b64" in ptx and "st.release.gpu.b64" in ptx  # the release turn
    assert "atom.global.cas.b64" in ptx  # claims on the device-memory counter
    assert "nanosleep.u32" in ptx  # idle back-off
    assert "bar.sync" in ptx


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
