"""The CUDA devices this process can use, and their properties."""

from __future__ import annotations

from pydotcompute.device.probe import CudaAvailability, DeviceInfo, probe_cuda
from pydotcompute.errors import (
    BackendNotAvailableError,
    InvalidConfigurationError,
    KernelStateError,
)
from pydotcompute.memory.cuda_guard import import_cupy

__all__ = ["Accelerator"]


class Accelerator:
    """A snapshot of the machine's CUDA devices, probed when constructed.

    Without a usable GPU it lists no devices and ``reason`` says why; asking for a
    device then raises ``BackendNotAvailableError`` with that reason.
    """

    def __init__(self) -> None:
        self._found: CudaAvailability = probe_cuda()

    @property
    def available(self) -> bool:
        return self._found.usable

    @property
    def reason(self) -> str:
        """Why no device is usable (empty when one is)."""
        return self._found.reason

    @property
    def devices(self) -> tuple[DeviceInfo, ...]:
        """The usable devices; empty without a usable GPU (the simulator included)."""
        return self._found.devices if self._found.usable else ()

    @property
    def device_count(self) -> int:
        return len(self.devices)

    def device(self, index: int = 0) -> DeviceInfo:
        """Properties of device ``index``."""
        if not self._found.usable:
            raise BackendNotAvailableError(f"CUDA is not usable: {self._found.reason}")
        if not 0 <= index < len(self.devices):
            raise InvalidConfigurationError(
                f"no CUDA device {index}; this machine has {len(self.devices)}"
            )
        return self.devices[index]

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        """``(free, total)`` bytes of device ``index``, read now."""
        self.device(index)
        cupy = import_cupy()
        with cupy.cuda.Device(index):
            free, total = cupy.cuda.runtime.memGetInfo()
        return int(free), int(total)

    def synchronize(self, index: int = 0) -> None:
        """Wait until all work queued on device ``index`` has finished.

        Refused with ``KernelStateError`` while a ring kernel of this process runs on
        the device: it never finishes, so the wait would never end. Synchronize the
        streams of your own work instead, or terminate the ring kernels first."""
        from pydotcompute.device.resident import resident_kernels

        self.device(index)
        running = resident_kernels(index)
        if running:
            raise KernelStateError(
                f"device {index} cannot be synchronized while ring kernels run on it "
                f"({', '.join(map(repr, running))}): the wait would never end; "
                "synchronize your own streams, or terminate the kernels first"
            )
        cupy = import_cupy()
        with cupy.cuda.Device(index):
            cupy.cuda.runtime.deviceSynchronize()

    def __repr__(self) -> str:
        if not self.available:
            return f"Accelerator(no devices: {self.reason})"
        names = ", ".join(f"{d.index}: {d.name}" for d in self.devices)
        return f"Accelerator({names})"
