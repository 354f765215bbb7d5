"""pydotcompute: a GPU actor runtime for Python."""

from pydotcompute.errors import (
    BackendNotAvailableError,
    InvalidConfigurationError,
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

__version__ = "0.1.0"

__all__ = [
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
