"""Round trip of one record host -> persistent kernel -> host: p50 and p99.

Measured in one run, each on one 16-byte record (y = 2x + 1):

* ``rings, blocks=1`` and ``rings, one block per SM``: the compiled ring operations
  (``ring_push`` into the launched kernel's mapped input ring, ``ring_pop_spin`` on
  its output ring) timed inside compiled code: the protocol alone, no Python;
* ``runtime, rt.send / rt.receive``: one record (a numpy record) through
  ``RingKernelRuntime`` — what an application calls;
* ``runtime, send_batch / receive_batch``: a one-record array the same way;
* baseline: write the record into mapped pinned memory, launch a kernel doing the same
  work, synchronize, read the result (CuPy ``RawKernel`` when usable).

    python benchmarks/gpu_roundtrip.py [--messages N] [--simulator] [--json P]

Goals (on a GPU, against gpu_floor.py in the same run): rings p50 <= 1.5x the
ping-pong floor and >= 3x lower than launch + sync; rt.send/rt.receive p50 <= 2x the
rings; one block per SM <= 1.2x blocks=1.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import gpu_common as gc
import numpy as np
from numba import njit

from pydotcompute.rings.atomics import monotonic_ns
from pydotcompute.rings.host_ops import ring_pop_spin, ring_push


@njit(nogil=True)
def _ring_trips(in_buf, out_buf, one, got, n, samples):  # type: ignore[no-untyped-def]
    for i in range(n):
        one[0]["x"] = i
        one[0]["seq"] = i
        t0 = monotonic_ns()
        ring_push(in_buf, one, 0, 1)
        while ring_pop_spin(out_buf, got, 0, 1, 1_000_000) == 0:
            pass
        samples[i] = monotonic_ns() - t0
        if got[0]["seq"] != i or got[0]["x"] != 2.0 * i + 1.0:
            return i + 1  # a wrong reply
    return 0


async def rings(messages: int, blocks: int) -> tuple[list[int], int]:
    loop = await gc.launch_persistent(queue_size=64, blocks=blocks)
    try:
        samples = np.zeros(messages, np.int64)
        one, got = gc.records(1), np.zeros(1, gc.REC)
        # The simulated device is a Python thread: it needs the GIL this call frees.
        bad = _ring_trips(loop.in_ring.host.buffer, loop.out_ring.host.buffer, one, got,
                          messages, samples)  # fmt: skip
        assert bad == 0, f"round trip {bad - 1} got a wrong reply"
        return samples.tolist(), loop.blocks
    finally:
        await loop.stop(10.0)


async def runtime(messages: int) -> dict[str, list[int]]:
    from pydotcompute.runtime.runtime import RingKernelRuntime

    out: dict[str, list[int]] = {"send_receive": [], "batch": []}
    async with RingKernelRuntime(backend="cuda") as rt:
        await rt.launch("echo", gc.affine, backend="cuda", input_type=gc.REC,
                        output_type=gc.REC, queue_size=64)  # fmt: skip
        await rt.activate("echo")
        one = gc.records(1)
        for i in range(messages):
            one["seq"] = i
            t0 = time.perf_counter_ns()
            await rt.send("echo", one[0], timeout=10)
            got = await rt.receive("echo", timeout=10)
            out["send_receive"].append(time.perf_counter_ns() - t0)
            assert got["seq"] == i
        for i in range(messages):
            one["seq"] = i
            t0 = time.perf_counter_ns()
            await rt.send_batch("echo", one, timeout=10)
            got = await rt.receive_batch("echo", 1, timeout=10)
            out["batch"].append(time.perf_counter_ns() - t0)
            assert got[0]["seq"] == i
        await rt.terminate("echo")
    return out


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
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--messages", type=int, default=None)
    gc.add_standard_args(ap)
    args = ap.parse_args()
    gc.start(args)
    n = args.messages or (5 if gc.SIMULATOR else 20000)
    print(f"device: {gc.device_name()}; {n} round trips of one {gc.REC.itemsize}-byte record")
    one_block, _ = asyncio.run(rings(n, 1))
    per_sm, blocks = asyncio.run(rings(n, gc.sm_count()))
    rt = asyncio.run(runtime(n))
    kind, base = baseline(n)
    results: dict[str, Any] = {
        "rings_blocks1_us": gc.percentiles_us(one_block),
        "rings_blocks_per_sm_us": gc.percentiles_us(per_sm),
        "blocks_per_sm": blocks,
        "runtime_send_receive_us": gc.percentiles_us(rt["send_receive"]),
        "runtime_batch_us": gc.percentiles_us(rt["batch"]),
        "launch_sync_us": gc.percentiles_us(base),
        "launch_sync_kind": kind,
    }
    b50 = results["launch_sync_us"][0]
    print(f"{'variant':<46}{'p50 us':>10}{'p99 us':>10}{'launch / it':>13}")
    for key, label in (
        ("rings_blocks1_us", "persistent, rings, blocks=1"),
        ("rings_blocks_per_sm_us", f"persistent, rings, {blocks} blocks (one per SM)"),
        ("runtime_send_receive_us", "persistent, runtime, rt.send / rt.receive"),
        ("runtime_batch_us", "persistent, runtime, send_batch / receive_batch"),
        ("launch_sync_us", f"baseline: {kind}"),
    ):
        p50, p99 = results[key]
        print(f"{label:<46}{p50:>10.2f}{p99:>10.2f}{b50 / p50:>12.2f}x")
    print("goals: rings <= 1.5x the ping-pong floor (gpu_floor.py), >= 3x lower than "
          "launch + sync; rt.send/rt.receive <= 2x the rings; one block per SM <= 1.2x")  # fmt: skip
    gc.finish(args, results)


if __name__ == "__main__":
    main()
