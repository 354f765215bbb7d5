"""Durable throughput: the same 3-stage pipeline on an SQLite and a PostgreSQL journal.

Items/s and hops/s (committed stage completions) for each journal, measured in this one
run, and PostgreSQL / SQLite. PostgreSQL is a throwaway local server started like the
test fixture does (its binaries from PATH or /usr/lib/postgresql/*/bin, loopback only,
fsync and synchronous_commit on), or the server of ``--dsn``. With ``--workers N`` the
PostgreSQL run also has N processes share the journal (as N hosts would). Tables are
made in a new schema, dropped at the end.

    python benchmarks/journal.py [--items N] [--buffer B] [--dsn postgresql://...] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.coordinator import expected_sum, graph  # noqa: E402
from pydotcompute.coordinator import PostgresJournal, SQLiteJournal, deploy  # noqa: E402


async def run(n: int, buffer: int, journal: SQLiteJournal | PostgresJournal) -> tuple[float, int]:
    flow = await deploy(None, graph(buffer), name="pipeline", journal=journal)
    async with flow:
        t0 = time.perf_counter()
        for i in range(0, n, 1000):
            await flow.submit_many(range(i, min(n, i + 1000)))
        await flow.drain()
        elapsed = time.perf_counter() - t0
        total = 0
        async for _, v in flow.results():
            total += v
        assert total == expected_sum(n), "wrong results"
        assert flow.journal is not None
        return elapsed, flow.journal.hops


def drain_worker(dsn: str, name: str, buffer: int, go: float) -> None:
    """A second worker process: deploys the same graph and works until nothing is left."""

    async def main() -> None:
        await asyncio.sleep(max(0.0, go - time.time()))
        async with await deploy(None, graph(buffer), name=name, journal=PostgresJournal(dsn)) as f:
            await f.drain()

    asyncio.run(main())


async def shared(n: int, buffer: int, dsn: str, workers: int) -> float:
    """Items submitted up front, then ``workers`` processes drain them together."""
    name = f"shared-{workers}"
    async with await deploy(None, graph(buffer), name=name, journal=PostgresJournal(dsn)) as f:
        await f.submit_many(range(n))
    go = time.time() + 3.0  # every process imported and waiting
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=drain_worker, args=(dsn, name, buffer, go)) for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    elapsed = time.time() - go
    async with await deploy(None, graph(buffer), name=name, journal=PostgresJournal(dsn)) as f:
        assert f.status() == {"done": n}
    return elapsed


@contextlib.contextmanager
def postgres(dsn: str | None):
    """A new, empty schema: on the server of ``dsn``, else on a throwaway server."""
    from tests.postgres_server import fresh_schema, throwaway_server

    with contextlib.ExitStack() as stack:
        base = dsn or stack.enter_context(throwaway_server())
        yield stack.enter_context(fresh_schema(base))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--buffer", type=int, default=1024)
    ap.add_argument(
        "--dsn", default=None, help="a PostgreSQL database to use (default: a new server)"
    )
    ap.add_argument("--workers", type=int, default=0, help="also time N processes sharing it")
    args = ap.parse_args()
    n, b = args.items, args.buffer
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t, hops = await run(n, b, SQLiteJournal(os.path.join(tmp, "bench.db")))
        rows.append(("sqlite", t, hops))
    with postgres(args.dsn) as dsn:
        t, hops = await run(n, b, PostgresJournal(dsn))
        rows.append(("postgresql", t, hops))
        for name, t, hops in rows:
            print(
                f"{name:<11} {n:>7} items  {t:6.2f} s  {n / t:10,.0f} items/s  {hops / t:10,.0f} hops/s"
            )
        ratio = rows[0][1] / rows[1][1]
        print(f"postgresql / sqlite: {ratio:.2f}x items/s")
        if args.workers:
            # Items submitted first, then drained by 1 and by N processes (as hosts would).
            one = await shared(n, b, dsn, 1)
            many = await shared(n, b, dsn, args.workers)
            for w, t in ((1, one), (args.workers, many)):
                print(f"postgresql  {n:>7} items  {t:6.2f} s  {n / t:10,.0f} items/s  "
                      f"drained by {w} worker process(es)")  # fmt: skip
            print(f"{args.workers} workers / 1 worker: {one / many:.2f}x items/s")


if __name__ == "__main__":
    asyncio.run(main())
