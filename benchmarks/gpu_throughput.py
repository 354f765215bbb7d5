"""Throughput of 16-byte records through the persistent kernel, by batch size.

For each batch size the host pushes batches into the launched kernel's mapped input
ring and pops results from its output ring, keeping several batches in flight
(``HostRing`` calls, no asyncio). The baseline does the same work with one kernel
launch plus one synchronize per batch (CuPy ``RawKernel`` when usable), the records
in mapped pinned memory.

    python benchmarks/gpu_throughput.py [--seconds S] [--simulator]

Goals (on a GPU): >= 10x the baseline for batches of 1-64 records; >= 200 M msg/s
sustained at large batches on an H100.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import gpu_common as gc
import numpy as np


async def persistent(batch: int, seconds: float, max_messages: int) -> tuple[float, int]:
    queue = min(1 << 20, max(16 * batch, 4096))
    loop = await gc.launch_persistent(queue_size=queue)
    try:
        inp, out = loop.in_ring.host, loop.out_ring.host
        src = gc.records(batch)
        dst = np.zeros(max(batch, 1024), gc.REC)
        sent = received = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            if sent - received < queue - batch and time.perf_counter() < deadline:
                if sent < max_messages:
                    sent += inp.try_push_batch(src)
            got = out.try_pop_into(dst)
            received += got
            if received >= sent and (time.perf_counter() >= deadline or sent >= max_messages):
                break
        elapsed = time.perf_counter() - t0
        assert np.all(dst[:got]["x"] == 2.0 * dst[:got]["seq"] + 1.0)
        return received / elapsed, received
    finally:
        await loop.stop(10.0)


async def through_runtime(batch: int, seconds: float, max_messages: int) -> float:
    """The application's path: ``rt.send_batch``/``rt.receive_batch``, 8 batches in flight."""
    from pydotcompute.runtime.runtime import RingKernelRuntime

    async with RingKernelRuntime(backend="cuda") as rt:
        await rt.launch("aff", gc.affine, backend="cuda", input_type=gc.REC,
                        output_type=gc.REC, queue_size=16 * batch)  # fmt: skip
        await rt.activate("aff")
        src = gc.records(batch)
        sent = received = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline and sent < max_messages:
            sent += await rt.send_batch("aff", src, timeout=10)
            while sent - received >= 8 * batch:
                received += len(await rt.receive_batch("aff", 8 * batch, timeout=10))
        while received < sent:
            received += len(await rt.receive_batch("aff", 8 * batch, timeout=10))
        rate = received / (time.perf_counter() - t0)
        await rt.terminate("aff")
        return rate


def baseline(batch: int, seconds: float, max_messages: int) -> tuple[str, float]:
    base = gc.LaunchBaseline(batch)
    src = gc.records(batch)
    dst = np.zeros(batch, gc.REC)
    base.run(batch)
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline and done < max_messages:
        base.host_in[:batch] = src
        base.run(batch)
        dst[:] = base.host_out[:batch]
        done += batch
    assert np.all(dst["x"] == 2.0 * dst["seq"] + 1.0)
    return base.kind, done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=None, help="per measurement")
    ap.add_argument("--simulator", action="store_true", help="tiny run on the simulator")
    args = ap.parse_args()
    sim = gc.SIMULATOR
    seconds = args.seconds or (0.2 if sim else 2.0)
    batches = (1, 4) if sim else (1, 8, 64, 4096)
    cap = 16 if sim else 1 << 40
    print(f"device: {gc.device_name()}; {gc.REC.itemsize}-byte records, {seconds} s each")
    print(f"{'batch':>7}{'persistent msg/s':>20}{'baseline msg/s':>18}{'ratio':>9}")
    kind = ""
    for b in batches:
        rate, n = asyncio.run(persistent(b, seconds, cap))
        kind, base = baseline(b, seconds, cap)
        print(f"{b:>7}{rate:>20,.0f}{base:>18,.0f}{rate / base:>8.1f}x")
    big = batches[-1]
    rate = asyncio.run(through_runtime(big, seconds, cap))
    print(f"through RingKernelRuntime (send_batch/receive_batch), batch {big}: {rate:,.0f} msg/s")
    print(f"baseline: {kind}")
    print("goals: >= 10x the baseline for batches of 1-64; >= 200 M msg/s at large batches (H100)")


if __name__ == "__main__":
    main()
