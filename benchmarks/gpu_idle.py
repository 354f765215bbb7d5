"""Idle cost: does an activated persistent kernel with no traffic slow other GPU work?

Times a square float32 matrix multiply (CuPy when usable, otherwise a numba-cuda
tiled kernel, and the output says which) alone, then beside an activated ``cuda``
ring kernel that receives nothing (its blocks poll the mapped input ring and back
off with ``nanosleep``), with its default grid (one block: the agent alone polls)
and with one block per SM (the others wait on device memory). Also reports how often
the idle kernel polled.

    python benchmarks/gpu_idle.py [--size N] [--repeats R] [--simulator] [--json P]

Goal (on a GPU): an 8192 x 8192 float32 matmul beside the idle kernel is at most 5 %
slower.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from collections.abc import Callable

import gpu_common as gc
import numpy as np
from gpu_common import cuda

TILE = 16


@cuda.jit
def _matmul(a, b, c):  # type: ignore[no-untyped-def]
    sa = cuda.shared.array((TILE, TILE), np.float32)
    sb = cuda.shared.array((TILE, TILE), np.float32)
    x, y = cuda.grid(2)
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    acc = np.float32(0.0)
    for t in range((a.shape[1] + TILE - 1) // TILE):
        sa[ty, tx] = a[y, t * TILE + tx] if y < a.shape[0] and t * TILE + tx < a.shape[1] else 0
        sb[ty, tx] = b[t * TILE + ty, x] if x < b.shape[1] and t * TILE + ty < b.shape[0] else 0
        cuda.syncthreads()
        for k in range(TILE):
            acc += sa[ty, k] * sb[k, tx]
        cuda.syncthreads()
    if y < c.shape[0] and x < c.shape[1]:
        c[y, x] = acc


def matmul_runner(n: int) -> tuple[str, Callable[[], None]]:
    cp = gc.cupy_or_none()
    if cp is not None:
        a = cp.random.rand(n, n, dtype=cp.float32)
        b = cp.random.rand(n, n, dtype=cp.float32)

        def run_cupy() -> None:
            cp.matmul(a, b)
            cp.cuda.Stream.null.synchronize()

        return "CuPy matmul", run_cupy
    rng = np.random.default_rng(0)
    da = cuda.to_device(rng.random((n, n), np.float32))
    db = cuda.to_device(rng.random((n, n), np.float32))
    dc = cuda.device_array((n, n), np.float32)
    grid = (math.ceil(n / TILE), math.ceil(n / TILE))

    stream = cuda.stream()  # a device-wide synchronize would wait for the ring kernel

    def run_numba() -> None:
        _matmul[grid, (TILE, TILE), stream](da, db, dc)
        stream.synchronize()

    return "numba-cuda tiled matmul (CuPy not usable)", run_numba


def time_it(run: Callable[[], None], repeats: int) -> float:
    run()  # warm up (compile, caches)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def beside_idle_kernel(
    run: Callable[[], None], repeats: int, **extra: int
) -> tuple[float, float, int]:
    loop = await gc.launch_persistent(queue_size=4096, **extra)
    try:
        polls0 = loop.telemetry("ACTIVE").idle_polls
        t0 = time.perf_counter()
        if gc.SIMULATOR:
            # The simulator runs one launch at a time: no matmul beside it there.
            await asyncio.sleep(0.2)
            t = float("nan")
        else:
            t = time_it(run, repeats)
        polls = loop.telemetry("ACTIVE").idle_polls - polls0
        return t, polls / (time.perf_counter() - t0), loop.blocks
    finally:
        await loop.stop(10.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    gc.add_standard_args(ap)
    args = ap.parse_args()
    gc.start(args)
    sim = gc.SIMULATOR
    n = args.size or (8 if sim else 8192 if gc.cupy_or_none() is not None else 2048)
    repeats = args.repeats or (2 if sim else 20)
    kind, run = matmul_runner(n)
    print(f"device: {gc.device_name()}; {kind}, {n}x{n} float32, median of {repeats}")
    alone = time_it(run, repeats)
    print(f"{'setting':<44}{'matmul ms':>12}{'slowdown':>10}{'idle polls/s':>14}")
    print(f"{'alone':<44}{alone * 1e3:>12.3f}{'':>10}{'':>14}")
    rows = []
    for label, extra in (
        ("beside idle kernel, default grid", {}),
        ("beside idle kernel, one block per SM", {"blocks": gc.sm_count()}),
    ):
        t, rate, blocks = asyncio.run(beside_idle_kernel(run, repeats, **extra))
        slow = (t / alone - 1.0) * 100.0
        rows.append({"setting": label, "blocks": blocks, "matmul_s": t, "slowdown_pct": slow,
                     "idle_polls_per_s": rate})  # fmt: skip
        name = f"{label} ({blocks} blocks)"
        print(f"{name:<44}{t * 1e3:>12.3f}{slow:>9.1f}%{rate:>14,.0f}")
    print("goal: <= 5 % slowdown beside an activated idle kernel")
    gc.finish(args, {"matmul": kind, "size": n, "alone_s": alone, "beside": rows})


if __name__ == "__main__":
    main()
