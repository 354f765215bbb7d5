"""The contract between the runtime and a backend: one ``KernelBackend`` per launched kernel."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal

import numpy as np

from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.errors import InvalidConfigurationError
from pydotcompute.telemetry.snapshot import KernelTelemetry

__all__ = [
    "KernelBackend",
    "KernelLoop",
    "ErrorFactory",
    "ExitCallback",
    "FailureCallback",
    "SendTo",
    "kernel_record_dtype",
]

FailureCallback = Callable[[BaseException], None]
"""Called once per crash, on the event loop's thread, when a kernel's handler raises."""
ExitCallback = Callable[[], None]
"""Called when a kernel's handler returned on its own (the kernel is over)."""
SendTo = Callable[[str, Any, "float | None"], Awaitable[None]]
"""``send_to(kernel_id, message, timeout)``: how a kernel reaches another kernel."""
ErrorFactory = Callable[[], BaseException]


def _no_exit() -> None:
    """The default ``on_exit``: nobody is told."""


async def _no_send_to(kernel_id: str, msg: Any, timeout: float | None) -> None:
    from pydotcompute.errors import KernelNotFoundError

    raise KernelNotFoundError(f"kernel {kernel_id!r} is not reachable from this kernel")


class KernelBackend(abc.ABC):
    """One launched kernel on one backend: its queues and what runs its handler.

    The runtime owns the lifecycle state machine and calls these methods only in legal
    states; a loop never changes the kernel's state itself. When its handler raises,
    the loop stops running it, sets ``failed_input`` to the message (or record) the
    handler held, and reports the exception through ``on_failure`` (scheduled onto
    the event loop's thread when the crash happens elsewhere) once every output the
    handler had produced is queued. Its queues stay open: the runtime then either
    ``restart``s the handler on them or calls ``close_failed``. ``failure`` is the
    error that closed the loop for good (None while it may still run).
    """

    # What every backend holds lives in slots, out of the instance dict: a subclass's
    # per-message attributes then stay below the 30 at which CPython stops sharing
    # instance dict keys (and every attribute load gets slower).
    __slots__ = (
        "__dict__",
        "kernel_id",
        "func",
        "config",
        "input_type",
        "output_type",
        "on_failure",
        "send_to",
        "on_exit",
        "timed",
        "failure",
        "failed_input",
    )

    backend: str = "?"
    handler_kind: ClassVar[Literal["actor", "function"]] = "function"
    """``"actor"`` for ``async def kernel(ctx)`` handlers, ``"function"`` for plain
    ``def`` handlers (see ``backends.registry``)."""
    restartable: bool = False
    """Whether ``restart`` can run the handler again on the same queues."""

    def __init__(
        self,
        kernel_id: str,
        func: Callable[..., Any],
        config: RingKernelConfig,
        input_type: type | None,
        output_type: type | None,
        on_failure: FailureCallback,
        *,
        send_to: SendTo | None = None,
        on_exit: ExitCallback | None = None,
        telemetry: bool = True,
    ) -> None:
        """Every backend is made with these arguments (by the runtime, or by the Ray
        actor hosting a placed kernel): ``send_to`` reaches other kernels of the same
        runtime, ``on_exit`` is told when the handler returns on its own, and
        ``telemetry=False`` asks the backend to skip latency measurement."""
        self.kernel_id = kernel_id
        self.func = func
        self.config = config
        self.input_type = input_type
        self.output_type = output_type
        self.on_failure = on_failure
        self.send_to: SendTo = send_to if send_to is not None else _no_send_to
        self.on_exit: ExitCallback = on_exit if on_exit is not None else _no_exit
        self.timed = telemetry
        self.failure: BaseException | None = None
        self.failed_input: Any = None

    @abc.abstractmethod
    async def start(self) -> None:
        """Allocate queues/rings and start the loop, inactive (``launch``)."""

    @abc.abstractmethod
    def set_active(self, active: bool) -> None:
        """Start or pause delivery of input (``activate``/``deactivate``)."""

    async def restart(self) -> None:
        """Run the handler again after a crash, on the same queues, from its initial
        state, inactive. What was queued stays queued; the record that raised is not
        handled again."""
        raise NotImplementedError(f"{self.backend} kernels cannot be restarted")

    @abc.abstractmethod
    def close_failed(self, error: ErrorFactory) -> int:
        """The kernel failed for good: refuse input with ``error()``, wake every waiter,
        keep the outputs already produced receivable (then ``error()``), and discard
        the inputs still queued for the handler, counted as dropped, where the backend
        can reach them. Returns how many were discarded."""

    @abc.abstractmethod
    async def stop(self, timeout: float) -> None:
        """Ask the loop to exit and wait for it; force it after ``timeout`` seconds.
        Returns only when nothing of the loop runs any more."""

    @abc.abstractmethod
    async def put(self, msg: Any, timeout: float | None) -> None:
        """Enqueue one input message under the kernel's backpressure strategy."""

    def try_put(self, msg: Any) -> bool:
        """Enqueue without waiting if that is possible now; False means call ``put``.
        May raise ``QueueFullError`` (REJECT). The default always defers to ``put``."""
        return False

    def try_get(self, default: Any) -> Any:
        """Dequeue an output without waiting, or return ``default``."""
        return default

    @abc.abstractmethod
    async def get(self, timeout: float | None) -> Any:
        """Dequeue one output message; ``QueueTimeoutError`` when none came in time."""

    async def put_batch(self, records: np.ndarray, timeout: float | None) -> int:
        """Enqueue a numpy record array; returns how many were accepted."""
        raise TypeError(f"{self.backend} kernels take message objects, not record batches")

    async def get_batch(self, max_items: int, timeout: float | None) -> np.ndarray:
        """Dequeue up to ``max_items`` output records (at least one, or time out)."""
        raise TypeError(f"{self.backend} kernels return message objects, not record batches")

    def read_state(self) -> np.ndarray:
        """A copy of the kernel's persistent state array."""
        raise TypeError(f"{self.backend} kernels have no state array")

    @abc.abstractmethod
    def telemetry(self, state: str) -> KernelTelemetry:
        """Read the loop's counters into a snapshot (never on the per-message path)."""


KernelLoop = KernelBackend
"""The former name of ``KernelBackend``."""


def kernel_record_dtype(t: Any, role: str, kernel_id: str, backend: str) -> np.dtype:
    """The record dtype a ring kernel's ``input``/``output`` type stands for: a numpy
    dtype itself, or a message class's ``__record_dtype__`` (which raises, naming the
    field, for a message with variable-size fields)."""
    if isinstance(t, np.dtype):
        return t
    dt = getattr(t, "__record_dtype__", None) if t is not None else None
    if not isinstance(dt, np.dtype):
        raise InvalidConfigurationError(
            f"{backend} kernel {kernel_id!r} needs an {role} type with a record layout "
            f"(a message of fixed-size fields, or a numpy dtype), got {t!r}"
        )
    return dt
