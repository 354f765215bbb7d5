"""Kernel-id stages: items/s through a launched echo kernel, by the stage's ``workers``.

A flow ``stage("echo", workers=W)`` sends each item to a kernel and waits for its
reply (``send_and_receive``); the workers' requests are in flight together. Two
kernels: a ``host`` actor, which runs on the flow's own event loop (no hop to wait
for: more workers cannot help much), and a compiled ``cpu`` kernel, whose thread is
reached through rings (each reply is a hop worth overlapping). The baseline is
``workers=1`` on the same kernel, measured in the same run.

    python benchmarks/kernel_stage.py [--items N] [--repeats R]

Goal: on the ``cpu`` kernel, ``workers=8`` moves >= 2x the items/s of ``workers=1``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from pydotcompute import RingKernelRuntime, message
from pydotcompute.coordinator import stage


@message
class Item:
    x: float


async def echo(ctx):  # type: ignore[no-untyped-def]
    while not ctx.should_terminate:
        await ctx.send(await ctx.receive())


def echo_record(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x
    return True


async def items_per_s(backend: str, workers: int, items: int) -> float:
    async with RingKernelRuntime(enable_telemetry=False) as rt:
        if backend == "host":
            await rt.launch("echo", echo)
            values: list[object] = list(range(items))
        else:
            await rt.launch("echo", echo_record, backend="cpu", input_type=Item, output_type=Item)
            values = [Item(x=float(i)) for i in range(items)]
        await rt.activate("echo")
        flow = await rt.deploy(stage("echo", workers=workers, timeout=30), name="bench")
        t0 = time.perf_counter()
        await flow.submit_many(values)
        await flow.drain(timeout=600)
        return items / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.items < 1 or args.repeats < 1:
        ap.error("--items and --repeats must be >= 1")
    print(f"{args.items} items per run, median of {args.repeats}")
    print(f"{'kernel':>7}{'workers':>9}{'items/s':>12}{'vs workers=1':>15}")
    for backend in ("host", "cpu"):
        base = 0.0
        for workers in (1, 8, 64):
            rate = statistics.median(
                asyncio.run(items_per_s(backend, workers, args.items)) for _ in range(args.repeats)
            )
            base = base or rate
            print(f"{backend:>7}{workers:>9}{rate:>12,.0f}{rate / base:>14.2f}x")
    print("goal: cpu kernel, workers=8 >= 2x workers=1")


if __name__ == "__main__":
    main()
