"""The ring kernels resident on this process's GPUs right now, and their hazards.

A persistent kernel never finishes while it runs, so a device-wide synchronize
(``cudaDeviceSynchronize``) issued beside one would wait forever;
``memory.Accelerator.synchronize`` asks here first and refuses instead. A GPU is shared
by the whole process, so this is process-wide; it holds its kernels weakly and forgets
each once its launch has completed. Under lazy module loading other kernels may hang
beside a resident one (``probe.LAZY_LOADING_HAZARD``): each launch warns then.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

__all__ = ["launched", "note_resident", "resident_kernels", "warn_if_lazy_loading"]

# kernel loop -> (kernel id, device index, "has its launch completed?")
_RESIDENT: weakref.WeakKeyDictionary[object, tuple[str, int, Callable[[], bool]]] = (
    weakref.WeakKeyDictionary()
)


def launched(loop: object, kernel_id: str, device: int, done: Callable[[], bool]) -> None:
    """What every cuda backend calls right after launching a persistent kernel."""
    note_resident(loop, kernel_id, device, done)
    warn_if_lazy_loading(kernel_id)


def _lazy_loading() -> bool:
    """Whether this process's CUDA driver loads modules lazily."""
    from numba.cuda.cudadrv import driver as drv

    mode = drv.driver.cuModuleGetLoadingMode()
    return int(mode) == int(drv.binding.CUmoduleLoadingMode.CU_MODULE_LAZY_LOADING)


def warn_if_lazy_loading(kernel_id: str) -> None:
    """Warn that other kernels may hang beside this resident one: CUDA was initialised
    with lazy module loading."""
    from pydotcompute.backends.probe import LAZY_LOADING_HAZARD

    if _lazy_loading():
        warnings.warn(
            f"cuda kernel {kernel_id!r}: {LAZY_LOADING_HAZARD}", RuntimeWarning, stacklevel=4
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
