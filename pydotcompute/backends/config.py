"""Kernel configuration: what ``@ring_kernel`` records and ``launch(**overrides)`` adjusts."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import numpy as np

from pydotcompute.backends.options import OPTION_TYPES, BackendOptions
from pydotcompute.backends.registry import AUTO, backend_entry
from pydotcompute.errors import InvalidConfigurationError
from pydotcompute.rings.backpressure import BackpressureStrategy

__all__ = ["RingKernelConfig", "BACKENDS", "RESTART_POLICIES", "MAX_RESTART_BACKOFF_S"]

OptionsT = TypeVar("OptionsT", bound=BackendOptions)

BACKENDS = ("host", "cpu", "cuda", "auto")
"""The built-in backends and ``auto``; ``backends.registry`` knows every registered one."""
RESTART_POLICIES = ("never", "on-failure")
MAX_RESTART_BACKOFF_S = 30.0
"""The longest wait before a restart, however many came before it in the window."""


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

    ``num_gpus``, ``num_cpus`` and ``resources`` say what a kernel needs when its
    runtime places kernels on a Ray cluster (``RingKernelRuntime(cluster=...)``): the
    kernel's Ray actor reserves them, so ``resources={"node_a": 1}`` pins it to the
    nodes that offer that custom resource. They are ignored by a runtime without a
    cluster, so one kernel definition runs in both. ``launch_timeout`` is how long a
    cluster launch waits for a node with those resources free (and for the actor's
    process to start) before it fails with ``PlacementTimeoutError``, naming what it
    asked for and what holds it.

    ``options`` are a backend's own settings, typed (``CpuOptions``, ``CudaOptions``;
    one per backend, so a kernel declared ``auto`` may carry both); ``extra`` keeps
    the former loose keywords, still read, and anything a backend does not know.

    ``restart`` is the supervision policy: ``"never"`` (default: a kernel whose
    handler raises goes FAILED) or ``"on-failure"`` (it is restarted on the same
    queues, nothing queued or produced is lost). ``max_restarts`` restarts are
    allowed within any ``restart_window`` seconds (``-1``: no limit); one more crash
    in that window leaves it FAILED. The first restart waits ``restart_backoff``
    seconds, each further one in the window twice as long as the one before (at
    most ``MAX_RESTART_BACKOFF_S``).
    """

    queue_size: int = 4096
    backpressure: BackpressureStrategy = BackpressureStrategy.BLOCK
    output_queue_size: int | None = None
    backend: str = "host"
    workers: int = 1
    state: np.ndarray | None = None
    num_gpus: float = 0
    num_cpus: float = 0
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    launch_timeout: float = 60.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    options: tuple[BackendOptions, ...] = ()
    restart: str = "never"
    max_restarts: int = 3
    restart_window: float = 60.0
    restart_backoff: float = 0.1

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
        if self.backend != AUTO:
            backend_entry(self.backend)  # raises, naming the registered backends
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise InvalidConfigurationError(f"workers must be an int >= 1, got {self.workers!r}")
        if self.state is not None and not isinstance(self.state, np.ndarray):
            raise InvalidConfigurationError(
                f"state must be a numpy array, got {type(self.state).__name__}"
            )
        _check_amount("num_gpus", self.num_gpus)
        _check_amount("num_cpus", self.num_cpus)
        if not isinstance(self.resources, dict):
            raise InvalidConfigurationError(
                f"resources must be a dict of name -> amount, got {type(self.resources).__name__}"
            )
        for name, amount in self.resources.items():
            if not isinstance(name, str) or not name:
                raise InvalidConfigurationError(
                    f"resource names must be non-empty str, got {name!r}"
                )
            if name in ("CPU", "GPU"):
                raise InvalidConfigurationError(
                    f"resources may not name {name!r}; use num_{name.lower()}s instead"
                )
            _check_amount(f"resources[{name!r}]", amount)
        object.__setattr__(
            self, "resources", dict(self.resources)
        )  # the caller's dict stays theirs
        _check_amount("launch_timeout", self.launch_timeout)
        if not self.launch_timeout > 0:
            raise InvalidConfigurationError(
                f"launch_timeout must be a number of seconds > 0, got {self.launch_timeout!r}"
            )
        self._check_restart()
        self._check_options()

    def _check_options(self) -> None:
        given = self.options
        if isinstance(given, BackendOptions):
            given = (given,)
        if not isinstance(given, (tuple, list)) or not all(
            isinstance(o, BackendOptions) for o in given
        ):
            raise InvalidConfigurationError(
                "options must be backend options (CpuOptions(...), CudaOptions(...)) or a "
                f"tuple of them, got {self.options!r}"
            )
        kinds = [type(o).__name__ for o in given]
        if len(set(kinds)) != len(kinds):
            raise InvalidConfigurationError(f"options names one backend twice: {kinds}")
        object.__setattr__(self, "options", tuple(given))
        for kind in OPTION_TYPES:  # the former spelling, checked as strictly
            kind.from_extra(self.extra)

    def options_for(self, kind: type[OptionsT]) -> OptionsT:
        """This kernel's options of type ``kind``: those given in ``options``, else
        those spelled by loose ``extra`` keywords, else the defaults."""
        for given in self.options:
            if isinstance(given, kind):
                return given
        from_extra = kind.from_extra(self.extra)
        return from_extra if from_extra is not None else kind()

    def _check_restart(self) -> None:
        if self.restart not in RESTART_POLICIES:
            raise InvalidConfigurationError(
                f"restart must be one of {', '.join(map(repr, RESTART_POLICIES))}, "
                f"got {self.restart!r}"
            )
        n = self.max_restarts
        if isinstance(n, bool) or not isinstance(n, int) or n < -1:
            raise InvalidConfigurationError(
                f"max_restarts must be an int >= 0, or -1 for no limit, got {n!r}"
            )
        _check_amount("restart_backoff", self.restart_backoff)
        _check_amount("restart_window", self.restart_window)
        if not self.restart_window > 0:
            raise InvalidConfigurationError(
                f"restart_window must be > 0 seconds, got {self.restart_window!r}"
            )

    def restart_delay(self, restarts_in_window: int) -> float:
        """Seconds to wait before restart number ``restarts_in_window`` (1-based) of the
        current window: ``restart_backoff`` doubled for each restart before it."""
        delay = self.restart_backoff * 2.0 ** max(0, restarts_in_window - 1)
        return float(min(delay, MAX_RESTART_BACKOFF_S))

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


def _check_amount(what: str, value: Any) -> None:
    """A resource amount is a finite int or float >= 0 (Ray accepts fractions)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value >= 0
        or value == float("inf")
    ):
        raise InvalidConfigurationError(f"{what} must be a number >= 0, got {value!r}")
