"""Memory: host-only behaviour here, the CuPy paths on a fake GPU, the real thing on a GPU."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pydotcompute.device.probe import probe_cuda
from pydotcompute.errors import (
    BackendNotAvailableError,
    BufferSyncError,
    InvalidConfigurationError,
    KernelStateError,
)
from pydotcompute.memory import Accelerator, MemoryPool, SyncState, UnifiedBuffer
from tests import fake_cupy

REAL = probe_cuda()
no_real_gpu = pytest.mark.skipif(not REAL.usable, reason=f"no usable GPU: {REAL.reason}")


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> fake_cupy.FakeGpu:
    return fake_cupy.install(monkeypatch)


# --- without a GPU (the real environment) ---------------------------------------------


@pytest.mark.skipif(REAL.usable, reason="a GPU is usable here")
class TestWithoutGpu:
    def test_buffer_works_host_only(self) -> None:
        buf = UnifiedBuffer((2, 3), np.int32)
        assert buf.shape == (2, 3) and buf.dtype == np.int32 and buf.nbytes == 24
        assert not buf.host.any() and buf.state is SyncState.SYNCED
        buf.host[1, 2] = 7
        buf.mark_host_dirty()
        assert buf.state is SyncState.HOST_DIRTY
        buf.sync()
        assert buf.state is SyncState.SYNCED and buf.host[1, 2] == 7
        assert not buf.has_device_copy

    def test_device_raises_with_probe_reason(self) -> None:
        buf = UnifiedBuffer(4)
        with pytest.raises(BackendNotAvailableError) as err:
            buf.device  # noqa: B018
        assert str(err.value) == f"CUDA is not usable: {REAL.reason}"
        with pytest.raises(BackendNotAvailableError):
            buf.mark_device_dirty()
        assert buf.state is SyncState.SYNCED and not buf.has_device_copy

    def test_pool_raises_with_reason(self) -> None:
        with pytest.raises(BackendNotAvailableError, match="CUDA is not usable: "):
            MemoryPool()
        with pytest.raises(BackendNotAvailableError, match="CUDA is not usable: "):
            MemoryPool.cupy_default()

    def test_accelerator_lists_nothing(self) -> None:
        acc = Accelerator()
        assert not acc.available and acc.devices == () and acc.device_count == 0
        assert acc.reason == REAL.reason
        with pytest.raises(BackendNotAvailableError, match="CUDA is not usable: "):
            acc.device(0)
        with pytest.raises(BackendNotAvailableError):
            acc.memory_info()
        assert "no devices" in repr(acc)


def test_device_without_cupy_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cupy.no_simulator(monkeypatch)
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(BackendNotAvailableError, match=r"CuPy is not installed \(pip install"):
        UnifiedBuffer(3).device  # noqa: B018


# --- CuPy paths, on a fake GPU ---------------------------------------------------------


def test_device_copy_is_created_lazily(gpu: fake_cupy.FakeGpu) -> None:
    buf = UnifiedBuffer(4)
    buf.host[:] = [1, 2, 3, 4]
    assert gpu.copies == [] and not buf.has_device_copy
    dev = buf.device
    assert isinstance(dev, fake_cupy.FakeDeviceArray)
    assert gpu.copies == ["host->device"] and dev.tolist() == [1, 2, 3, 4]
    assert buf.device is dev and buf.host is buf.host
    assert gpu.copies == ["host->device"], "reading a synced buffer must not copy"


def test_host_dirty_copies_once_to_device(gpu: fake_cupy.FakeGpu) -> None:
    buf = UnifiedBuffer(3)
    buf.device  # noqa: B018
    buf.host[0] = 5.0
    buf.mark_host_dirty()
    assert buf.state is SyncState.HOST_DIRTY and gpu.copies == ["host->device"]
    assert buf.device[0] == 5.0 and buf.state is SyncState.SYNCED
    buf.device  # noqa: B018
    assert gpu.copies == ["host->device", "host->device"]


def test_device_dirty_copies_once_to_host(gpu: fake_cupy.FakeGpu) -> None:
    buf = UnifiedBuffer((2, 2), np.int64)
    buf.device[:] = 9
    buf.mark_device_dirty()
    assert buf.state is SyncState.DEVICE_DIRTY
    assert buf.host.tolist() == [[9, 9], [9, 9]] and buf.state is SyncState.SYNCED
    buf.host  # noqa: B018
    assert gpu.copies == ["host->device", "device->host"]


def test_mark_device_dirty_creates_the_device_copy(gpu: fake_cupy.FakeGpu) -> None:
    buf = UnifiedBuffer(2)
    buf.mark_device_dirty()
    assert buf.has_device_copy and buf.state is SyncState.DEVICE_DIRTY
    assert gpu.copies == ["host->device"]


def test_conflicting_marks_raise(gpu: fake_cupy.FakeGpu) -> None:
    buf = UnifiedBuffer(2)
    buf.device  # noqa: B018
    buf.mark_device_dirty()
    with pytest.raises(BufferSyncError, match="device copy was written"):
        buf.mark_host_dirty()
    buf.sync()
    buf.mark_host_dirty()
    with pytest.raises(BufferSyncError, match="host copy was written"):
        buf.mark_device_dirty()


def test_sync_both_directions(gpu: fake_cupy.FakeGpu) -> None:
    buf = UnifiedBuffer(2)
    buf.device[:] = 3
    buf.mark_device_dirty()
    buf.sync()
    assert buf.state is SyncState.SYNCED and gpu.copies[-1] == "device->host"
    assert np.asarray(buf._host).tolist() == [3, 3]
    buf.host[:] = 4
    buf.mark_host_dirty()
    buf.sync()
    assert gpu.copies[-1] == "host->device" and buf.device.tolist() == [4, 4]
    copies = len(gpu.copies)
    buf.sync()
    assert len(gpu.copies) == copies, "syncing a synced buffer must not copy"


def test_release_device_keeps_newer_device_data(gpu: fake_cupy.FakeGpu) -> None:
    buf = UnifiedBuffer(2)
    buf.device[:] = 8
    buf.mark_device_dirty()
    buf.release_device()
    assert not buf.has_device_copy and buf.host.tolist() == [8, 8]


def test_buffer_allocates_from_its_pool(gpu: fake_cupy.FakeGpu) -> None:
    pool = MemoryPool(limit=1 << 20)
    buf = UnifiedBuffer((16,), np.float32, pool=pool)
    buf.device  # noqa: B018
    assert pool.stats().device_used_bytes == 64
    assert gpu.default_pool.used == 0, "the default pool must not be used"
    buf.release_device()
    stats = pool.stats()
    assert stats.device_used_bytes == 0 and stats.device_cached_bytes == 64
    pool.free_all()
    assert pool.stats().device_held_bytes == 0


def test_pool_limit(gpu: fake_cupy.FakeGpu) -> None:
    pool = MemoryPool(limit=100)
    assert pool.limit == 100 and pool.stats().device_limit_bytes == 100
    pool.allocate(80)
    with pytest.raises(MemoryError):
        pool.empty(4, np.float64)
    pool.set_limit(0)
    assert pool.limit == 0
    with pytest.raises(InvalidConfigurationError):
        pool.set_limit(-1)
    with pytest.raises(InvalidConfigurationError):
        MemoryPool(limit=True)  # type: ignore[arg-type]


def test_pool_pinned_arrays(gpu: fake_cupy.FakeGpu) -> None:
    pool = MemoryPool()
    arr = pool.empty_pinned((3, 2), np.int16)
    assert isinstance(arr, np.ndarray) and arr.shape == (3, 2) and arr.dtype == np.int16
    arr[:] = 1
    assert arr.sum() == 6
    assert pool.stats().pinned_cached_blocks == 0


def test_cupy_default_pool_wraps_cupy_defaults(gpu: fake_cupy.FakeGpu) -> None:
    pool = MemoryPool.cupy_default()
    buf = UnifiedBuffer(8, np.uint8)
    buf.device  # noqa: B018 - a plain CuPy allocation
    assert pool.stats().device_used_bytes == 8


def test_pool_on_a_missing_device_fails(gpu: fake_cupy.FakeGpu) -> None:
    pool = MemoryPool(device=3)
    with pytest.raises(fake_cupy.CUDARuntimeError, match="invalid device"):
        pool.stats()


def test_accelerator_lists_devices(gpu: fake_cupy.FakeGpu) -> None:
    gpu.devices = [fake_cupy.device_props("A"), fake_cupy.device_props("B", 8, 0)]
    acc = Accelerator()
    assert acc.available and acc.reason == "" and acc.device_count == 2
    assert [d.name for d in acc.devices] == ["A", "B"]
    assert acc.device(1).compute_capability == (8, 0)
    with pytest.raises(InvalidConfigurationError, match="no CUDA device 2; this machine has 2"):
        acc.device(2)
    free, total = acc.memory_info(1)
    assert total == 80 << 30 and free < total
    acc.synchronize(1)
    assert gpu.synchronized == [1]
    assert repr(acc) == "Accelerator(0: A, 1: B)"


def test_synchronize_is_refused_while_a_ring_kernel_runs_on_the_device(
    gpu: fake_cupy.FakeGpu,
) -> None:
    # cudaDeviceSynchronize beside a persistent kernel would never return.
    from pydotcompute.device.resident import note_resident

    class Loop:
        finished = False

    gpu.devices = [fake_cupy.device_props("A"), fake_cupy.device_props("B")]
    loop = Loop()
    note_resident(loop, "ring", 1, lambda: Loop.finished)
    acc = Accelerator()
    with pytest.raises(
        KernelStateError, match="device 1 .* \\('ring'\\): the wait would never end"
    ):
        acc.synchronize(1)
    acc.synchronize(0)  # another device
    Loop.finished = True
    acc.synchronize(1)
    assert gpu.synchronized == [0, 1]


def test_genuine_cuda_errors_propagate(gpu: fake_cupy.FakeGpu) -> None:
    """On a usable GPU a CuPy failure is a real error, not 'CUDA is not usable'."""
    buf = UnifiedBuffer(2, device=5)
    with pytest.raises(fake_cupy.CUDARuntimeError, match="invalid device"):
        buf.device  # noqa: B018


# --- on a real GPU ---------------------------------------------------------------------


@pytest.mark.gpu
@no_real_gpu
def test_gpu_round_trip() -> None:
    import cupy

    pool = MemoryPool()
    buf = UnifiedBuffer(1000, np.float32, pool=pool)
    buf.host[:] = np.arange(1000)
    buf.mark_host_dirty()
    assert isinstance(buf.device, cupy.ndarray)
    buf.device *= 2
    buf.mark_device_dirty()
    np.testing.assert_array_equal(buf.host, np.arange(1000) * 2)
    assert pool.stats().device_used_bytes >= 4000
    del buf
    pool.free_all()
    assert pool.stats().device_held_bytes == 0


@pytest.mark.gpu
@no_real_gpu
def test_gpu_accelerator_and_pinned() -> None:
    import cupy

    acc = Accelerator()
    assert acc.device_count == cupy.cuda.runtime.getDeviceCount()
    free, total = acc.memory_info()
    assert 0 < free <= total
    pinned = MemoryPool().empty_pinned(256, np.float64)
    pinned[:] = 1.5
    assert float(cupy.asarray(pinned).sum()) == 384.0
