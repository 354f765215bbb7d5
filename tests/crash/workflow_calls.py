"""Durable workflows of five calls, run in a child process by the workflow crash tests.

``python workflow_calls.py JOURNAL LOG N [SLOW_POS]`` starts (or resumes) workflows
``w0 .. w{N-1}`` on JOURNAL, waits for all of them and prints their results as JSON.
Every activity run appends "key position" to LOG before it works. With SLOW_POS, the call
at that position sleeps for a long time (so a test can kill the process while it runs).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys

from pydotcompute import RingKernelRuntime
from pydotcompute.workflows import activity, workflow

LOG = -1  # set by the command line, never at import
SLOW = -1


def expected(x: int) -> int:
    """What ``five(x)`` returns, computed without the journal."""
    v = x * 3 + 0
    v = v * 3 + 1
    a, b = v * 3 + 2, v * 3 + 3
    return (a + b) * 3 + 4


@activity
async def step(key: str, pos: int, v: int) -> int:
    os.write(LOG, f"{key} {pos}\n".encode())  # one write: whole lines even when killed
    await asyncio.sleep(30.0 if pos == SLOW else random.uniform(0.002, 0.008))
    return v * 3 + pos


@workflow(name="five")
async def five(x: int, ctx) -> int:  # noqa: ANN001 - the context
    k = ctx.key
    v = await ctx.call(step, k, 0, x)
    v = await ctx.call(step, k, 1, v)
    a, b = await ctx.all(ctx.call(step, k, 2, v), ctx.call(step, k, 3, v))
    return await ctx.call(step, k, 4, a + b)


async def main(path: str, n: int) -> None:
    async with RingKernelRuntime(journal=path) as rt:
        keys = [await rt.start_workflow(five, j, key=f"w{j}") for j in range(n)]
        print(json.dumps([await rt.workflow_result(k) for k in keys]), flush=True)


if __name__ == "__main__":
    LOG = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    SLOW = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    asyncio.run(main(sys.argv[1], int(sys.argv[3])))
