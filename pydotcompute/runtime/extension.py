"""How the layers above the runtime (coordinator, workflows) hang things on it.

An extension is anything with a ``close()``: the runtime keeps it under a name and
closes it at shutdown, before its kernels terminate. The runtime never imports what it
holds, so it stays below the layers that use it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, runtime_checkable

__all__ = ["RuntimeExtension"]


@runtime_checkable
class RuntimeExtension(Protocol):
    """Something attached to a runtime with :meth:`RingKernelRuntime.attach`."""

    def close(self) -> Awaitable[None] | None:
        """Called once at runtime shutdown (awaited when it returns an awaitable)."""
