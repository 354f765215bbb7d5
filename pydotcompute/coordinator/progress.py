"""A progress bar of a flow's items, for a person watching a terminal.

Shown on stderr only when stderr is a terminal: output sent to a file, a pipe or a log
never gets one, whatever ``FORCE_COLOR`` says. Rich is imported only when a bar is shown.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["ItemProgress", "stderr_is_terminal"]

REDRAW_S = 0.2  # counting items may be a journal query: at most this often


class ItemProgress:
    """``update(done, total)`` as work goes on, ``close()`` at the end (or ``with``)."""

    def __init__(self, description: str, enabled: bool = True) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._next = 0.0
        if not enabled or not stderr_is_terminal():
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("items"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True, force_terminal=True),
        )
        self._task = self._bar.add_task(description, total=None)
        self._bar.start()

    @property
    def shown(self) -> bool:
        """Whether a bar is on the terminal."""
        return self._bar is not None

    def due(self) -> bool:
        """Whether it is time to count again (always False when no bar is shown)."""
        if self._bar is None:
            return False
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + REDRAW_S
        return True

    def update(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=max(total, done))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ItemProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stderr_is_terminal() -> bool:
    """Whether a progress bar would be shown: stderr is a terminal."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without a real file
        return False
