"""Backend names → backend classes: the one place that says which class runs a kernel.

The runtime, the Ray actor that hosts a placed kernel, ``RingKernelConfig`` and
``@ring_kernel`` validation all ask here. The built-in backends (``host``, ``cpu``,
``cuda``) are named by import path and imported only when a kernel first runs on
them, so naming ``cuda`` costs nothing on a machine without numba-cuda until a cuda
kernel is launched.

A backend from another package registers with one call::

    register_backend("mine", MyBackend)            # a KernelBackend subclass
    register_backend("mine", "my_pkg.backend:MyBackend", handler="function")

or, without being imported first, with an entry point in the
``pydotcompute.backends`` group whose name is the backend's name and whose value is
``"module:Class"`` (looked up the first time an unknown name is asked for).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import threading
from importlib import metadata
from typing import TYPE_CHECKING, Literal

from pydotcompute.errors import BackendNotAvailableError, InvalidConfigurationError

if TYPE_CHECKING:
    from pydotcompute.backends.base import KernelBackend

__all__ = [
    "AUTO",
    "ENTRY_POINT_GROUP",
    "BackendEntry",
    "HandlerKind",
    "backend_class",
    "backend_entry",
    "backend_names",
    "cuda_status",
    "is_backend",
    "register_backend",
    "resolve_backend",
    "unregister_backend",
]

HandlerKind = Literal["actor", "function"]
"""What a backend runs: ``"actor"``, an ``async def kernel(ctx)``; or ``"function"``,
a plain ``def`` handler (``def handler(msg, out, state)`` for cpu and cuda)."""

AUTO = "auto"
"""Not a backend: a choice made at launch (cuda when a GPU is usable, else cpu)."""

ENTRY_POINT_GROUP = "pydotcompute.backends"
"""The entry-point group other packages declare their backends in."""

_HANDLER_KINDS = ("actor", "function")


@dataclasses.dataclass(frozen=True)
class BackendEntry:
    """One registered backend: its name, its class (or where to import it from) and
    what kind of handler it runs."""

    name: str
    target: str | type[KernelBackend]
    handler: HandlerKind

    def load(self) -> type[KernelBackend]:
        """The backend class, imported now if it was registered by path;
        ``BackendNotAvailableError`` when it cannot be imported here."""
        if not isinstance(self.target, str):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except ImportError as exc:
            raise BackendNotAvailableError(
                f"the {self.name!r} backend cannot be loaded: {exc}"
            ) from exc
        except AttributeError as exc:
            raise BackendNotAvailableError(
                f"the {self.name!r} backend names {self.target!r}, which does not exist"
            ) from exc
        return _checked_class(self.name, cls)


_BUILTIN = (
    BackendEntry("host", "pydotcompute.backends.host:HostKernelBackend", "actor"),
    BackendEntry("cpu", "pydotcompute.backends.cpu:CpuKernelBackend", "function"),
    BackendEntry("cuda", "pydotcompute.backends.cuda:CudaKernelBackend", "function"),
)

# Backend definitions, like @ring_kernel definitions: immutable entries any runtime may
# use. Nothing a runtime starts is kept here.
_ENTRIES: dict[str, BackendEntry] = {e.name: e for e in _BUILTIN}
_LOCK = threading.Lock()
_entry_points_read = False


def _checked_class(name: str, cls: object) -> type[KernelBackend]:
    from pydotcompute.backends.base import KernelBackend  # the base imports this module

    if not (inspect.isclass(cls) and issubclass(cls, KernelBackend)):
        raise InvalidConfigurationError(
            f"backend {name!r} must be a KernelBackend subclass, got {cls!r}"
        )
    return cls


def register_backend(
    name: str,
    backend: str | type[KernelBackend],
    *,
    handler: HandlerKind | None = None,
    replace: bool = False,
) -> BackendEntry:
    """Make ``name`` a backend kernels can be declared and launched on.

    ``backend`` is a ``KernelBackend`` subclass (its ``handler_kind`` says what it
    runs) or ``"module:Class"``, imported on first use (then ``handler`` says what it
    runs; default ``"function"``). A name already registered raises
    ``InvalidConfigurationError`` unless ``replace=True``; ``"auto"`` is reserved.
    """
    if not isinstance(name, str) or not name or name == AUTO:
        raise InvalidConfigurationError(f"a backend name must be a non-empty str, not {name!r}")
    if isinstance(backend, str):
        if ":" not in backend:
            raise InvalidConfigurationError(
                f"backend {name!r}: a path must read 'module:Class', got {backend!r}"
            )
        kind = handler if handler is not None else "function"
    else:
        cls = _checked_class(name, backend)
        kind = handler if handler is not None else cls.handler_kind
    if kind not in _HANDLER_KINDS:
        raise InvalidConfigurationError(
            f"backend {name!r}: handler must be 'actor' or 'function', got {kind!r}"
        )
    entry = BackendEntry(name, backend, kind)
    with _LOCK:
        if name in _ENTRIES and not replace:
            raise InvalidConfigurationError(
                f"backend {name!r} is already registered ({_ENTRIES[name].target!r}); "
                "pass replace=True to replace it"
            )
        _ENTRIES[name] = entry
    return entry


def unregister_backend(name: str) -> None:
    """Forget a backend registered with ``register_backend`` (built-ins stay)."""
    if any(e.name == name for e in _BUILTIN):
        raise InvalidConfigurationError(f"the built-in backend {name!r} cannot be removed")
    with _LOCK:
        _ENTRIES.pop(name, None)


def _read_entry_points() -> None:
    """Register the backends other packages declare, once per process."""
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _ENTRIES:
            continue  # registered by a call, or a built-in: that one wins
        cls = ep.load()
        register_backend(ep.name, cls)


def backend_entry(name: str) -> BackendEntry:
    """The entry of a registered backend; ``InvalidConfigurationError`` names the
    known ones when there is none."""
    entry = _ENTRIES.get(name)
    if entry is None:
        _read_entry_points()
        entry = _ENTRIES.get(name)
    if entry is None:
        raise InvalidConfigurationError(
            f"unknown backend {name!r}; expected one of "
            f"{', '.join(repr(n) for n in backend_names())} "
            f"or {AUTO!r}"
        )
    return entry


def backend_class(name: str) -> type[KernelBackend]:
    """The class that runs kernels of backend ``name`` (imported now if needed)."""
    return backend_entry(name).load()


def is_backend(name: object) -> bool:
    """True when ``name`` is a registered backend (``"auto"`` is not one)."""
    if not isinstance(name, str):
        return False
    try:
        backend_entry(name)
    except InvalidConfigurationError:
        return False
    return True


def backend_names() -> tuple[str, ...]:
    """The registered backends' names, built-ins first."""
    _read_entry_points()
    return tuple(_ENTRIES)


def cuda_status() -> tuple[bool, str]:
    """Whether the cuda backend can run here, and why (not). Probes lazily."""
    from pydotcompute.device.probe import probe_cuda

    status = probe_cuda()
    return bool(status.usable), status.reason


def resolve_backend(backend: str) -> str:
    """``auto`` → ``cuda`` when a GPU is usable, else ``cpu``; others unchanged."""
    if backend != AUTO:
        return backend
    usable, _ = cuda_status()
    return "cuda" if usable else "cpu"
