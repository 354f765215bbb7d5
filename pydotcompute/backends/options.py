"""Typed per-backend options: what ``@ring_kernel(options=...)`` passes to a backend.

Each backend that takes options declares them as a small frozen dataclass, checked
when it is made (at decoration, or at launch for ``launch(options=...)``): a bad value
raises ``InvalidConfigurationError`` naming the option. The former spelling, loose
keywords kept in ``RingKernelConfig.extra`` (``@ring_kernel(batch=512)``), still
works and is read into the same dataclass, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, TypeVar

from pydotcompute.errors import InvalidConfigurationError

__all__ = ["BackendOptions", "CpuOptions", "CudaOptions", "OPTION_TYPES"]

OptionsT = TypeVar("OptionsT", bound="BackendOptions")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Base of the options dataclasses; ``backend`` names the backend they are for."""

    backend: ClassVar[str] = "?"

    @classmethod
    def from_extra(cls: type[OptionsT], extra: dict[str, Any]) -> OptionsT | None:
        """The options that loose ``extra`` keywords spell, or None when they name
        none of this class's fields (keys of other backends are left alone)."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in extra.items() if k in names}
        return cls(**given) if given else None


def _positive_int(owner: str, name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidConfigurationError(f"{owner} option {name} must be an int >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CpuOptions(BackendOptions):
    """``cpu`` backend: ``batch`` records each worker takes from the input ring at a
    time; ``boundscheck`` compiles the handler with bounds checks (slower, for
    debugging index errors)."""

    backend: ClassVar[str] = "cpu"
    batch: int = 1024
    boundscheck: bool = False

    def __post_init__(self) -> None:
        _positive_int("cpu", "batch", self.batch)
        if not isinstance(self.boundscheck, bool):
            raise InvalidConfigurationError(
                f"cpu option boundscheck must be a bool, got {self.boundscheck!r}"
            )


@dataclasses.dataclass(frozen=True)
class CudaOptions(BackendOptions):
    """``cuda`` backend: ``threads`` per block and ``items_per_thread`` (defaults
    depend on the device or the simulator), at most ``blocks`` blocks (default: what
    fits), ``idle_sleep_ns`` the longest sleep of an idle loop. ``cuda_source`` and
    ``cuda_function`` make it a CUDA C++ kernel (see ``docs/cuda-backend.md``).
    ``device``: the GPU it runs on (an index into ``numba.cuda.gpus``; default the
    current device)."""

    backend: ClassVar[str] = "cuda"
    threads: int | None = None
    items_per_thread: int | None = None
    blocks: int | None = None
    idle_sleep_ns: int = 4000
    cuda_source: str | os.PathLike[str] | None = None
    cuda_function: str | None = None
    device: int | None = None

    def __post_init__(self) -> None:
        _positive_int("cuda", "threads", self.threads, optional=True)
        if self.device is not None and (
            isinstance(self.device, bool) or not isinstance(self.device, int) or self.device < 0
        ):
            raise InvalidConfigurationError(
                f"cuda option device must be a GPU index >= 0, got {self.device!r}"
            )
        _positive_int("cuda", "items_per_thread", self.items_per_thread, optional=True)
        _positive_int("cuda", "blocks", self.blocks, optional=True)
        _positive_int("cuda", "idle_sleep_ns", self.idle_sleep_ns)
        for name in ("cuda_source", "cuda_function"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise InvalidConfigurationError(
                    f"cuda option {name} must be a str, got {type(value).__name__}"
                )


OPTION_TYPES: tuple[type[BackendOptions], ...] = (CpuOptions, CudaOptions)
"""The built-in backends' options, read from loose ``extra`` keywords too."""


def legacy_option_names(extra: dict[str, Any]) -> list[str]:
    """The ``extra`` keys that spell a field of a built-in options class."""
    names = {f.name for t in OPTION_TYPES for f in dataclasses.fields(t)}
    return sorted(k for k in extra if k in names)
