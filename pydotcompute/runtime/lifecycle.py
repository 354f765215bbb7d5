"""The kernel lifecycle state machine.

``CREATED -> LAUNCHED -> ACTIVE <-> DEACTIVATED -> TERMINATING -> TERMINATED``, plus
``FAILED`` when a kernel's loop raises and ``RESTARTING`` while a supervised kernel
(``restart="on-failure"``) waits out its back-off after a crash. A restart returns the
kernel to the state it had (LAUNCHED, ACTIVE or DEACTIVATED); its queues are kept
throughout, so sends are accepted and outputs stay receivable while it restarts.
"""

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
    RESTARTING = "restarting"

    @property
    def is_final(self) -> bool:
        """True for states a kernel never leaves."""
        return self in (KernelState.TERMINATED, KernelState.FAILED)


_RUNNING = frozenset({KernelState.LAUNCHED, KernelState.ACTIVE, KernelState.DEACTIVATED})
# Every running state can be terminated, or crash (and be restarted, or not).
_LEAVE = frozenset({KernelState.TERMINATING, KernelState.FAILED, KernelState.RESTARTING})
_ALLOWED: dict[KernelState, frozenset[KernelState]] = {
    KernelState.CREATED: frozenset({KernelState.LAUNCHED, KernelState.FAILED}),
    KernelState.LAUNCHED: _LEAVE | {KernelState.ACTIVE},
    KernelState.ACTIVE: _LEAVE | {KernelState.DEACTIVATED},
    KernelState.DEACTIVATED: _LEAVE | {KernelState.ACTIVE},
    # Back to the state it crashed in, given up on, or terminated during its back-off.
    KernelState.RESTARTING: _RUNNING | {KernelState.TERMINATING, KernelState.FAILED},
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
