"""Log lines about many items without one line per item.

The library installs no handler: its records go to ``logging.getLogger("pydotcompute")``
and its children (``pydotcompute.coordinator``, ``pydotcompute.workflows``, ...), where
the application's logging configuration decides what becomes of them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Hashable
from typing import Any

__all__ = ["LogThrottle"]


class LogThrottle:
    """At most one line per kind of event (``key``) every ``interval`` seconds; the lines
    held back in between are counted, and the next line (or :meth:`flush`) says how many.

    A thousand items failing the same way in a second make two lines, not a thousand,
    and no count is lost. One per flow or engine: nothing is shared between them.
    """

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[Hashable, float] = {}
        self._held: Counter[Hashable] = Counter()
        self._levels: dict[Hashable, tuple[int, str, tuple[Any, ...]]] = {}

    def log(self, level: int, key: Hashable, msg: str, *args: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] += 1
            self._levels[key] = (level, msg, args)  # the latest, for flush
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        self._levels.pop(key, None)
        if held:
            msg += " (and %d more like it in the %.0f s before)"
            args = (*args, held, now - last)  # type: ignore[operator]
        self.logger.log(level, msg, *args)

    def flush(self) -> None:
        """Say what is still held back (at close): one line per kind of event."""
        now = time.monotonic()
        for key, held in list(self._held.items()):
            level, msg, args = self._levels.pop(key)
            self.logger.log(
                level,
                msg + " (the last of %d like it in the %.0f s before)",
                *args,
                held,
                now - self._last[key],
            )
        self._held.clear()
