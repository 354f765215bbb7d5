"""Riding out a journal outage: how long to keep trying, how long to wait between tries,
what to log, and the error that ends it.

A PostgreSQL restart takes about half a second and a failover some tens of seconds;
every journal operation (the writer's transactions, which carry the hops, claims and
heartbeats; the reads; opening the journal) keeps trying a lost connection for the
journal's ``reconnect_timeout`` (60 s by default) before giving up. Between tries it
waits with exponential backoff and full jitter, so that the workers of a fleet that lost
the same server do not all knock again at the same instant.

Each failed try is logged as a warning on ``pydotcompute.coordinator.journal``, the
recovery as info, the end as an error. The library installs no handler: the
application's logging configuration decides where the lines go.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from pydotcompute.errors import JournalError, JournalUnavailableError

__all__ = ["FIRST_PAUSE_S", "MAX_PAUSE_S", "Outage", "log"]

log = logging.getLogger("pydotcompute.coordinator.journal")

FIRST_PAUSE_S = 0.05  # a restart's downtime is about 0.5 s: the first tries come quickly
MAX_PAUSE_S = 2.0  # then at least one try every 2 s, so the end of an outage is seen soon


class Outage:
    """One stretch of time during which ``what`` (on ``where``) could not be reached.

    ``failed(exc)`` records a failed try and returns how long to wait before the next
    one, or raises ``JournalUnavailableError`` once ``limit`` seconds have passed since
    the first failure. ``over()`` logs the recovery.
    """

    def __init__(self, what: str, where: str, limit: float, first: BaseException) -> None:
        self.what = what
        self.where = where
        self.limit = limit
        self.started = time.monotonic()
        self.tries = 0
        self.last: BaseException = first

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def failed(self, exc: BaseException) -> float:
        self.tries += 1
        self.last = exc
        elapsed = self.elapsed
        if elapsed >= self.limit:
            err = self.error()
            log.error("%s", err)
            raise err
        ceiling = min(MAX_PAUSE_S, FIRST_PAUSE_S * 2 ** min(self.tries - 1, 16))
        pause = min(random.uniform(ceiling / 2, ceiling), self.limit - elapsed)
        log.warning(
            "%s (%s) unreachable for %.1f s (try %d: %s); trying again in %.2f s, "
            "for at most %.0f s in all",
            self.what,
            self.where,
            elapsed,
            self.tries,
            _reason(exc),
            pause,
            self.limit,
        )
        return pause

    async def wait(self, exc: BaseException) -> None:
        await asyncio.sleep(self.failed(exc))

    def wait_blocking(self, exc: BaseException) -> None:
        time.sleep(self.failed(exc))

    def over(self) -> None:
        log.info(
            "%s (%s) reachable again after %.1f s (%d failed tries)",
            self.what,
            self.where,
            self.elapsed,
            self.tries,
        )

    def error(self) -> JournalUnavailableError:
        err = JournalUnavailableError(
            f"journal {self.where} could not be reached for {self.elapsed:.1f} s "
            f"({self.tries} tries; last: {_reason(self.last)}). What was committed is safe: "
            "once the database is back, deploy the flow again (same name and journal) to "
            f"resume it; to wait out longer outages, raise reconnect_timeout (now "
            f"{self.limit:g} s)"
        )
        err.__cause__ = self.last
        return err


def _reason(exc: BaseException) -> str:
    """One line about ``exc``: the driver's own words, not our wrapper's."""
    if isinstance(exc, JournalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
