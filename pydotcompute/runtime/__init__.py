"""The runtime layer: kernel definitions, lifecycle and ``RingKernelRuntime``."""

from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.runtime.event_loop import get_loop_info
from pydotcompute.runtime.extension import RuntimeExtension
from pydotcompute.runtime.handle import KernelHandle
from pydotcompute.runtime.lifecycle import KernelState
from pydotcompute.runtime.registry import RingKernelSpec, registered_kernels, ring_kernel
from pydotcompute.runtime.runtime import RingKernelRuntime

__all__ = [
    "KernelHandle",
    "KernelState",
    "RingKernelConfig",
    "RingKernelRuntime",
    "RingKernelSpec",
    "RuntimeExtension",
    "get_loop_info",
    "registered_kernels",
    "ring_kernel",
]
