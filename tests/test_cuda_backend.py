"""The ``cuda`` backend's host-side pieces that need neither a GPU nor the simulator."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pydotcompute.backends.registry import cuda_status
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


def test_slot_records_are_the_fields_after_the_tag() -> None:
    from pydotcompute.backends.cuda_loop import slot_dtype

    packed = np.dtype([("id", "<u4"), ("x", "<f4"), ("y", "<f4")])
    slot = slot_dtype(packed)
    assert slot.itemsize == 8 + 16 and slot.names == packed.names
    assert [slot.fields[n][1] for n in slot.names] == [8, 12, 16]
    assert slot_dtype(REC).itemsize == 24 and slot_dtype(REC).fields["seq"][1] == 16


def test_records_too_large_to_stage_are_refused() -> None:
    from pydotcompute.backends.cuda_loop import loop_shape
    from pydotcompute.errors import InvalidConfigurationError

    assert loop_shape(REC, REC, 32, 4) == 128  # threads x items
    assert loop_shape(REC, REC, 128, 8) == 40 * 1024 // (24 + 24 + 8)  # what fits
    big = np.dtype([("a", "<f8", (4096,))])
    with pytest.raises(InvalidConfigurationError, match="shared memory"):
        loop_shape(big, big, 32, 1)


def stream_stats(msg, out, state):  # type: ignore[no-untyped-def]
    """Running statistics of float64 values, in CUDA C++ (kernels/stream_stats.cu)."""
    return False


STATS = {"cuda_source": "stream_stats.cu", "cuda_function": "pdc_stream_stats"}


async def test_a_cuda_cxx_kernel_is_routed_to_the_source_loop_and_refused_without_a_gpu() -> None:
    from pydotcompute.backends.config import RingKernelConfig
    from pydotcompute.backends.cuda import CudaKernelBackend
    from pydotcompute.device.probe import probe_cuda

    found = probe_cuda()
    if found.usable:
        pytest.skip("a GPU is usable here: the launch is tested in test_cuda_gpu.py")
    config = RingKernelConfig(backend="cuda", extra=STATS)
    with pytest.raises(BackendNotAvailableError) as info:
        CudaKernelBackend("stats", stream_stats, config, np.dtype(np.float64), None, print)
    assert "CUDA C++" in str(info.value)
    expected = "simulator" if found.simulator else found.reason
    assert expected in str(info.value)


def test_a_cuda_cxx_kernel_needs_its_function_name() -> None:
    from pydotcompute.backends.config import RingKernelConfig
    from pydotcompute.backends.cuda_source import CudaSourceKernelBackend
    from pydotcompute.errors import InvalidConfigurationError

    config = RingKernelConfig(backend="cuda", extra={"cuda_source": "stream_stats.cu"})
    with pytest.raises(InvalidConfigurationError, match="cuda_function"):
        CudaSourceKernelBackend("stats", stream_stats, config, np.dtype(np.float64), None, print)


@pytest.mark.parametrize("src_byte", range(8, 16))
@pytest.mark.parametrize("dst_byte", range(8, 16))
def test_a_uuid_moves_between_words_at_any_byte_offset(src_byte: int, dst_byte: int) -> None:
    """The device loop copies message_id to correlation_id as shifted 8-byte words; the
    bytes around the field in the destination words come from the blank slot. Run as
    the simulator runs it (numpy int64 words), against a plain byte copy."""
    from pydotcompute.backends.cuda_loop import uuid_copy

    rng = np.random.default_rng(src_byte * 16 + dst_byte)
    src = rng.integers(-(2**63), 2**63 - 1, 5, dtype=np.int64, endpoint=True)
    src.view(np.uint8)[src_byte : src_byte + 16] = [0xFF, 0x80, 0x7F, 0x01] * 4  # sign bits
    blank = rng.integers(-(2**63), 2**63 - 1, 5, dtype=np.int64, endpoint=True)
    dst = rng.integers(-(2**63), 2**63 - 1, 7, dtype=np.int64, endpoint=True)
    dst[1:6] = blank  # what the loop wrote into the slot just before
    expected = dst.copy()
    expected.view(np.uint8)[8 + dst_byte : 8 + dst_byte + 16] = src.view(np.uint8)[
        src_byte : src_byte + 16
    ]
    copy = uuid_copy(src_byte, dst_byte, blank)
    copy.py_func(src, 0, dst, 1)
    assert dst.tobytes() == expected.tobytes()
