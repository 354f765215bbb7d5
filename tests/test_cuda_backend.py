"""The ``cuda`` backend's host-side pieces that need neither a GPU nor the simulator."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pydotcompute.backends.select import cuda_status
from pydotcompute.errors import BackendNotAvailableError
from pydotcompute.runtime.runtime import RingKernelRuntime

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
REC = np.dtype([("x", "<f8"), ("seq", "<i8")])


def passthrough(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x
    return True


@pytest.mark.skipif(SIM or cuda_status()[0], reason="a usable GPU or the simulator is present")
async def test_cuda_backend_without_a_gpu_says_why() -> None:
    usable, reason = cuda_status()
    async with RingKernelRuntime() as rt:
        with pytest.raises(BackendNotAvailableError) as info:
            await rt.launch("k", passthrough, backend="cuda", input_type=REC, output_type=REC)
    assert reason and reason in str(info.value)


def test_slots_are_records_widened_to_a_multiple_of_8_bytes() -> None:
    from pydotcompute.backends.cuda_loop import slot_dtype

    packed = np.dtype([("id", "<u4"), ("x", "<f4"), ("y", "<f4")])
    slot = slot_dtype(packed)
    assert slot.itemsize == 16 and slot.names == packed.names
    assert [slot.fields[n][1] for n in slot.names] == [0, 4, 8]
    assert slot_dtype(REC) == REC


def test_control_block_layout_is_the_cpu_backends() -> None:
    cpu = pytest.importorskip("pydotcompute.backends.cpu")
    from pydotcompute.backends.cuda_loop import ControlWords

    block = cpu.ControlBlock
    for name in ("STATE", "PROCESSED", "EMITTED", "DROPPED", "IDLE_POLLS", "ERRORS",
                 "HEARTBEAT", "ERROR_CODE"):  # fmt: skip
        assert getattr(ControlWords, name) * 8 == getattr(block, name), name
    assert ControlWords.NWORDS * 8 == block.NBYTES
    for name in ("INACTIVE", "ACTIVE", "TERMINATE", "ERR_NONE", "ERR_HANDLER"):
        assert getattr(ControlWords, name) == getattr(block, name), name
