"""Throughput of 16-byte records through the persistent kernel, by batch size.

For each batch size, in one run:

* ``rings``: a compiled producer thread pushes batches into the launched kernel's
  mapped input ring while the main thread pops its output ring (compiled, nogil):
  the protocol's throughput with the host costing as little as it can;
* ``runtime``: ``rt.send_batch`` / ``rt.receive_batch`` from one asyncio task, many
  batches in flight (what an application calls);
* baseline: the same work with one kernel launch plus one synchronize per batch
  (CuPy ``RawKernel`` when usable), the records in mapped pinned memory.

The kernel has one block per SM (``blocks`` sets compute); the largest batch is also
measured with the default single block.

    python benchmarks/gpu_throughput.py [--seconds S] [--simulator] [--json P]

Goals (on a GPU): rings >= 10x the baseline at batches of 8 and 64 and >= 5x at 1;
>= 200 M msg/s at large batches, and >= 50 % of the zero-copy bandwidth that
gpu_floor.py measures; the runtime >= 0.8x the rings.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from typing import Any

import gpu_common as gc
import numpy as np
from numba import njit

from pydotcompute.rings.atomics import cpu_pause
from pydotcompute.rings.host_ops import ring_pop, ring_push

LARGE = 65536


@njit(nogil=True)
def _produce(buf, batch, total):  # type: ignore[no-untyped-def]
    n = batch.shape[0]
    rs = batch.itemsize
    sent = 0
    while sent < total:
        k = min(n, total - sent)
        placed = 0
        while placed < k:
            got = ring_push(buf, batch, placed * rs, k - placed)
            if got == 0:
                cpu_pause()
            placed += got
        sent += k
    return sent


@njit(nogil=True)
def _consume(buf, out, total):  # type: ignore[no-untyped-def]
    got = 0
    wrong = 0
    while got < total:
        k = ring_pop(buf, out, 0, out.shape[0])
        if k == 0:
            cpu_pause()
            continue
        last = out[k - 1]
        if last["x"] != 2.0 * last["seq"] + 1.0:
            wrong += 1
        got += k
    return wrong


async def rings(batch: int, seconds: float, blocks: int) -> float:
    queue = max(1 << 16, 4 * batch)
    loop = await gc.launch_persistent(queue_size=queue, blocks=blocks)
    try:
        inp, out = loop.in_ring.host.buffer, loop.out_ring.host.buffer
        src = gc.records(batch)
        dst = np.zeros(queue, gc.REC)

        def run(total: int) -> float:
            producer = threading.Thread(target=_produce, args=(inp, src, total))
            t0 = time.perf_counter()
            producer.start()
            wrong = _consume(out, dst, total)
            producer.join()
            assert wrong == 0, f"{wrong} wrong outputs"
            return time.perf_counter() - t0

        total = 16 if gc.SIMULATOR else max(batch, 4096)
        elapsed = run(total)  # warm up and size the measured run
        if not gc.SIMULATOR:
            total = max(total, int(total * seconds / max(elapsed, 1e-6)))
            elapsed = run(total)
        return total / elapsed
    finally:
        await loop.stop(10.0)


async def runtime(batch: int, seconds: float, blocks: int) -> float:
    """The application's path: ``rt.send_batch``/``rt.receive_batch`` from one task."""
    from pydotcompute.runtime.runtime import RingKernelRuntime

    queue = max(1 << 16, 4 * batch)
    window = queue // 2
    async with RingKernelRuntime(backend="cuda") as rt:
        await rt.launch("aff", gc.affine, backend="cuda", input_type=gc.REC,
                        output_type=gc.REC, queue_size=queue, extra={"blocks": blocks})  # fmt: skip
        await rt.activate("aff")
        src = gc.records(batch)
        cap = 16 if gc.SIMULATOR else 1 << 62
        sent = received = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline and sent < cap:
            if sent - received + batch <= window:
                sent += await rt.send_batch("aff", src, timeout=10)
            if sent - received + batch > window or received < sent:
                got = await rt.receive_batch("aff", window, timeout=10)
                received += len(got)
        while received < sent:
            got = await rt.receive_batch("aff", window, timeout=10)
            received += len(got)
        assert np.all(got["x"] == 2.0 * got["seq"] + 1.0)
        rate = received / (time.perf_counter() - t0)
        await rt.terminate("aff")
        return rate


def baseline(batch: int, seconds: float) -> tuple[str, float]:
    base = gc.LaunchBaseline(batch)
    src = gc.records(batch)
    dst = np.zeros(batch, gc.REC)
    base.run(batch)
    cap = 16 if gc.SIMULATOR else 1 << 62
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline and done < cap:
        base.host_in[:batch] = src
        base.run(batch)
        dst[:] = base.host_out[:batch]
        done += batch
    assert np.all(dst["x"] == 2.0 * dst["seq"] + 1.0)
    return base.kind, done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=None, help="per measurement")
    gc.add_standard_args(ap)
    args = ap.parse_args()
    gc.start(args)
    sim = gc.SIMULATOR
    seconds = args.seconds or (0.05 if sim else 1.0)
    batches = (1, 4) if sim else (1, 8, 64, LARGE)
    sms = gc.sm_count()
    print(f"device: {gc.device_name()}; {gc.REC.itemsize}-byte records, {seconds} s each, "
          f"{sms} blocks (one per SM)")  # fmt: skip
    print(f"{'batch':>7}{'rings msg/s':>16}{'runtime msg/s':>16}{'launch msg/s':>15}"
          f"{'rings/launch':>14}{'runtime/rings':>15}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    kind = ""
    for b in batches:
        raw = asyncio.run(rings(b, seconds, sms))
        via = asyncio.run(runtime(b, seconds, sms))
        kind, base = baseline(b, seconds)
        rows.append({"batch": b, "rings": raw, "runtime": via, "launch": base})
        print(f"{b:>7}{raw:>16,.0f}{via:>16,.0f}{base:>15,.0f}{raw / base:>13.1f}x"
              f"{via / raw:>14.2f}x")  # fmt: skip
    big = batches[-1]
    single = asyncio.run(rings(big, seconds, 1))
    print(
        f"batch {big}, rings, blocks=1: {single:,.0f} msg/s "
        f"({single * gc.REC.itemsize / 1e9:.2f} GB/s of records each way)"
    )
    print(f"baseline: {kind}")
    print("goals: rings >= 10x launch at 8 and 64, >= 5x at 1; >= 200 M msg/s and >= 50 % "
          "of zero-copy bandwidth at large batches; runtime >= 0.8x rings")  # fmt: skip
    gc.finish(args, {"record_bytes": gc.REC.itemsize, "blocks": sms, "matrix": rows,
                     "large_blocks1": single, "launch_kind": kind})  # fmt: skip


if __name__ == "__main__":
    main()
