"""Where a kernel placed on a cluster runs. A leaf: it imports nothing of the package."""

from __future__ import annotations

import dataclasses

__all__ = ["KernelPlacement"]


@dataclasses.dataclass(frozen=True)
class KernelPlacement:
    """Where a cluster kernel runs: its Ray node, actor, process and GPUs."""

    node_id: str
    node_ip: str
    actor_id: str
    pid: int
    gpu_ids: tuple[str, ...]
    backend: str
