"""An array with a host copy and a device copy, synchronised lazily.

The rule. A buffer has a host copy (numpy, always present) and a device copy
(CuPy, created from the host copy on first use of ``.device``). Its ``state`` says
which copy is newer:

- ``SYNCED``: both hold the same data (or only the host copy exists);
- ``HOST_DIRTY``: the host copy was written; the device copy is stale;
- ``DEVICE_DIRTY``: the device copy was written; the host copy is stale.

Reading ``.host`` in ``DEVICE_DIRTY`` first copies device to host; reading
``.device`` in ``HOST_DIRTY`` first copies host to device; either leaves the
buffer ``SYNCED``. The accessors cannot see writes, so whoever writes through a
copy says so: ``mark_host_dirty()`` after writing the host copy,
``mark_device_dirty()`` after writing the device copy (e.g. after a kernel).
Marking one side while the other is dirty raises ``BufferSyncError``: one of the
two writes would be lost. ``sync()`` makes both copies equal now. A buffer is
not thread-safe; device copies use CuPy's current stream and are complete when
the accessor returns.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Any

import numpy as np

from pydotcompute.errors import BufferSyncError
from pydotcompute.memory.cuda_guard import cuda_required, import_cupy
from pydotcompute.memory.memory_pool import MemoryPool

__all__ = ["SyncState", "UnifiedBuffer"]


class SyncState(enum.Enum):
    """Which copy of a ``UnifiedBuffer`` is newer."""

    SYNCED = "synced"
    HOST_DIRTY = "host-dirty"
    DEVICE_DIRTY = "device-dirty"


class UnifiedBuffer:
    """A zero-initialised array usable from the host (numpy) and a GPU (CuPy).

    Without a usable GPU it works host-only; ``.device`` then raises
    ``BackendNotAvailableError`` with the reason. ``pool`` (optional) supplies
    the device memory, on the pool's device; otherwise ``device`` picks the GPU.
    """

    def __init__(
        self,
        shape: int | tuple[int, ...],
        dtype: Any = np.float64,
        *,
        device: int = 0,
        pool: MemoryPool | None = None,
    ) -> None:
        self._host: np.ndarray = np.zeros(shape, dtype=dtype)
        self._device_array: Any = None
        self._device_id = pool.device if pool is not None else device
        self._pool = pool
        self._state = SyncState.SYNCED

    @property
    def shape(self) -> tuple[int, ...]:
        return self._host.shape

    @property
    def dtype(self) -> np.dtype:
        return self._host.dtype

    @property
    def nbytes(self) -> int:
        return int(self._host.nbytes)

    @property
    def state(self) -> SyncState:
        return self._state

    @property
    def has_device_copy(self) -> bool:
        return self._device_array is not None

    @property
    def host(self) -> np.ndarray:
        """The host copy, brought up to date first if the device copy is newer."""
        if self._state is SyncState.DEVICE_DIRTY:
            self._copy_to_host()
        return self._host

    @property
    def device(self) -> Any:
        """The device copy (a CuPy array), created or brought up to date first."""
        if self._device_array is None:
            self._allocate_device()
            self._copy_to_device()
        elif self._state is SyncState.HOST_DIRTY:
            self._copy_to_device()
        return self._device_array

    def mark_host_dirty(self) -> None:
        """Record that the host copy was written."""
        if self._state is SyncState.DEVICE_DIRTY:
            raise BufferSyncError(
                "the device copy was written and not synced; marking the host copy "
                "written too would lose one of the writes (call sync() or read .host first)"
            )
        self._state = SyncState.HOST_DIRTY

    def mark_device_dirty(self) -> None:
        """Record that the device copy was written (creating it first if needed)."""
        if self._state is SyncState.HOST_DIRTY:
            raise BufferSyncError(
                "the host copy was written and not synced; marking the device copy "
                "written too would lose one of the writes (call sync() or read .device first)"
            )
        if self._device_array is None:
            self.device  # noqa: B018 - creates the device copy from the host copy
        self._state = SyncState.DEVICE_DIRTY

    def sync(self) -> None:
        """Make both copies equal now."""
        if self._state is SyncState.DEVICE_DIRTY:
            self._copy_to_host()
        elif self._state is SyncState.HOST_DIRTY and self._device_array is not None:
            self._copy_to_device()
        self._state = SyncState.SYNCED

    def release_device(self) -> None:
        """Drop the device copy (after syncing it back if it is newer)."""
        self.sync()
        self._device_array = None

    def _allocate_device(self) -> None:
        cupy = import_cupy()
        with cuda_required(), cupy.cuda.Device(self._device_id):
            allocator = self._pool.use() if self._pool is not None else contextlib.nullcontext()
            with allocator:
                self._device_array = cupy.empty(self._host.shape, dtype=self._host.dtype)

    def _copy_to_device(self) -> None:
        cupy = import_cupy()
        with cupy.cuda.Device(self._device_id):
            self._device_array.set(self._host)
        self._state = SyncState.SYNCED

    def _copy_to_host(self) -> None:
        cupy = import_cupy()
        with cupy.cuda.Device(self._device_id):
            self._device_array.get(out=self._host)
        self._state = SyncState.SYNCED

    def __repr__(self) -> str:
        where = "host+device" if self.has_device_copy else "host"
        return (
            f"UnifiedBuffer(shape={self.shape}, dtype={self.dtype}, {where}, {self._state.value})"
        )
