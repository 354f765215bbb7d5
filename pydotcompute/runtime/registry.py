"""``@ring_kernel``: turn a function into a ring kernel definition."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, overload

import numpy as np

from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.backends.options import BackendOptions, legacy_option_names
from pydotcompute.backends.registry import AUTO, backend_entry, backend_names
from pydotcompute.errors import InvalidConfigurationError, KernelNotFoundError
from pydotcompute.rings.backpressure import BackpressureStrategy

__all__ = ["RingKernelSpec", "ring_kernel", "registered_kernels", "lookup_kernel"]

log = logging.getLogger("pydotcompute.runtime")

F = TypeVar("F", bound=Callable[..., Any])

# Kernel *definitions* by id, as module-level functions are: immutable specs that any
# runtime may launch. Runtime state (queues, tasks, counters) never lives here.
_DEFINITIONS: dict[str, RingKernelSpec] = {}


@dataclasses.dataclass(frozen=True)
class RingKernelSpec:
    """What ``@ring_kernel`` recorded about a kernel: its function, types and config."""

    kernel_id: str
    func: Callable[..., Any]
    input_type: type | None
    output_type: type | None
    config: RingKernelConfig

    @property
    def is_async(self) -> bool:
        """True for ``async def`` actors (the host backend)."""
        return inspect.iscoroutinefunction(self.func)


def default_backend(func: Callable[..., Any]) -> str:
    """``host`` for ``async def`` actors, ``auto`` (cuda if usable, else cpu) otherwise."""
    return "host" if inspect.iscoroutinefunction(func) else "auto"


def check_backend_fits(kernel_id: str, func: Callable[..., Any], backend: str) -> None:
    """An ``async def`` runs only on a backend of actors (``host``); a plain ``def``
    handler only on a backend of functions (``cpu``, ``cuda``, ``auto`` ...)."""
    is_async = inspect.iscoroutinefunction(func)
    kind = "function" if backend == AUTO else backend_entry(backend).handler
    if is_async and kind != "actor":
        actors = [n for n in backend_names() if backend_entry(n).handler == "actor"]
        raise InvalidConfigurationError(
            f"kernel {kernel_id!r} is an async def actor, which runs on the "
            f"{' or '.join(repr(n) for n in actors)} backend only (got backend={backend!r})"
        )
    if not is_async and kind == "actor":
        raise InvalidConfigurationError(
            f"kernel {kernel_id!r}: the {backend!r} backend runs 'async def kernel(ctx)' "
            "actors; a plain 'def handler(msg, out, state)' runs on 'cpu', 'cuda' or 'auto'"
        )


@overload
def ring_kernel(func: F) -> F: ...
@overload
def ring_kernel(
    func: None = None,
    *,
    kernel_id: str | None = None,
    input_type: type | None = None,
    output_type: type | None = None,
    queue_size: int = 4096,
    backpressure: BackpressureStrategy | str = BackpressureStrategy.BLOCK,
    output_queue_size: int | None = None,
    backend: str | None = None,
    workers: int = 1,
    state: np.ndarray | None = None,
    num_gpus: float = 0,
    num_cpus: float = 0,
    resources: dict[str, float] | None = None,
    launch_timeout: float = 60.0,
    restart: str = "never",
    max_restarts: int = 3,
    restart_window: float = 60.0,
    restart_backoff: float = 0.1,
    auto_register: bool = True,
    options: BackendOptions | tuple[BackendOptions, ...] = (),
    **extra: Any,
) -> Callable[[F], F]: ...


def ring_kernel(
    func: Callable[..., Any] | None = None,
    *,
    kernel_id: str | None = None,
    input_type: type | None = None,
    output_type: type | None = None,
    queue_size: int = 4096,
    backpressure: BackpressureStrategy | str = BackpressureStrategy.BLOCK,
    output_queue_size: int | None = None,
    backend: str | None = None,
    workers: int = 1,
    state: np.ndarray | None = None,
    num_gpus: float = 0,
    num_cpus: float = 0,
    resources: dict[str, float] | None = None,
    launch_timeout: float = 60.0,
    restart: str = "never",
    max_restarts: int = 3,
    restart_window: float = 60.0,
    restart_backoff: float = 0.1,
    auto_register: bool = True,
    options: BackendOptions | tuple[BackendOptions, ...] = (),
    **extra: Any,
) -> Any:
    """Declare a ring kernel.

    On ``async def kernel(ctx)`` it is a host actor; on ``def handler(msg, out, state)``
    a compiled kernel for the ``cpu``/``cuda`` backends (``backend`` defaults to
    ``"auto"``). ``num_gpus``, ``num_cpus`` and ``resources`` are what the kernel's
    Ray actor reserves on a cluster runtime, waiting at most ``launch_timeout`` seconds
    for them (see ``RingKernelConfig``).
    ``restart="on-failure"`` has the runtime restart the kernel when its handler
    raises, on the same queues, up to ``max_restarts`` times within
    ``restart_window`` seconds, waiting ``restart_backoff`` seconds (doubling) before
    each (see ``RingKernelConfig``). The configuration is validated here, so a bad
    strategy or queue size fails at decoration time with ``InvalidConfigurationError``.
    ``input_queue_size`` (PyDotCompute's name) sets ``queue_size``. ``options`` are
    the backend's own settings (``CpuOptions``, ``CudaOptions``), checked here; other
    keywords (``grid_size``, ``block_size`` ...) are kept in ``config.extra``, and the
    former loose spelling of backend options (``batch=``, ``threads=`` ...) still
    works with a ``DeprecationWarning``. The function is
    returned unchanged, carrying its spec as ``__ring_kernel__``; with
    ``auto_register`` it can be launched by id alone.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise InvalidConfigurationError(f"@ring_kernel needs a function, got {fn!r}")
        kid = kernel_id if kernel_id is not None else fn.__name__
        if not isinstance(kid, str) or not kid:
            raise InvalidConfigurationError(f"kernel_id must be a non-empty str, got {kid!r}")
        chosen = backend if backend is not None else default_backend(fn)
        loose = dict(extra)
        input_queue_size = loose.pop("input_queue_size", None)  # PyDotCompute's name
        legacy = legacy_option_names(loose)
        if legacy:
            warnings.warn(
                f"kernel {kid!r}: {', '.join(legacy)} as loose keywords are deprecated; "
                "pass options=CpuOptions(...) or options=CudaOptions(...)",
                DeprecationWarning,
                stacklevel=3,
            )
        config = RingKernelConfig(
            queue_size=queue_size if input_queue_size is None else input_queue_size,
            backpressure=backpressure,  # type: ignore[arg-type]
            output_queue_size=output_queue_size,
            backend=chosen,
            workers=workers,
            state=state,
            num_gpus=num_gpus,
            num_cpus=num_cpus,
            resources={} if resources is None else resources,
            launch_timeout=launch_timeout,
            extra=loose,
            options=options if isinstance(options, tuple) else (options,),
            restart=restart,
            max_restarts=max_restarts,
            restart_window=restart_window,
            restart_backoff=restart_backoff,
        )
        check_backend_fits(kid, fn, chosen)
        spec = RingKernelSpec(kid, fn, input_type, output_type, config)
        fn.__ring_kernel__ = spec  # type: ignore[attr-defined]
        if auto_register:
            old = _DEFINITIONS.get(kid)
            if old is not None and old.func.__qualname__ != fn.__qualname__:
                log.warning(
                    "ring kernel id %r now names %s (was %s)",
                    kid,
                    fn.__qualname__,
                    old.func.__qualname__,
                )
            _DEFINITIONS[kid] = spec
        return fn

    if func is not None:
        return decorate(func)
    return decorate


def registered_kernels() -> list[str]:
    """Ids of the kernels declared with ``auto_register=True``."""
    return sorted(_DEFINITIONS)


def lookup_kernel(kernel_id: str) -> RingKernelSpec:
    """The registered spec of ``kernel_id``; ``KernelNotFoundError`` lists known ids."""
    try:
        return _DEFINITIONS[kernel_id]
    except KeyError:
        known = ", ".join(repr(k) for k in sorted(_DEFINITIONS)) or "none"
        raise KernelNotFoundError(
            f"no ring kernel {kernel_id!r} is registered (known: {known}); "
            "pass kernel_func to launch() or declare it with @ring_kernel"
        ) from None
