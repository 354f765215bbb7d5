"""The runtime layer: kernel definitions, lifecycle and ``RingKernelRuntime``."""

from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.runtime.lifecycle import KernelState
from pydotcompute.runtime.registry import RingKernelSpec, registered_kernels, ring_kernel
from pydotcompute.runtime.runtime import RingKernelRuntime

__all__ = [
    "KernelState",
    "RingKernelConfig",
    "RingKernelRuntime",
    "RingKernelSpec",
    "registered_kernels",
    "ring_kernel",
]
