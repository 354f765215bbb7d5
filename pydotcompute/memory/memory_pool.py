"""Device and pinned host memory pools (CuPy's), with stats, a limit and release."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from pydotcompute.device.probe import require_cuda
from pydotcompute.errors import InvalidConfigurationError
from pydotcompute.memory.cuda_guard import import_cupy

__all__ = ["MemoryPool", "MemoryPoolStats", "get_memory_pool"]


@dataclasses.dataclass(frozen=True)
class MemoryPoolStats:
    """Byte counts of one pool, read at one instant."""

    device_used_bytes: int
    """Device bytes held by live arrays."""
    device_held_bytes: int
    """Device bytes the pool holds: used plus cached for reuse."""
    device_cached_bytes: int
    """Device bytes cached for reuse (returned to the driver by ``free_all``)."""
    device_cached_blocks: int
    device_limit_bytes: int
    """Upper bound on ``device_held_bytes``; 0 means no limit."""
    pinned_cached_blocks: int
    """Pinned host blocks cached for reuse."""


class MemoryPool:
    """A CuPy device memory pool and a pinned host memory pool for one device.

    ``MemoryPool()`` owns fresh pools: what it allocates is counted and freed apart
    from the rest of the process. ``MemoryPool.cupy_default()`` wraps the pools
    CuPy uses by default, to watch or trim plain CuPy code. Constructing either
    without a usable GPU raises ``BackendNotAvailableError`` with the reason.
    """

    def __init__(self, *, device: int = 0, limit: int | None = None) -> None:
        require_cuda()
        cupy = import_cupy()
        self._init(cupy, device, cupy.cuda.MemoryPool(), cupy.cuda.PinnedMemoryPool())
        if limit is not None:
            self.set_limit(limit)

    @classmethod
    def cupy_default(cls, *, device: int = 0) -> MemoryPool:
        """The process-wide pools CuPy allocates from when nothing else is set."""
        require_cuda()
        cupy = import_cupy()
        pool = cls.__new__(cls)
        pool._init(
            cupy, device, cupy.get_default_memory_pool(), cupy.get_default_pinned_memory_pool()
        )
        return pool

    def _init(self, cupy: Any, device: int, device_pool: Any, pinned_pool: Any) -> None:
        self._cupy = cupy
        self.device = device
        self._device_pool = device_pool
        self._pinned_pool = pinned_pool

    def allocate(self, nbytes: int) -> Any:
        """A device allocation (a ``cupy.cuda.MemoryPointer``) of ``nbytes``."""
        with self._cupy.cuda.Device(self.device):
            return self._device_pool.malloc(nbytes)

    def empty(self, shape: int | tuple[int, ...], dtype: Any = np.float64) -> Any:
        """An uninitialised CuPy array in this pool."""
        with self.use():
            return self._cupy.empty(shape, dtype)

    def empty_pinned(self, shape: int | tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
        """An uninitialised numpy array in pinned (page-locked) host memory of this pool.

        The array keeps its pinned block alive; the block returns to the pool when
        the array is collected.
        """
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        memory = self._pinned_pool.malloc(max(count * dtype.itemsize, 1))
        return np.ndarray(shape, dtype=dtype, buffer=memory)

    @contextlib.contextmanager
    def use(self) -> Iterator[MemoryPool]:
        """Route CuPy device allocations of this thread to this pool, on its device."""
        with self._cupy.cuda.Device(self.device):
            with self._cupy.cuda.using_allocator(self._device_pool.malloc):
                yield self

    def stats(self) -> MemoryPoolStats:
        with self._cupy.cuda.Device(self.device):
            pool = self._device_pool
            return MemoryPoolStats(
                device_used_bytes=int(pool.used_bytes()),
                device_held_bytes=int(pool.total_bytes()),
                device_cached_bytes=int(pool.free_bytes()),
                device_cached_blocks=int(pool.n_free_blocks()),
                device_limit_bytes=int(pool.get_limit()),
                pinned_cached_blocks=int(self._pinned_pool.n_free_blocks()),
            )

    @property
    def limit(self) -> int:
        """Device byte limit of this pool; 0 means none."""
        with self._cupy.cuda.Device(self.device):
            return int(self._device_pool.get_limit())

    def set_limit(self, nbytes: int) -> None:
        """Cap the device bytes this pool may hold (0 removes the cap). An allocation
        beyond it raises CuPy's ``OutOfMemoryError``."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise InvalidConfigurationError(f"memory limit must be an int >= 0, got {nbytes!r}")
        with self._cupy.cuda.Device(self.device):
            self._device_pool.set_limit(size=nbytes)

    def free_all(self) -> None:
        """Return every cached (unused) block of both pools to the driver."""
        with self._cupy.cuda.Device(self.device):
            self._device_pool.free_all_blocks()
        self._pinned_pool.free_all_blocks()


def get_memory_pool(device: int = 0) -> MemoryPool:
    """The process-wide pools CuPy allocates from on ``device``
    (``MemoryPool.cupy_default``); ``BackendNotAvailableError`` without a usable GPU."""
    return MemoryPool.cupy_default(device=device)
