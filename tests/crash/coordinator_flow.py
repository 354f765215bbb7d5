"""A durable fan-out/join flow run in a child process by the crash and sharing tests.

``python coordinator_flow.py JOURNAL [LOG]`` resumes the flow on JOURNAL (an SQLite path or
a postgresql:// DSN) and runs it
until no item is active. Each stage run appends "stage value pid" to LOG. With
COORD_START_AT (a time.time() value) it waits until then before deploying.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from pydotcompute.coordinator import FanIn, FanOut, PostgresJournal, SQLiteJournal, deploy, stage

_log = None


def note(name: str, x: int) -> None:
    if _log is not None:
        _log.write(f"{name} {x} {os.getpid()}\n")


def parse(x: int) -> int:
    note("parse", x)
    return x


async def square(x: int) -> int:
    note("square", x)
    await asyncio.sleep(0.002)  # slow enough that every kill lands mid-flow
    return x * x


def negate(x: int) -> int:
    note("negate", x)
    return -x


def combine(parts: list[int]) -> int:
    note("combine", parts[1])
    return parts[0] + parts[1]


GRAPH = stage(parse) >> FanOut(square, negate, mode="broadcast") >> FanIn(combine)


def expected(x: int) -> int:
    return x * x - x


def journal(where: str) -> SQLiteJournal | PostgresJournal:
    if str(where).startswith("postgresql://"):
        return PostgresJournal(str(where), lease=2.0, poll=0.02)
    return SQLiteJournal(where, lease=2.0, poll=0.02)


async def main(path: str) -> None:
    start_at = float(os.environ.get("COORD_START_AT", "0"))  # lets two processes start together
    await asyncio.sleep(max(0.0, start_at - time.time()))
    flow = await deploy(None, GRAPH, name="crash", journal=journal(path))
    async with flow:
        await flow.drain()


if __name__ == "__main__":
    if len(sys.argv) > 2:
        _log = open(sys.argv[2], "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    asyncio.run(main(sys.argv[1]))
    print("drained", flush=True)
