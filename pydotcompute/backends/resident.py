"""The ring kernels resident on this process's GPUs right now.

A persistent kernel never finishes while it runs, so a device-wide synchronize
(``cudaDeviceSynchronize``) issued beside one would wait forever;
``memory.Accelerator.synchronize`` asks here first and refuses instead. A GPU is shared
by the whole process, so this is process-wide; it holds its kernels weakly and forgets
each once its launch has completed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

__all__ = ["note_resident", "resident_kernels"]

# kernel loop -> (kernel id, device index, "has its launch completed?")
_RESIDENT: weakref.WeakKeyDictionary[object, tuple[str, int, Callable[[], bool]]] = (
    weakref.WeakKeyDictionary()
)


def note_resident(loop: object, kernel_id: str, device: int, done: Callable[[], bool]) -> None:
    """Record a kernel just launched on ``device``. ``done`` must not hold ``loop``."""
    _RESIDENT[loop] = (kernel_id, device, done)


def resident_kernels(device: int) -> list[str]:
    """Ids of the kernels still running on ``device``."""
    running = []
    for loop, (kernel_id, dev, done) in list(_RESIDENT.items()):
        try:
            finished = done()
        except Exception:  # its stream faulted: the kernel is gone (its monitor reports it)
            finished = True
        if finished:
            _RESIDENT.pop(loop, None)
        elif dev == device:
            running.append(kernel_id)
    return sorted(running)
