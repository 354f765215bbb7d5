"""Round trip of one message host -> persistent kernel -> host: p50 and p99.

Measured three ways in one run, each on one 16-byte record (y = 2x + 1):

* ``persistent, rings``: push the record into the launched kernel's mapped input ring
  and spin on its output ring (the protocol alone, no asyncio);
* ``persistent, runtime``: ``rt.send_batch`` then ``rt.receive_batch`` through
  ``RingKernelRuntime`` (what an application calls);
* baseline: write the record into mapped pinned memory, launch a kernel doing the
  same work, synchronize, read the result (CuPy ``RawKernel`` when usable).

    python benchmarks/gpu_roundtrip.py [--messages N] [--simulator]

Goal (on a GPU): persistent p50 at least 3x lower than the baseline's p50.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import gpu_common as gc
import numpy as np

SIMULATOR = gc.SIMULATOR


async def persistent_rings(messages: int) -> list[int]:
    loop = await gc.launch_persistent(queue_size=64)
    try:
        inp, out = loop.in_ring.host, loop.out_ring.host
        one = gc.records(1)
        got = np.zeros(1, gc.REC)
        samples = []
        for i in range(messages):
            one["x"] = i
            one["seq"] = i
            t0 = time.perf_counter_ns()
            inp.try_push_batch(one)
            while out.try_pop_into(got) == 0:
                pass
            samples.append(time.perf_counter_ns() - t0)
            assert got[0]["seq"] == i and got[0]["x"] == 2.0 * i + 1.0
        return samples
    finally:
        await loop.stop(10.0)


async def persistent_runtime(messages: int) -> list[int]:
    from pydotcompute.runtime.runtime import RingKernelRuntime

    async with RingKernelRuntime(backend="cuda") as rt:
        await rt.launch(
            "echo", gc.affine, backend="cuda", input_type=gc.REC, output_type=gc.REC,
            queue_size=64,
        )  # fmt: skip
        await rt.activate("echo")
        one = gc.records(1)
        samples = []
        for i in range(messages):
            one["seq"] = i
            t0 = time.perf_counter_ns()
            await rt.send_batch("echo", one, timeout=10)
            got = await rt.receive_batch("echo", 1, timeout=10)
            samples.append(time.perf_counter_ns() - t0)
            assert got[0]["seq"] == i
        await rt.terminate("echo")
        return samples


def baseline(messages: int) -> tuple[str, list[int]]:
    base = gc.LaunchBaseline(1)
    base.run(1)  # compile / load the module
    samples = []
    for i in range(messages):
        t0 = time.perf_counter_ns()
        base.host_in[0]["x"] = i
        base.host_in[0]["seq"] = i
        base.run(1)
        y = base.host_out[0]["x"]
        samples.append(time.perf_counter_ns() - t0)
        assert y == 2.0 * i + 1.0
    return base.kind, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=None)
    ap.add_argument("--simulator", action="store_true", help="tiny run on the simulator")
    args = ap.parse_args()
    n = args.messages or (5 if SIMULATOR else 20000)
    print(f"device: {gc.device_name()}; {n} round trips of one {gc.REC.itemsize}-byte record")
    rings = asyncio.run(persistent_rings(n))
    runtime = asyncio.run(persistent_runtime(n))
    kind, base = baseline(n)
    b50, b99 = gc.percentiles_us(base)
    print(f"{'variant':<42}{'p50 us':>10}{'p99 us':>10}{'p50 vs baseline':>18}")
    for name, samples in (("persistent, rings", rings), ("persistent, runtime", runtime)):
        p50, p99 = gc.percentiles_us(samples)
        print(f"{name:<42}{p50:>10.2f}{p99:>10.2f}{b50 / p50:>17.2f}x")
    print(f"{'baseline: ' + kind:<42}{b50:>10.2f}{b99:>10.2f}{1.0:>17.2f}x")
    print("goal: persistent p50 >= 3x lower than the baseline p50")


if __name__ == "__main__":
    main()
