"""Kernel configuration: what ``@ring_kernel`` records and ``launch(**overrides)`` adjusts."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pydotcompute.errors import InvalidConfigurationError
from pydotcompute.rings.backpressure import BackpressureStrategy

__all__ = ["RingKernelConfig", "BACKENDS"]

BACKENDS = ("host", "cpu", "cuda", "auto")


@dataclasses.dataclass(frozen=True)
class RingKernelConfig:
    """How one ring kernel runs. Validated on creation; invalid values raise
    ``InvalidConfigurationError``.

    ``queue_size`` bounds the input queue (for ring backends it is rounded up to a
    power of two, the ring capacity); ``output_queue_size`` bounds the output queue
    (default: ``queue_size``). ``backend`` is ``"host"`` for ``async def`` actors and
    ``"cpu"``, ``"cuda"`` or ``"auto"`` for compiled handlers. ``workers`` is the number
    of threads (cpu) consuming the input ring. ``state`` is the array a compiled
    handler keeps for its life.
    """

    queue_size: int = 4096
    backpressure: BackpressureStrategy = BackpressureStrategy.BLOCK
    output_queue_size: int | None = None
    backend: str = "host"
    workers: int = 1
    state: np.ndarray | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.queue_size, bool) or not isinstance(self.queue_size, int):
            raise InvalidConfigurationError(
                f"queue_size must be an int, got {type(self.queue_size).__name__}"
            )
        if self.queue_size < 1:
            raise InvalidConfigurationError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.output_queue_size is not None and (
            isinstance(self.output_queue_size, bool)
            or not isinstance(self.output_queue_size, int)
            or self.output_queue_size < 1
        ):
            raise InvalidConfigurationError(
                f"output_queue_size must be an int >= 1, got {self.output_queue_size!r}"
            )
        object.__setattr__(self, "backpressure", BackpressureStrategy.parse(self.backpressure))
        if self.backend not in BACKENDS:
            raise InvalidConfigurationError(
                f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}"
            )
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise InvalidConfigurationError(f"workers must be an int >= 1, got {self.workers!r}")
        if self.state is not None and not isinstance(self.state, np.ndarray):
            raise InvalidConfigurationError(
                f"state must be a numpy array, got {type(self.state).__name__}"
            )

    @property
    def effective_output_queue_size(self) -> int:
        """The output queue bound actually used."""
        return self.output_queue_size if self.output_queue_size is not None else self.queue_size

    def replace(self, **changes: Any) -> RingKernelConfig:
        """A copy with ``changes`` applied and validated; unknown names raise."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InvalidConfigurationError(
                f"unknown kernel option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **changes)
