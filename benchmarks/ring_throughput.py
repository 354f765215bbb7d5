"""Rings and ``cpu`` ring kernels: raw ring bandwidth, end-to-end throughput, ping-pong.

1. Raw ring between two threads, 16-byte records in batches of 4096: msg/s and GB/s
   (record bytes through the ring), for the compiled ring operations driven by two
   ``nogil`` threads and for ``HostRing`` driven from Python. Baseline: one thread
   copying the same bytes twice with numpy (into and out of a buffer).
2. End to end: ``rt.send_batch`` → ``cpu`` kernel (``y = 2x + 1``) →
   ``rt.receive_batch``, batches of 4096 records of an ``@message`` class (its
   record includes the message header) with ``--window`` (16) batches in flight.
   Baseline: the same arithmetic as an ``async def`` host actor fed one message at
   a time (``rt.send``/``rt.receive``, 256 in flight).
3. Ping-pong: one record at a time through a ``cpu`` kernel (``send_batch``/
   ``receive_batch`` of one record, and ``send``/``receive`` with message objects);
   the host actor's ping-pong is the baseline.

    python benchmarks/ring_throughput.py [--seconds S] [--repeats R] [--window W]

Goals: end to end >= 20 M msg/s and >= 100x the host actor; ping-pong p50 <= 5 us.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time

import numpy as np
from numba import njit

from pydotcompute.messages import message
from pydotcompute.rings import HostRing
from pydotcompute.rings.host_ops import backoff, ring_pop, ring_try_push
from pydotcompute.runtime import RingKernelRuntime

BATCH = 4096
REC = np.dtype([("x", "<f8"), ("seq", "<i8")])  # 16 bytes


@message
class Sample:
    """The end-to-end message: its record carries the message header too."""

    x: float
    seq: int


def affine(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = 2.0 * msg.x + 1.0
    out.seq = msg.seq
    return True


async def affine_actor(ctx):  # type: ignore[no-untyped-def]
    while True:
        m = await ctx.receive()
        await ctx.send(Sample(x=2.0 * m.x + 1.0, seq=m.seq))


# -- 1. raw ring ------------------------------------------------------------------------


@njit(nogil=True)
def _produce(buf, batch, rounds):  # type: ignore[no-untyped-def]
    n = batch.shape[0]
    rs = batch.itemsize
    spins = 0
    for _ in range(rounds):
        placed = 0
        while placed < n:
            got = ring_try_push(buf, batch, placed * rs, n - placed)
            spins = 0 if got else backoff(spins)
            placed += got


@njit(nogil=True)
def _consume(buf, out, total):  # type: ignore[no-untyped-def]
    got = 0
    check = 0
    spins = 0
    while got < total:
        k = ring_pop(buf, out, 0, out.shape[0])
        if k == 0:
            spins = backoff(spins)  # pause, then yield: the machine may be oversubscribed
        else:
            spins = 0
            check += out[k - 1]["seq"]
        got += k
    return check


def _two_threads(produce, consume) -> float:  # type: ignore[no-untyped-def]
    t = threading.Thread(target=produce)
    t0 = time.perf_counter()
    t.start()
    consume()
    t.join()
    return time.perf_counter() - t0


def raw_ring(seconds: float) -> dict[str, float]:
    batch = np.zeros(BATCH, REC)
    batch["seq"] = np.arange(BATCH)
    out = np.zeros(BATCH, REC)
    ring = HostRing(16 * BATCH, REC)
    _produce(ring.buffer, batch, 1)  # compile, and warm the ring's pages
    _consume(ring.buffer, out, BATCH)

    rounds = 2000
    dt = _two_threads(
        lambda: _produce(ring.buffer, batch, rounds),
        lambda: _consume(ring.buffer, out, rounds * BATCH),
    )
    rounds = max(rounds, int(rounds * seconds / dt))
    dt = _two_threads(
        lambda: _produce(ring.buffer, batch, rounds),
        lambda: _consume(ring.buffer, out, rounds * BATCH),
    )
    compiled = rounds * BATCH / dt

    py_rounds = max(200, rounds // 4)

    def py_produce() -> None:
        for _ in range(py_rounds):
            ring.push_batch(batch)

    def py_consume() -> None:
        got = 0
        while got < py_rounds * BATCH:
            got += len(ring.pop_batch(BATCH, timeout=None))

    python = py_rounds * BATCH / _two_threads(py_produce, py_consume)

    # Byte views: numpy copies structured arrays field by field, bytes at memcpy speed.
    src, dst = batch.view(np.uint8), out.view(np.uint8)
    scratch = np.zeros(16 * BATCH * REC.itemsize, np.uint8)
    step = BATCH * REC.itemsize
    reps = rounds
    t0 = time.perf_counter()
    for i in range(reps):
        j = (i & 15) * step
        np.copyto(scratch[j : j + step], src)
        np.copyto(dst, scratch[j : j + step])
    memcpy = reps * BATCH / (time.perf_counter() - t0)
    return {"compiled": compiled, "python": python, "memcpy": memcpy}


# -- 2. end to end ----------------------------------------------------------------------


async def cpu_throughput(rt: RingKernelRuntime, seconds: float, window_batches: int) -> float:
    window = window_batches * BATCH
    batch = np.zeros(BATCH, Sample.__record_dtype__)
    batch["x"] = np.arange(BATCH)
    sent = received = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        now = time.perf_counter()
        if now >= deadline and received == sent:
            break
        while now < deadline and sent - received + BATCH <= window:
            sent += await rt.send_batch("cpu", batch)
        got = await rt.receive_batch("cpu", window, timeout=5.0)
        received += len(got)
    return received / (time.perf_counter() - t0)


async def actor_throughput(rt: RingKernelRuntime, seconds: float) -> float:
    window = 256
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    for i in range(window):
        await rt.send("actor", Sample(x=float(i), seq=i))
    while time.perf_counter() < deadline:
        for _ in range(1000):
            await rt.receive("actor")
            await rt.send("actor", Sample(x=1.0, seq=n))
            n += 1
    for _ in range(window):
        await rt.receive("actor")
    return (n + window) / (time.perf_counter() - t0)


# -- 3. ping-pong -----------------------------------------------------------------------


async def ping_pong(send, receive, n: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await send()
        await receive()
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


async def run(seconds: float, repeats: int, window_batches: int) -> None:
    raws: list[dict[str, float]] = []
    cpu_tp: list[float] = []
    actor_tp: list[float] = []
    rec_pp: list[tuple[float, float]] = []
    obj_pp: list[tuple[float, float]] = []
    actor_pp: list[tuple[float, float]] = []
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "cpu",
            affine,
            input_type=Sample,
            output_type=Sample,
            backend="cpu",
            queue_size=window_batches * BATCH,
        )
        await rt.activate("cpu")
        await rt.launch("actor", affine_actor, input_type=Sample, queue_size=1024)
        await rt.activate("actor")
        await cpu_throughput(rt, 0.2, window_batches)  # warm up: compile, touch the rings

        one = np.zeros(1, Sample.__record_dtype__)
        msg = Sample(x=1.0, seq=1)
        n = 10_000
        # Interleave repeats so drift on a shared machine hits every side alike.
        for _ in range(repeats):
            raws.append(raw_ring(seconds))
            cpu_tp.append(await cpu_throughput(rt, seconds, window_batches))
            actor_tp.append(await actor_throughput(rt, seconds))
            rec_pp.append(
                await ping_pong(
                    lambda: rt.send_batch("cpu", one), lambda: rt.receive_batch("cpu", 1), n
                )
            )
            obj_pp.append(
                await ping_pong(lambda: rt.send("cpu", msg), lambda: rt.receive("cpu"), n)
            )
            actor_pp.append(
                await ping_pong(lambda: rt.send("actor", msg), lambda: rt.receive("actor"), n)
            )
        tele = rt.get_telemetry("cpu")

    med = statistics.median
    raw = {k: med(r[k] for r in raws) for k in raws[0]}
    tp, atp = med(cpu_tp), med(actor_tp)
    rpp = (med(x[0] for x in rec_pp), med(x[1] for x in rec_pp))
    opp = (med(x[0] for x in obj_pp), med(x[1] for x in obj_pp))
    app = (med(x[0] for x in actor_pp), med(x[1] for x in actor_pp))
    gb = REC.itemsize / 1e9
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"batch {BATCH}, {seconds} s per measurement, median of {repeats} interleaved "
        f"repeats; {os.cpu_count()} CPUs, load average {load}"
    )
    print(f"1. raw ring, two threads, {REC.itemsize}-byte records")
    labels = (("compiled", "compiled ops, nogil threads"), ("python", "HostRing from Python"))
    for name, label in labels:
        v = raw[name]
        print(
            f"   {label:30}{v / 1e6:9.1f} M msg/s {v * gb:7.2f} GB/s"
            f"   {v / raw['memcpy']:5.2f}x numpy copy in+out ({raw['memcpy'] * gb:.2f} GB/s)"
        )
    rs = Sample.__record_dtype__.itemsize
    print(
        f"2. end to end, send_batch -> cpu kernel -> receive_batch, {rs}-byte records, "
        f"{window_batches} batches in flight"
    )
    print(f"   cpu kernel                    {tp / 1e6:9.2f} M msg/s   (goal >= 20)")
    print(f"   async def host actor          {atp / 1e6:9.3f} M msg/s")
    print(f"   ratio                         {tp / atp:9.0f}x         (goal >= 100)")
    print("3. ping-pong, one message at a time (p50 / p99 us)")
    print(f"   cpu kernel, 1-record batches  {rpp[0]:9.1f} / {rpp[1]:.1f}   (goal p50 <= 5)")
    print(f"   cpu kernel, message objects   {opp[0]:9.1f} / {opp[1]:.1f}")
    print(
        f"   async def host actor          {app[0]:9.1f} / {app[1]:.1f}"
        f"   (host actor p50 / cpu record p50: {app[0] / rpp[0]:.1f}x)"
    )
    print(
        f"cpu kernel telemetry: processed={tele.messages_processed} "
        f"idle_polls={tele.idle_polls} dropped={tele.messages_dropped}"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=int, default=16, help="batches in flight end to end")
    a = ap.parse_args()
    asyncio.run(run(a.seconds, a.repeats, a.window))
