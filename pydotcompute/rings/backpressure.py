"""What a ring does when a producer finds it full."""

from __future__ import annotations

import enum

from pydotcompute.errors import InvalidConfigurationError

__all__ = ["BackpressureStrategy"]


class BackpressureStrategy(enum.IntEnum):
    """Policy of a full ring. The integer values are part of the ring protocol."""

    BLOCK = 0
    """Wait for room; nothing is lost. A timed-out wait raises ``QueueFullError``."""
    REJECT = 1
    """Fail at once with ``QueueFullError``; the rejection is counted."""
    DROP_OLDEST = 2
    """Evict the oldest queued message to make room; the drop is counted."""
    DROP_NEWEST = 3
    """Discard the incoming message; the drop is counted."""

    @classmethod
    def parse(cls, value: BackpressureStrategy | str | int) -> BackpressureStrategy:
        """Accept a member, its name in any case (``"drop_oldest"``) or its value."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        known = ", ".join(m.name.lower() for m in cls)
        raise InvalidConfigurationError(
            f"unknown backpressure strategy {value!r}; expected one of: {known}"
        )
