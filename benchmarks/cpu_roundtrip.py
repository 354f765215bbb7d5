"""One message at a time through a ``cpu`` ring kernel: the runtime against raw ring calls.

The kernel computes y = 2x + 1 on 16-byte records. Measured in one run, repeats
interleaved so that drift on a busy machine hits every variant alike:

* ``raw ring calls``: the compiled ring operations called from Python on the running
  kernel's rings (``ring_push`` into its input, ``ring_pop_spin`` on its output): the
  floor for a Python caller;
* ``rt.send / rt.receive, records``: a kernel typed by a numpy dtype, one record per
  message;
* ``rt.send / rt.receive, @message``: the same with message objects (packing and
  building the object is part of the round trip);
* ``rt.send_batch / rt.receive_batch``: one-record arrays.

    python benchmarks/cpu_roundtrip.py [--messages N] [--repeats R]

Goal: ``rt.send``/``rt.receive`` p50 <= 5 us on a 2-core machine, every run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import numpy as np

from pydotcompute.messages import message
from pydotcompute.rings.host_ops import ring_pop_spin, ring_push
from pydotcompute.runtime import RingKernelRuntime

REC = np.dtype([("x", "<f8"), ("seq", "<i8")])


@message
class Sample:
    x: float
    seq: int


def affine(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = 2.0 * msg.x + 1.0
    out.seq = msg.seq
    return True


async def _timed(step: Callable[[], Awaitable[object]], n: int) -> list[int]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await step()
        samples.append(time.perf_counter_ns() - t0)
    return samples


def _raw(in_buf: np.ndarray, out_buf: np.ndarray, n: int) -> list[int]:
    one = np.zeros(1, REC)
    got = np.zeros(1, REC)
    samples = []
    for i in range(n):
        one[0]["seq"] = i
        t0 = time.perf_counter_ns()
        ring_push(in_buf, one, 0, 1)
        while not ring_pop_spin(out_buf, got, 0, 1, 1_000_000):
            pass
        samples.append(time.perf_counter_ns() - t0)
    assert got[0]["seq"] == n - 1
    return samples


def _pcts(samples: list[int]) -> tuple[float, float]:
    s = sorted(samples)
    return s[len(s) // 2] / 1000, s[min(len(s) - 1, int(len(s) * 0.99))] / 1000


async def run(messages: int, repeats: int) -> None:
    results: dict[str, list[tuple[float, float]]] = {}
    async with RingKernelRuntime() as rt:
        for kid, t in (("rec", REC), ("msg", Sample)):
            await rt.launch(kid, affine, backend="cpu", input_type=t, output_type=t,
                            queue_size=64)  # fmt: skip
            await rt.activate(kid)
        loop = rt._kernels["rec"].kernel_backend
        one = np.zeros(1, REC)
        rec = one[0]
        obj = Sample(x=1.0, seq=1)

        async def records() -> None:
            await rt.send("rec", rec)
            await rt.receive("rec")

        async def objects() -> None:
            await rt.send("msg", obj)
            await rt.receive("msg")

        async def batches() -> None:
            await rt.send_batch("rec", one)
            await rt.receive_batch("rec", 1)

        variants = {
            "raw ring calls": None,
            "rt.send / rt.receive, records": records,
            "rt.send / rt.receive, @message": objects,
            "rt.send_batch / rt.receive_batch": batches,
        }
        for step in variants.values():  # warm up: compile, touch every path
            if step is not None:
                await _timed(step, 200)
        _raw(loop._in_buf, loop._out_buf, 200)
        for _ in range(repeats):
            for name, step in variants.items():
                if step is None:
                    samples = _raw(loop._in_buf, loop._out_buf, messages)
                else:
                    samples = await _timed(step, messages)
                results.setdefault(name, []).append(_pcts(samples))
    med = statistics.median
    raw50 = med(p[0] for p in results["raw ring calls"])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"cpu kernel ping-pong, {REC.itemsize}-byte records, {messages} round trips, median "
          f"of {repeats} interleaved repeats; {os.cpu_count()} CPUs, load average {load}")  # fmt: skip
    print(f"{'variant':<36}{'p50 us':>9}{'p99 us':>9}{'p50 / raw':>11}")
    for name, rows in results.items():
        p50, p99 = med(p[0] for p in rows), med(p[1] for p in rows)
        print(f"{name:<36}{p50:>9.2f}{p99:>9.2f}{p50 / raw50:>10.2f}x")
    print("goal: rt.send / rt.receive p50 <= 5 us (2-core machine)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    if a.messages < 100 or a.repeats < 1:
        ap.error("need --messages >= 100 and --repeats >= 1")
    asyncio.run(run(a.messages, a.repeats))
