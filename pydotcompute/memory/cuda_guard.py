"""Turn "CUDA is missing" failures inside CuPy calls into ``BackendNotAvailableError``."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType

from pydotcompute.device.probe import ask_for_eager_module_loading, probe_cuda
from pydotcompute.errors import BackendNotAvailableError

__all__ = ["import_cupy", "cuda_required"]


def import_cupy() -> ModuleType:
    """Import CuPy, or raise ``BackendNotAvailableError`` with the probe's reason.

    CuPy may be what initialises CUDA in the process: eager module loading is asked
    for first, so kernels can still launch beside a resident ring kernel."""
    ask_for_eager_module_loading()
    with cuda_required():
        return importlib.import_module("cupy")


@contextlib.contextmanager
def cuda_required() -> Iterator[None]:
    """Run CuPy calls; if one fails because CUDA is not usable here, say why.

    The probe runs only after a failure, so working code pays nothing for it. A
    failure on a machine where CUDA *is* usable is a genuine error and propagates.
    """
    try:
        yield
    except BackendNotAvailableError:
        raise
    except Exception as exc:
        found = probe_cuda()
        if found.usable:
            raise
        raise BackendNotAvailableError(f"CUDA is not usable: {found.reason}") from exc
