"""Durable workflows on SQLite: 10 000 workflows of 3 activity calls each.

Prints workflows/s and journaled calls/s, and, as the baseline measured in the same run,
the same workflow body run as plain coroutines without a journal. Goal: >= 1 000
durable workflows/s on a 2-core machine.

    python benchmarks/workflows.py [--workflows 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from pydotcompute import RingKernelRuntime
from pydotcompute.workflows import activity, workflow


async def add_one(x: int) -> int:
    return x + 1


step = activity(add_one)


@workflow(name="bench-three-calls")
async def three(x: int, ctx) -> int:  # noqa: ANN001
    x = await ctx.call(step, x)
    x = await ctx.call(step, x)
    return await ctx.call(step, x)


async def plain(x: int) -> int:
    x = await add_one(x)
    x = await add_one(x)
    return await add_one(x)


async def durable(n: int, path: str) -> tuple[float, int]:
    async with RingKernelRuntime(journal=path) as rt:
        engine = rt.workflows()
        t0 = time.perf_counter()
        keys = await asyncio.gather(*(rt.start_workflow(three, i, key=f"w{i}") for i in range(n)))
        out = await asyncio.gather(*(rt.workflow_result(k) for k in keys))
        elapsed = time.perf_counter() - t0
        assert out == [i + 3 for i in range(n)], "wrong results"
        return elapsed, engine.store.commits


async def baseline(n: int) -> float:
    t0 = time.perf_counter()
    out = await asyncio.gather(*(plain(i) for i in range(n)))
    assert out == [i + 3 for i in range(n)]
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=10_000)
    args = parser.parse_args()
    n = args.workflows
    with tempfile.TemporaryDirectory() as tmp:
        elapsed, commits = asyncio.run(durable(n, os.path.join(tmp, "bench.db")))
    base = asyncio.run(baseline(n))
    print(f"durable, SQLite: {n} workflows x 3 calls in {elapsed:.2f} s")
    print(f"  {n / elapsed:,.0f} workflows/s, {3 * n / elapsed:,.0f} calls/s, {commits} commits")
    print(f"baseline, plain coroutines without a journal: {n / base:,.0f} workflows/s")
    print(f"durable / baseline: {base / elapsed:.3f}")
    print(f"goal >= 1 000 workflows/s: {'met' if n / elapsed >= 1000 else 'NOT met'}")


if __name__ == "__main__":
    main()
