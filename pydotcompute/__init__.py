"""pydotcompute: a GPU actor runtime for Python."""

from pydotcompute.backends.host import KernelContext
from pydotcompute.backends.probe import CudaAvailability, DeviceInfo, probe_cuda, require_cuda
from pydotcompute.coordinator import (
    DAG,
    DeadLetter,
    FanIn,
    FanOut,
    Flow,
    Pipeline,
    RetryPolicy,
    SQLiteJournal,
    Stage,
    route,
    stage,
)
from pydotcompute.errors import (
    BackendNotAvailableError,
    BufferSyncError,
    FlowClosedError,
    InvalidConfigurationError,
    ItemFailedError,
    JournalError,
    KernelAlreadyExistsError,
    KernelFailedError,
    KernelNotFoundError,
    KernelStateError,
    MessageDeserializationError,
    MessageSerializationError,
    PyDotComputeError,
    QueueFullError,
    QueueTimeoutError,
)
from pydotcompute.memory import (
    Accelerator,
    MemoryPool,
    MemoryPoolStats,
    SyncState,
    UnifiedBuffer,
)
from pydotcompute.messages import RingKernelMessage, message
from pydotcompute.rings import HostRing, RingCounters, RingSide
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.runtime import (
    KernelState,
    RingKernelConfig,
    RingKernelRuntime,
    RingKernelSpec,
    registered_kernels,
    ring_kernel,
)
from pydotcompute.telemetry.snapshot import KernelTelemetry

__version__ = "0.1.0"

__all__ = [
    "HostRing",
    "RingCounters",
    "RingSide",
    "DAG",
    "DeadLetter",
    "FanIn",
    "FanOut",
    "Flow",
    "FlowClosedError",
    "ItemFailedError",
    "JournalError",
    "Pipeline",
    "RetryPolicy",
    "SQLiteJournal",
    "Stage",
    "route",
    "stage",
    "Accelerator",
    "BufferSyncError",
    "CudaAvailability",
    "DeviceInfo",
    "MemoryPool",
    "MemoryPoolStats",
    "SyncState",
    "UnifiedBuffer",
    "probe_cuda",
    "require_cuda",
    "BackpressureStrategy",
    "KernelContext",
    "KernelState",
    "KernelTelemetry",
    "RingKernelMessage",
    "message",
    "RingKernelConfig",
    "RingKernelRuntime",
    "RingKernelSpec",
    "registered_kernels",
    "ring_kernel",
    "BackendNotAvailableError",
    "InvalidConfigurationError",
    "KernelAlreadyExistsError",
    "KernelFailedError",
    "KernelNotFoundError",
    "KernelStateError",
    "MessageDeserializationError",
    "MessageSerializationError",
    "PyDotComputeError",
    "QueueFullError",
    "QueueTimeoutError",
    "__version__",
]
