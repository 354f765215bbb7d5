"""How often and how soon a failed item is tried again."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``attempts`` runs per item and stage, with exponential back-off and jitter.

    The delay before run ``n + 1`` is ``min(max_backoff, backoff * factor ** (n - 1))``,
    scaled by a random factor in ``[1 - jitter, 1]`` so retries of many items spread out.
    Only exceptions that are instances of ``retry_on`` are retried; others go to the
    dead letters at once.
    """

    attempts: int = 1
    backoff: float = 0.05
    factor: float = 2.0
    max_backoff: float = 10.0
    jitter: float = 0.5
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        from pydotcompute.errors import InvalidConfigurationError

        if self.attempts < 1:
            raise InvalidConfigurationError(f"attempts must be >= 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0 or self.factor < 1:
            raise InvalidConfigurationError("backoff and max_backoff must be >= 0, factor >= 1")
        if not 0 <= self.jitter <= 1:
            raise InvalidConfigurationError(f"jitter must be in [0, 1], got {self.jitter}")

    def should_retry(self, attempt: int, exc: BaseException) -> bool:
        """True if run ``attempt`` (1-based) failed with ``exc`` and another run is allowed."""
        return attempt < self.attempts and isinstance(exc, self.retry_on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed run ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.backoff * self.factor ** (attempt - 1))
        return base * (1.0 - self.jitter * random.random())
