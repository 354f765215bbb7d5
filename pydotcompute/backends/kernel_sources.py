"""Where the CUDA C++ sources live, and reading them for NVRTC/CuPy ``RawModule``.

The ``.cu``/``.cuh`` files sit in the top-level ``kernels/`` folder of a source
checkout; a wheel ships them as ``pydotcompute/kernels/``. Both are found without
configuration, the installed copy first.
"""

from __future__ import annotations

import importlib.resources
import pathlib
import re

from pydotcompute.errors import InvalidConfigurationError

__all__ = ["kernels_dir", "kernel_files", "read_kernel_source", "nvrtc_options"]

_QUOTED_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)


def kernels_dir() -> pathlib.Path:
    """The folder holding the kernel sources (installed package first, then checkout)."""
    package = importlib.resources.files("pydotcompute")
    installed = package / "kernels"
    if installed.is_dir() and isinstance(installed, pathlib.Path):
        return installed
    checkout = pathlib.Path(str(package)).parent / "kernels"
    if checkout.is_dir():
        return checkout
    raise InvalidConfigurationError(
        f"CUDA kernel sources not found in {installed} or {checkout}; reinstall pydotcompute"
    )


def kernel_files() -> tuple[str, ...]:
    """Names of the CUDA sources (``.cu`` and ``.cuh``), sorted."""
    return tuple(sorted(p.name for p in kernels_dir().iterdir() if p.suffix in (".cu", ".cuh")))


def read_kernel_source(name: str, *, inline_includes: bool = True) -> str:
    """The text of kernel source ``name`` (e.g. ``"stream_stats.cu"``).

    With ``inline_includes`` each ``#include "x"`` of a file in the kernels folder is
    replaced by that file's text (once per file), so the result compiles with no
    include path for our own headers (CuPy ``RawModule(code=...)`` as it is).
    """
    return _read(name, inline_includes, set())


def nvrtc_options() -> tuple[str, ...]:
    """Compiler options for sources read with ``inline_includes=False``: our include
    folder. (CuPy adds the CUDA C++ standard library, ``cuda/atomic``, itself; the
    sources need C++17, NVRTC's default.)"""
    return (f"-I{kernels_dir()}",)


def _read(name: str, inline: bool, seen: set[str]) -> str:
    path = kernels_dir() / name
    if pathlib.Path(name).name != name or not path.is_file():
        raise InvalidConfigurationError(f"no kernel source {name!r} in {kernels_dir()}")
    text = path.read_text(encoding="utf-8")
    if not inline:
        return text
    seen.add(name)
    # Inlined text is no longer a header of its own; NVRTC warns about the pragma.
    text = _PRAGMA_ONCE.sub("", text)

    def include(match: re.Match[str]) -> str:
        header = match.group(1)
        if not (kernels_dir() / header).is_file():
            return match.group(0)
        if header in seen:
            return f"// {header}: already included above"
        return _read(header, inline, seen)

    return _QUOTED_INCLUDE.sub(include, text)
