"""Memory: host/device buffers with lazy synchronisation, memory pools, devices (CuPy)."""

from pydotcompute.memory.accelerator import Accelerator
from pydotcompute.memory.memory_pool import MemoryPool, MemoryPoolStats, get_memory_pool
from pydotcompute.memory.unified_buffer import SyncState, UnifiedBuffer

__all__ = [
    "Accelerator",
    "MemoryPool",
    "MemoryPoolStats",
    "SyncState",
    "UnifiedBuffer",
    "get_memory_pool",
]
