"""The error hierarchy: every error the runtime raises derives from PyDotComputeError."""

from __future__ import annotations

import asyncio
import sys

__all__ = [
    "PyDotComputeError",
    "KernelNotFoundError",
    "KernelAlreadyExistsError",
    "KernelStateError",
    "KernelFailedError",
    "FusedStageError",
    "KernelLinkError",
    "QueueFullError",
    "QueueTimeoutError",
    "MessageSerializationError",
    "MessageDeserializationError",
    "AmbiguousMessageTypeError",
    "InvalidConfigurationError",
    "BackendNotAvailableError",
    "BufferSyncError",
    "ItemFailedError",
    "ItemFilteredError",
    "FlowClosedError",
    "JournalError",
    "JournalUnavailableError",
    "NonDeterminismError",
    "PlacementTimeoutError",
    "WorkflowFailedError",
    "WorkflowNotFoundError",
]


class PyDotComputeError(Exception):
    """Base class of every pydotcompute error."""


class KernelNotFoundError(PyDotComputeError, LookupError):
    """No kernel with that id is registered or launched."""


class KernelAlreadyExistsError(PyDotComputeError):
    """A kernel with that id is already launched in this runtime."""


class KernelStateError(PyDotComputeError):
    """The operation is not allowed in the kernel's current lifecycle state."""


class KernelFailedError(PyDotComputeError):
    """The kernel's loop raised; the original exception is chained as ``__cause__``.

    ``kernel_id`` names the kernel and ``failed_message`` is the message (or record)
    its handler was working on when it raised, where known (None otherwise).
    """

    def __init__(
        self, *args: object, kernel_id: str | None = None, failed_message: object = None
    ) -> None:
        super().__init__(*args)
        self.kernel_id = kernel_id
        self.failed_message = failed_message


class FusedStageError(PyDotComputeError):
    """A handler of a fused chain raised: ``stage`` and ``handler`` name the one that
    did; the original exception is its ``__cause__``."""

    def __init__(self, stage: str, handler: str, exc: BaseException) -> None:
        super().__init__(f"stage {stage!r} (handler {handler}) raised {type(exc).__name__}: {exc}")
        self.stage = stage
        self.handler = handler


class KernelLinkError(PyDotComputeError):
    """Two kernels cannot be linked (or unlinked) as asked, or a send or receive went to
    the inner end of a link; the text names the kernels and why."""


class QueueFullError(PyDotComputeError):
    """A queue or ring had no room (REJECT strategy, or a BLOCK send that timed out)."""


# asyncio.TimeoutError is the built-in TimeoutError from Python 3.11 on; on 3.10 it is a
# separate class, and code may catch either, so derive from both there.
_timeout_bases: tuple[type[BaseException], ...] = (asyncio.TimeoutError,)
if sys.version_info < (3, 11):  # pragma: no cover - Python 3.10 only
    _timeout_bases += (TimeoutError,)


class QueueTimeoutError(PyDotComputeError, *_timeout_bases):  # type: ignore[misc]
    """A receive found nothing before its timeout. Catchable as ``asyncio.TimeoutError``."""


class MessageSerializationError(PyDotComputeError):
    """A message could not be encoded."""


class MessageDeserializationError(PyDotComputeError):
    """Bytes could not be decoded into a message; the text says what was wrong."""


class AmbiguousMessageTypeError(PyDotComputeError, LookupError):
    """A bare class name asked of the message registry names several message classes;
    the text lists their registered names."""


class InvalidConfigurationError(PyDotComputeError, ValueError):
    """A configuration value is out of range or inconsistent."""


class BackendNotAvailableError(PyDotComputeError):
    """The requested backend cannot run here; the text gives the reason."""


class PlacementTimeoutError(BackendNotAvailableError):
    """A cluster kernel's resources exist but stayed taken for its whole
    ``launch_timeout``; the text names what it asked for and what holds it."""


class BufferSyncError(PyDotComputeError):
    """Both copies of a ``UnifiedBuffer`` were marked written since their last sync."""


class ItemFailedError(PyDotComputeError):
    """A flow item ran out of attempts; ``record`` is its dead-letter record."""

    def __init__(self, record: object) -> None:
        key = getattr(record, "key", "?")
        stage = getattr(record, "stage", "?")
        error = getattr(record, "error", "")
        super().__init__(f"item {key!r} failed at stage {stage!r}: {error}")
        self.record = record


class ItemFilteredError(PyDotComputeError):
    """A flow item was dropped by a stage that filters (a compiled handler returned
    False for it): it finished without an output. ``stage`` names that stage."""

    def __init__(self, key: str, stage: str = "") -> None:
        where = f" at stage {stage!r}" if stage else ""
        super().__init__(f"item {key!r} was filtered out{where}: it has no output")
        self.key = key
        self.stage = stage


class FlowClosedError(PyDotComputeError):
    """The flow was closed or cancelled; it takes no more work."""


class JournalError(PyDotComputeError):
    """A journal cannot be used: unreadable, corrupt, or written by a different graph."""


class JournalUnavailableError(JournalError):
    """The journal's server stayed unreachable for longer than its ``reconnect_timeout``;
    nothing committed is lost, and deploying the flow again resumes it."""


class NonDeterminismError(PyDotComputeError):
    """A replayed workflow made a different call than the one its journal recorded at the
    same position; the text names both."""


class WorkflowFailedError(PyDotComputeError):
    """A workflow was cancelled, or failed with an error that could not be stored as is."""


class WorkflowNotFoundError(PyDotComputeError, LookupError):
    """The journal has no workflow with that key."""
