"""PyDotCompute 0.2.0's module paths, answered from this package's own modules.

Code written for PyDotCompute imports from paths such as
``pydotcompute.ring_kernels.runtime`` or ``pydotcompute.exceptions``. ``MODULE_ALIASES``
maps each such path to the names it is used for here; the package's own layout stays
as it is. It also answers this package's own former paths (modules that moved), so
code importing them keeps working. ``install()`` (run when ``pydotcompute`` is imported) appends one finder
to ``sys.meta_path``. It is asked only after every other finder has failed, answers
only for the paths below, and imports nothing until one of them is imported; each
alias module is then made once, holding the very objects of the modules it names.

A source is ``"module"`` (every name in that module's ``__all__``) or
``"module:name"``. An alias that is the parent of others is a package, and it
imports its children before binding its own names, as a package's ``__init__``
would, so ``pydotcompute.ring_kernels.message`` (the module) never hides
``pydotcompute.ring_kernels.message`` (the decorator) once both were imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["MODULE_ALIASES", "install"]

MODULE_ALIASES: dict[str, tuple[str, ...]] = {
    # This package's own former paths.
    "pydotcompute.backends.probe": ("pydotcompute.device.probe",),
    "pydotcompute.backends.resident": ("pydotcompute.device.resident",),
    "pydotcompute.backends.ray_cluster": ("pydotcompute.cluster.ray_cluster",),
    "pydotcompute.backends.ray_loop": ("pydotcompute.cluster.ray_backend",),
    "pydotcompute.backends.ray_actor": ("pydotcompute.cluster.ray_actor",),
    "pydotcompute.core": ("pydotcompute.memory",),
    "pydotcompute.core.memory_pool": ("pydotcompute.memory.memory_pool",),
    "pydotcompute.core.unified_buffer": ("pydotcompute.memory.unified_buffer",),
    "pydotcompute.decorators": ("pydotcompute.runtime.registry:ring_kernel",),
    "pydotcompute.decorators.ring_kernel": ("pydotcompute.runtime.registry:ring_kernel",),
    "pydotcompute.exceptions": ("pydotcompute.errors",),
    "pydotcompute.ring_kernels": (
        "pydotcompute.runtime:RingKernelRuntime",
        "pydotcompute.runtime:KernelState",
        "pydotcompute.runtime:get_loop_info",
        "pydotcompute.messages:RingKernelMessage",
        "pydotcompute.messages:message",
    ),
    "pydotcompute.ring_kernels.lifecycle": (
        "pydotcompute.backends.host:KernelContext",
        "pydotcompute.runtime:KernelState",
        "pydotcompute.runtime:RingKernelConfig",
    ),
    "pydotcompute.ring_kernels.message": (
        "pydotcompute.messages:RingKernelMessage",
        "pydotcompute.messages:message",
        "pydotcompute.messages:deserialize_message",
        "pydotcompute.messages:get_message_type",
    ),
    "pydotcompute.ring_kernels.queue": ("pydotcompute.rings.backpressure:BackpressureStrategy",),
    "pydotcompute.ring_kernels.runtime": ("pydotcompute.runtime:RingKernelRuntime",),
}


def _children(alias: str) -> list[str]:
    return [a for a in MODULE_ALIASES if a.rpartition(".")[0] == alias]


def _names(sources: tuple[str, ...]) -> dict[str, Any]:
    names: dict[str, Any] = {}
    for source in sources:
        module_name, _, attr = source.partition(":")
        module = importlib.import_module(module_name)
        for name in [attr] if attr else module.__all__:
            names[name] = getattr(module, name)
    return names


class _AliasLoader(importlib.abc.Loader):
    """Fills an alias module with the objects its sources name."""

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        alias = module.__name__
        for child in _children(alias):
            importlib.import_module(child)
        names = _names(MODULE_ALIASES[alias])
        module.__dict__.update(names)
        module.__all__ = sorted(names)  # type: ignore[attr-defined]
        module.__doc__ = (
            f"PyDotCompute's ``{alias}``: {', '.join(sorted(names))}, from "
            f"{', '.join(s.partition(':')[0] for s in dict.fromkeys(MODULE_ALIASES[alias]))}."
        )


class AliasFinder:
    """Finds the modules of ``MODULE_ALIASES``, and nothing else."""

    pydotcompute_aliases = True  # how install() recognises one, even after a reload

    @staticmethod
    def find_spec(fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if fullname not in MODULE_ALIASES:
            return None
        return ModuleSpec(fullname, _AliasLoader(), is_package=bool(_children(fullname)))


def install() -> None:
    """Put the finder last on ``sys.meta_path``, once."""
    if not any(getattr(f, "pydotcompute_aliases", False) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())
