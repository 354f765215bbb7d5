"""The contract between the runtime and a backend: one ``KernelBackend`` per launched kernel."""

from __future__ import annotations

import abc
import asyncio
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal

import numpy as np

from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.errors import (
    InvalidConfigurationError,
    KernelFailedError,
    KernelLinkError,
    KernelStateError,
)
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.rings.host_ring import Backoff
from pydotcompute.telemetry.snapshot import ActiveTime, KernelTelemetry

__all__ = [
    "KernelBackend",
    "KernelBackend",
    "ErrorFactory",
    "ExitCallback",
    "FailureCallback",
    "SendTo",
    "kernel_failed",
    "kernel_record_dtype",
    "output_strategy",
    "renamed",
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


def kernel_failed(kernel_id: str, failure: BaseException) -> KernelFailedError:
    """A fresh ``KernelFailedError`` for one refusal by a kernel that failed with
    ``failure`` (each refusal gets its own, chained to the one cause)."""
    if isinstance(failure, KernelFailedError):
        exc = KernelFailedError(
            *failure.args, kernel_id=failure.kernel_id, failed_message=failure.failed_message
        )
        exc.__cause__ = failure.__cause__
    else:
        exc = KernelFailedError(f"kernel {kernel_id!r} failed: {failure!r}", kernel_id=kernel_id)
        exc.__cause__ = failure
    return exc


def output_strategy(config: RingKernelConfig) -> BackpressureStrategy:
    """The strategy of a kernel's output queue. REJECT protects senders into the
    kernel; the kernel's own output waits instead of failing the handler. DROP
    strategies apply to both directions."""
    if config.backpressure is BackpressureStrategy.REJECT:
        return BackpressureStrategy.BLOCK
    return config.backpressure


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
        "active_time",
        "launched_at",
        "_stopped",
    )

    backend: str = "?"
    handler_kind: ClassVar[Literal["actor", "function"]] = "function"
    """``"actor"`` for ``async def kernel(ctx)`` handlers, ``"function"`` for plain
    ``def`` handlers (see ``backends.registry``)."""
    restartable: bool = False
    """Whether ``restart`` can run the handler again on the same queues."""
    records: bool = False
    """Whether ``put_batch``/``get_batch`` carry numpy record arrays (else lists)."""
    placement: Any = None
    """Where a kernel placed on a cluster runs (a ``KernelPlacement``); None here."""
    poll: Callable[[Any], Any] | None = None
    """``poll(default)``: an output that is ready now, taken without waiting, else
    ``default``; None when a backend has nothing cheaper than ``get``. The runtime
    calls it inline on every receive, so it must cost no more than a dict lookup."""

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
        self.failure = None
        self.failed_input = None
        self.active_time = ActiveTime()
        self.launched_at = time.monotonic()
        self._stopped = False

    failure: BaseException | None
    failed_input: Any

    # -- what every backend shares --------------------------------------------------

    @property
    def output_strategy(self) -> BackpressureStrategy:
        """The output queue's strategy (see ``output_strategy``)."""
        return output_strategy(self.config)

    def failed_error(self) -> KernelFailedError:
        """A fresh error for a refusal after the kernel failed (``failure`` is set)."""
        assert self.failure is not None
        return kernel_failed(self.kernel_id, self.failure)

    def stopped_error(self) -> KernelStateError:
        """The error a refusal raises once the kernel was terminated."""
        return KernelStateError(f"kernel {self.kernel_id!r} is terminated")

    def _check_open(self) -> None:
        """Raise unless the kernel may still take input: it failed, or it stopped."""
        if self.failure is not None:
            raise self.failed_error()
        if self._stopped:
            raise self.stopped_error()

    def _track_active(self, active: bool) -> None:
        """Count ACTIVE time (the denominator of throughput)."""
        if active:
            self.active_time.start()
        else:
            self.active_time.pause()

    async def _wait_exit(self, exited: Callable[[], bool], timeout: float, why: str) -> None:
        """Wait, backing off, until ``exited()``; ``KernelStateError`` after ``timeout``
        seconds, saying ``why`` the handler may still run."""
        wait = Backoff(timeout)
        while not exited():
            if wait.expired():
                raise KernelStateError(
                    f"{self.backend} kernel {self.kernel_id!r} did not stop within "
                    f"{timeout} s ({why})"
                )
            await asyncio.sleep(max(wait.pause(), 1e-4))

    def _telemetry(self, state: str, processed: int, **fields: Any) -> KernelTelemetry:
        """A snapshot with the fields every backend fills the same way: identity,
        uptime and throughput over ACTIVE time; ``fields`` give the rest."""
        active = self.active_time.seconds
        return KernelTelemetry(
            kernel_id=self.kernel_id,
            backend=self.backend,
            state=state,
            messages_processed=processed,
            throughput=processed / active if active > 0 else 0.0,
            uptime_s=time.monotonic() - self.launched_at,
            **fields,
        )

    # -- what each backend implements -----------------------------------------------

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

    async def get_batch(self, max_items: int, timeout: float | None) -> Any:
        """Dequeue up to ``max_items`` outputs (at least one, or time out): a record
        array where ``records`` is True, else a list of messages. The default waits
        for one with ``get`` and takes what else is ready with ``try_get``."""
        out = [await self.get(timeout)]
        missing = object()
        while len(out) < max_items:
            try:
                msg = self.try_get(missing)
            except Exception:
                break  # closed after draining: return what was taken; the next call raises
            if msg is missing:
                break
            out.append(msg)
        return out

    async def drain_outputs(self) -> Any:
        """Take every output still queued, without waiting (after ``stop``): a record
        array where ``records`` is True, else a list."""
        out = []
        missing = object()
        while (msg := self.try_get(missing)) is not missing:
            out.append(msg)
        return out

    def link_refusal(self, peer: KernelBackend) -> str | None:
        """Why this kernel's outputs cannot go straight into ``peer``'s input
        (``RingKernelRuntime.link``), or None when ``relink_output(peer)`` can do it."""
        return f"{self.kernel_id!r} runs on {self.backend}, whose outputs cannot be linked"

    def link_path(self) -> str | None:
        """Where this kernel's outputs go while it feeds a link, in words (None when it
        feeds none)."""
        return None

    async def relink_output(self, peer: KernelBackend | None) -> None:
        """Send the loop's outputs straight into ``peer``'s input, or back to this
        kernel's own output queue (None)."""
        refusal = None if peer is None else self.link_refusal(peer)
        raise KernelLinkError(refusal or f"{self.kernel_id!r} ({self.backend}) cannot be linked")

    def read_state(self) -> np.ndarray:
        """A copy of the kernel's persistent state array."""
        raise TypeError(f"{self.backend} kernels have no state array")

    def input_position(self) -> int | None:
        """The input ring's ``published`` index: every record sent so far lies below
        it. None where the kernel cannot say when it is done with its input (see
        ``settled_through``; the default)."""
        return None

    def settled_through(self, upto: int) -> int | None:
        """Once every input record below position ``upto`` has been handled and its
        outputs have their places, the position below which those outputs all lie:
        in the output ring, or in the input ring of the kernel this one is linked to.
        None while one is still in hand, or where the kernel cannot say (the default).
        What tells a record the handler dropped from one whose output is late."""
        return None

    def outputs_taken(self) -> int | None:
        """The output ring's ``released`` index: outputs below it have been taken."""
        return None

    def stage_counts(self) -> dict[str, dict[str, int]] | None:
        """Per stage of a fused kernel: ``processed``, ``emitted``, ``dropped``; None
        for a kernel of one handler (every backend but a fused one)."""
        return None

    @abc.abstractmethod
    def telemetry(self, state: str) -> KernelTelemetry:
        """Read the loop's counters into a snapshot (never on the per-message path)."""


def renamed(module: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that answers each former name in ``names`` with the
    object of its new name, and a ``DeprecationWarning``."""

    def __getattr__(name: str) -> Any:
        new = names.get(name)
        if new is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} is now {new}", DeprecationWarning, stacklevel=2)
        return sys.modules[module].__dict__[new]

    return __getattr__


__getattr__ = renamed(__name__, {"KernelLoop": "KernelBackend"})


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
