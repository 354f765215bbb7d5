"""The ring kernels resident on this process's GPUs right now, and their hazards.

A persistent kernel never finishes while it runs, so a device-wide synchronize
(``cudaDeviceSynchronize``) issued beside one would wait forever;
``memory.Accelerator.synchronize`` asks here first and refuses instead. A GPU is shared
by the whole process, so this is process-wide; it holds its kernels weakly and forgets
each once its launch has completed. Under lazy module loading other kernels may hang
beside a resident one (``probe.LAZY_LOADING_HAZARD``): each launch warns then.

Frees are the other hazard: ``cuMemFree`` and ``cuMemFreeHost`` may wait for the device
to go idle. numba-cuda frees device and pinned memory that Python dropped in batches,
from whatever thread drops the last reference, so a garbage-collected array could hang
the program beside a resident kernel. While one is resident, ``launched`` therefore
holds numba's pending frees (numba's own ``deallocations.disable()``); when the last
ring kernel of the context has exited, ``exited`` releases them and they run. Memory
dropped meanwhile is kept, not lost. CuPy's memory pools keep freed blocks for reuse
and free nothing on their own; do not call ``free_all_blocks()`` beside a resident
kernel.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

__all__ = [
    "exited",
    "hold_frees",
    "launched",
    "note_resident",
    "resident_kernels",
    "warn_if_lazy_loading",
]

# kernel loop -> (kernel id, device index, "has its launch completed?")
_RESIDENT: weakref.WeakKeyDictionary[object, tuple[str, int, Callable[[], bool]]] = (
    weakref.WeakKeyDictionary()
)


# kernel loop -> the finalizer that releases its hold on numba's pending frees
_FREE_HOLDS: weakref.WeakKeyDictionary[object, weakref.finalize[..., Any]] = (
    weakref.WeakKeyDictionary()
)


def launched(loop: object, kernel_id: str, device: int, done: Callable[[], bool]) -> None:
    """What every cuda backend calls right after launching a persistent kernel."""
    from numba import cuda

    note_resident(loop, kernel_id, device, done)
    hold_frees(loop, cuda.current_context().deallocations)
    warn_if_lazy_loading(kernel_id)


def exited(loop: object) -> None:
    """What a cuda backend calls once its kernel has exited (its stream is idle): the
    kernel's hold on pending frees goes; the last one out lets them run."""
    hold = _FREE_HOLDS.pop(loop, None)
    if hold is not None:
        hold()


def hold_frees(owner: object, deallocations: Any) -> None:
    """Keep numba's pending frees (a context's ``deallocations``) from running until
    ``exited(owner)``, or until ``owner`` is garbage. Holds nest: frees run when the
    last holder lets go."""
    held = deallocations.disable()
    held.__enter__()

    def release() -> None:
        held.__exit__(None, None, None)
        if not deallocations.is_disabled:
            deallocations.clear()

    hold = weakref.finalize(owner, release)
    # At interpreter exit a kernel may still be resident: its frees must not run then.
    hold.atexit = False
    _FREE_HOLDS[owner] = hold


def _lazy_loading() -> bool:
    """Whether this process's CUDA driver loads modules lazily."""
    from numba.cuda.cudadrv import driver as drv

    mode = drv.driver.cuModuleGetLoadingMode()
    return int(mode) == int(drv.binding.CUmoduleLoadingMode.CU_MODULE_LAZY_LOADING)


def warn_if_lazy_loading(kernel_id: str) -> None:
    """Warn that other kernels may hang beside this resident one: CUDA was initialised
    with lazy module loading."""
    from pydotcompute.device.probe import LAZY_LOADING_HAZARD

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
