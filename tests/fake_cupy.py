"""A numpy-backed stand-in for CuPy and a visible GPU, installed at the import boundary.

Tests of code that calls CuPy use it where no GPU exists: it replaces the ``cupy``
module in ``sys.modules`` and the three numba-cuda calls the probe makes, so the
code under test runs unchanged. It records every host/device copy so tests can
check that synchronisation is lazy.
"""

from __future__ import annotations

import contextlib
import sys
import types
import weakref
from typing import Any

import numpy as np


class CUDARuntimeError(RuntimeError):
    pass


class OutOfMemoryError(MemoryError):
    pass


def device_props(name: str = "Fake GPU", major: int = 9, minor: int = 0) -> dict[str, Any]:
    return {
        "name": name.encode(),
        "major": major,
        "minor": minor,
        "totalGlobalMem": 80 << 30,
        "multiProcessorCount": 132,
        "maxThreadsPerMultiProcessor": 2048,
        "canMapHostMemory": 1,
        "pciBusID": 7,
    }


class FakeRuntime:
    CUDARuntimeError = CUDARuntimeError

    def __init__(self, gpu: FakeGpu) -> None:
        self._gpu = gpu

    def runtimeGetVersion(self) -> int:  # noqa: N802 - CuPy's name
        return 12090

    def driverGetVersion(self) -> int:  # noqa: N802
        return self._gpu.driver_version

    def getDeviceCount(self) -> int:  # noqa: N802
        if self._gpu.device_count_error is not None:
            raise CUDARuntimeError(self._gpu.device_count_error)
        return len(self._gpu.devices)

    def getDeviceProperties(self, index: int) -> dict[str, Any]:  # noqa: N802
        return self._gpu.devices[index]

    def memGetInfo(self) -> tuple[int, int]:  # noqa: N802
        total = self._gpu.devices[self._gpu.current_device]["totalGlobalMem"]
        return total - 1024, total

    def deviceSynchronize(self) -> None:  # noqa: N802
        self._gpu.synchronized.append(self._gpu.current_device)


class FakePointer:
    def __init__(self, pool: FakeMemoryPool | None, nbytes: int) -> None:
        self.nbytes = nbytes
        if pool is not None:
            weakref.finalize(self, pool._release, nbytes)


class FakeMemoryPool:
    def __init__(self) -> None:
        self.used = 0
        self.cached = 0
        self.cached_blocks = 0
        self.limit = 0

    def malloc(self, nbytes: int) -> FakePointer:
        if self.limit and self.used + self.cached + nbytes > self.limit:
            raise OutOfMemoryError(f"out of memory allocating {nbytes} bytes")
        self.used += nbytes
        return FakePointer(self, nbytes)

    def _release(self, nbytes: int) -> None:
        self.used -= nbytes
        self.cached += nbytes
        self.cached_blocks += 1

    def used_bytes(self) -> int:
        return self.used

    def total_bytes(self) -> int:
        return self.used + self.cached

    def free_bytes(self) -> int:
        return self.cached

    def n_free_blocks(self) -> int:
        return self.cached_blocks

    def get_limit(self) -> int:
        return self.limit

    def set_limit(self, size: int) -> None:
        self.limit = size

    def free_all_blocks(self) -> None:
        self.cached = 0
        self.cached_blocks = 0


class FakePinnedMemoryPool:
    def __init__(self) -> None:
        self.cached_blocks = 0

    def malloc(self, nbytes: int) -> bytearray:
        return bytearray(nbytes)

    def n_free_blocks(self) -> int:
        return self.cached_blocks

    def free_all_blocks(self) -> None:
        self.cached_blocks = 0


class FakeDeviceArray(np.ndarray):
    """Device memory of the fake: a numpy array whose copies to and from the host count."""

    gpu: FakeGpu
    memory: FakePointer | None = None

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        self.gpu.copies.append("host->device")
        np.copyto(np.asarray(self), arr)

    def get(self, stream: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        self.gpu.copies.append("device->host")
        if out is None:
            return np.array(self)
        np.copyto(out, np.asarray(self))
        return out


class FakeGpu:
    """What the fake machine looks like; tests change these fields before probing."""

    def __init__(self) -> None:
        self.driver_version = 12040
        self.device_count_error: str | None = None
        self.devices = [device_props()]
        self.copies: list[str] = []
        self.synchronized: list[int] = []
        self.current_device = 0
        self.allocator: Any = None
        self.default_pool = FakeMemoryPool()
        self.default_pinned_pool = FakePinnedMemoryPool()
        self.module = self._build_module()

    def _build_module(self) -> types.ModuleType:
        gpu = self
        cupy = types.ModuleType("cupy")
        cuda = types.SimpleNamespace()
        cuda.runtime = FakeRuntime(gpu)
        cuda.MemoryPool = FakeMemoryPool
        cuda.PinnedMemoryPool = FakePinnedMemoryPool

        @contextlib.contextmanager
        def device(index: int) -> Any:
            if not 0 <= index < len(gpu.devices):
                raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
            previous, gpu.current_device = gpu.current_device, index
            try:
                yield
            finally:
                gpu.current_device = previous

        @contextlib.contextmanager
        def using_allocator(allocator: Any) -> Any:
            previous, gpu.allocator = gpu.allocator, allocator
            try:
                yield
            finally:
                gpu.allocator = previous

        def empty(shape: Any, dtype: Any = np.float64) -> FakeDeviceArray:
            arr = np.empty(shape, dtype=dtype).view(FakeDeviceArray)
            arr.gpu = gpu
            allocate = gpu.allocator or gpu.default_pool.malloc
            arr.memory = allocate(arr.nbytes)
            return arr

        cuda.Device = device
        cuda.using_allocator = using_allocator
        cupy.cuda = cuda
        cupy.empty = empty
        cupy.ndarray = FakeDeviceArray
        cupy.get_default_memory_pool = lambda: gpu.default_pool
        cupy.get_default_pinned_memory_pool = lambda: gpu.default_pinned_pool
        return cupy


def no_simulator(monkeypatch: Any) -> None:
    """Let the probe go past its simulator check in a NUMBA_ENABLE_CUDASIM=1 run."""
    from numba.cuda.core import config

    monkeypatch.setattr(config, "ENABLE_CUDASIM", 0)


def install(monkeypatch: Any) -> FakeGpu:
    """Make CuPy, the driver and numba-cuda see one fake GPU for this test."""
    # The probe's numba-cuda questions are answered here; the module itself may be
    # the simulator's when the suite runs under NUMBA_ENABLE_CUDASIM=1.
    import numba.cuda
    from numba.cuda.cudadrv import nvvm

    gpu = FakeGpu()
    no_simulator(monkeypatch)  # a real GPU, even in a simulator run
    monkeypatch.setitem(sys.modules, "cupy", gpu.module)
    monkeypatch.setattr(numba.cuda, "cuda_error", lambda: None, raising=False)
    monkeypatch.setattr(numba.cuda, "gpus", [object()], raising=False)
    monkeypatch.setattr(nvvm, "is_available", lambda: True)
    return gpu
