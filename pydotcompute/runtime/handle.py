"""``KernelHandle``: what ``RingKernelRuntime.launch`` returns, a live view of one launch."""

from __future__ import annotations

from typing import Any, Protocol

from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.runtime.lifecycle import KernelState

__all__ = ["KernelHandle"]


class _Launch(Protocol):
    """What the runtime keeps about one launch (its ``_Kernel`` record)."""

    kernel_id: str
    state: KernelState
    error: BaseException | None
    failed_input: Any
    spec: Any
    kernel_backend: Any


class KernelHandle:
    """One launched kernel: its id, configuration and types, and its current state.

    ``state`` and ``error`` are read from the runtime each time, so a handle kept
    across ``activate``/``deactivate``/``terminate`` stays current. A handle belongs
    to the launch that returned it: once that kernel is terminated and another is
    launched under the same id, the old handle keeps showing the old launch. Act on
    the kernel through the runtime (``rt.send(handle.kernel_id, msg)``).
    """

    __slots__ = ("_launch",)

    def __init__(self, launch: _Launch) -> None:
        self._launch = launch

    @property
    def kernel_id(self) -> str:
        """The kernel's id in its runtime."""
        return self._launch.kernel_id

    @property
    def state(self) -> KernelState:
        """The kernel's lifecycle state now."""
        return self._launch.state

    @property
    def config(self) -> RingKernelConfig:
        """The configuration it was launched with (decorator options and overrides)."""
        return self._launch.spec.config  # type: ignore[no-any-return]

    @property
    def input_type(self) -> type | None:
        """The message type it takes, if one was declared."""
        return self._launch.spec.input_type  # type: ignore[no-any-return]

    @property
    def output_type(self) -> type | None:
        """The message type it sends, if one was declared."""
        return self._launch.spec.output_type  # type: ignore[no-any-return]

    @property
    def backend(self) -> str:
        """Where it runs: ``host``, ``cpu`` or ``cuda``."""
        return self._launch.kernel_backend.backend  # type: ignore[no-any-return]

    @property
    def failed_input(self) -> Any:
        """The message (or record) its handler last raised on, where known; kept
        after a restart, until the next failure."""
        return self._launch.failed_input

    def stage_counts(self) -> dict[str, dict[str, int]] | None:
        """A fused kernel's counts per stage (``processed``, ``emitted``, ``dropped``);
        None for a kernel of one handler."""
        return self._launch.kernel_backend.stage_counts()  # type: ignore[no-any-return]

    def input_position(self) -> int | None:
        """The input ring's ``published`` index (every record sent so far lies below
        it); None for a kernel that cannot say when it is done with its input."""
        return self._launch.kernel_backend.input_position()  # type: ignore[no-any-return]

    def settled_through(self, upto: int) -> int | None:
        """Once every input below position ``upto`` is handled and its outputs have
        their places, the position (in the output ring, or the linked kernel's input
        ring) below which those outputs lie; None until then, or where it cannot say."""
        return self._launch.kernel_backend.settled_through(upto)  # type: ignore[no-any-return]

    def outputs_taken(self) -> int | None:
        """The output ring's ``released`` index: outputs below it have been taken."""
        return self._launch.kernel_backend.outputs_taken()  # type: ignore[no-any-return]

    @property
    def error(self) -> BaseException | None:
        """What made it FAILED, if it failed."""
        return self._launch.error

    def __repr__(self) -> str:
        return f"KernelHandle({self.kernel_id!r}, {self.state.name}, backend={self.backend!r})"
