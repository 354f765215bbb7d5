"""The kernel lifecycle state machine."""

from __future__ import annotations

import enum

from pydotcompute.errors import KernelStateError

__all__ = ["KernelState", "check_transition"]


class KernelState(enum.Enum):
    """Where a kernel is in its life."""

    CREATED = "created"
    LAUNCHED = "launched"
    ACTIVE = "active"
    DEACTIVATED = "deactivated"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        """True for states a kernel never leaves."""
        return self in (KernelState.TERMINATED, KernelState.FAILED)


_ALLOWED: dict[KernelState, frozenset[KernelState]] = {
    KernelState.CREATED: frozenset({KernelState.LAUNCHED, KernelState.FAILED}),
    KernelState.LAUNCHED: frozenset(
        {KernelState.ACTIVE, KernelState.TERMINATING, KernelState.FAILED}
    ),
    KernelState.ACTIVE: frozenset(
        {KernelState.DEACTIVATED, KernelState.TERMINATING, KernelState.FAILED}
    ),
    KernelState.DEACTIVATED: frozenset(
        {KernelState.ACTIVE, KernelState.TERMINATING, KernelState.FAILED}
    ),
    KernelState.TERMINATING: frozenset({KernelState.TERMINATED, KernelState.FAILED}),
    KernelState.TERMINATED: frozenset(),
    KernelState.FAILED: frozenset(),
}


def check_transition(kernel_id: str, current: KernelState, target: KernelState) -> None:
    """Raise ``KernelStateError`` unless ``current -> target`` is a legal transition."""
    if target not in _ALLOWED[current]:
        raise KernelStateError(
            f"kernel {kernel_id!r} cannot go from {current.name} to {target.name}"
        )
