"""Lock-free rings: the protocol layout, host operations compiled with Numba, ``HostRing``.

Names are loaded on first use so that importing the package (for example for
``BackpressureStrategy``) does not import Numba.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BackpressureStrategy", "HostRing", "RingCounters", "RingSide"]

_HOMES = {
    "BackpressureStrategy": "pydotcompute.rings.backpressure",
    "HostRing": "pydotcompute.rings.host_ring",
    "RingCounters": "pydotcompute.rings.host_ring",
    "RingSide": "pydotcompute.rings.layout",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(home), name)
