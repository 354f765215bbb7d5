"""A durable flow whose three ``cpu`` kernel stages fuse (or, with ``linked``, are
linked), run in a child process by the kernel-chain crash test.

``python kernel_chain_flow.py JOURNAL fused|linked`` resumes the flow on JOURNAL (an
SQLite path), prints "running" once deployed and runs until no item is active.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np

from pydotcompute import RingKernelRuntime, message
from pydotcompute.coordinator import Flow, SQLiteJournal, deploy, stage

KERNELS = ("a", "b", "c")


@message
class Num:
    x: np.int64


def inc(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x + 1
    return True


async def make(x: int) -> Num:
    await asyncio.sleep(0.002)  # slow enough that every kill lands mid-flow
    return Num(x=x)


def unwrap(m: Num) -> int:
    return int(m.x)


def graph(variant: str):  # type: ignore[no-untyped-def]
    fuse = variant == "fused"
    chain = stage(make)
    for kid in KERNELS:
        chain = chain >> stage(kid, fuse=fuse)
    return chain >> stage(unwrap)


def expected(x: int) -> int:
    return x + 3


def check_plan(flow: Flow, variant: str) -> None:
    """Fail loudly unless the kernel stages run as the variant says."""
    report = flow.explain()
    fused = [s.stages for s in report.fused]
    linked = [s.stages for s in report.linked]
    want = [KERNELS]
    if variant == "fused" and (fused != want or linked):
        raise SystemExit(f"expected one fused segment {want}, got fused={fused} linked={linked}")
    if variant == "linked" and (linked != want or fused):
        raise SystemExit(f"expected one linked segment {want}, got fused={fused} linked={linked}")


@asynccontextmanager
async def running(path: str, variant: str) -> AsyncIterator[Flow]:
    """A runtime with the three kernels launched and the flow deployed on ``path``."""
    async with RingKernelRuntime() as rt:
        for kid in KERNELS:
            await rt.launch(kid, inc, backend="cpu", input_type=Num, output_type=Num)
            await rt.activate(kid)
        journal = SQLiteJournal(path, lease=2.0, poll=0.02)
        async with await deploy(rt, graph(variant), name="chain", journal=journal) as flow:
            check_plan(flow, variant)
            yield flow


async def main(path: str, variant: str) -> None:
    async with running(path, variant) as flow:
        print("running", flush=True)
        await flow.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
    print("drained", flush=True)
