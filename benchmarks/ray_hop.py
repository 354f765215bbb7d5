"""Batched throughput of a two-kernel pipeline across Ray actors, against one process.

Two ``cpu`` ring kernels, ``scale`` then ``shift``, on 16-byte records. The caller
feeds batches to ``scale``, forwards what comes out to ``shift`` and drains ``shift``,
as three concurrent tasks. Measured in one run:

- in one process: ``RingKernelRuntime()``;
- on Ray: ``RingKernelRuntime(cluster="local")``, each kernel on its own Ray actor, so
  every batch crosses four Ray hops (caller -> scale -> caller -> shift -> caller);
- one hop: a batch handed to a kernel's actor (``send_batch`` until the actor has
  accepted it), and a round trip (until all its outputs are back: two hops and the
  kernel's work, reported per hop), one batch at a time.

Then a coordinator flow through the same two kernels, both ways: kernel-id stages (a
request and its reply per item; one worker per stage, then 64 with their requests in
flight together) and one batching stage that moves 512 items at a time
with ``send_batch``/``receive_batch``.

    python benchmarks/ray_hop.py [--records N] [--batch B] [--repeat R] [--items N]

Goal: a batch of 4096 records crosses a Ray hop at >= 1 M records/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from pydotcompute import RingKernelRuntime
from pydotcompute.coordinator import FanIn, stage

RECORD = np.dtype([("seq", np.int64), ("value", np.float64)])


def scale(msg, out, state):  # type: ignore[no-untyped-def]
    out.seq = msg.seq
    out.value = msg.value * 2.0
    return True


def shift(msg, out, state):  # type: ignore[no-untyped-def]
    out.seq = msg.seq
    out.value = msg.value + 1.0
    return True


async def launch(rt: RingKernelRuntime, batch: int) -> None:
    for kid, fn in (("scale", scale), ("shift", shift)):
        await rt.launch(
            kid,
            fn,
            backend="cpu",
            input_type=RECORD,
            output_type=RECORD,
            queue_size=max(4 * batch, 16384),
        )
        await rt.activate(kid)


async def pipeline(rt: RingKernelRuntime, n: int, batch: int) -> float:
    """Seconds to push ``n`` records through scale and shift, batches in flight."""
    src = np.zeros(batch, RECORD)
    src["value"] = 1.0
    done = 0
    check = 0.0

    async def feed() -> None:
        for _ in range(n // batch):
            await rt.send_batch("scale", src)

    async def forward() -> None:
        moved = 0
        while moved < n:
            out = await rt.receive_batch("scale", batch, timeout=60)
            await rt.send_batch("shift", out)
            moved += len(out)

    async def drain() -> None:
        nonlocal done, check
        while done < n:
            out = await rt.receive_batch("shift", batch, timeout=60)
            done += len(out)
            check += float(out["value"].sum())

    t0 = time.perf_counter()
    await asyncio.gather(feed(), forward(), drain())
    elapsed = time.perf_counter() - t0
    assert done == n and check == 3.0 * n, "wrong results"
    return elapsed


async def hops(rt: RingKernelRuntime, batch: int, rounds: int) -> tuple[list[float], list[float]]:
    """One batch at a time: seconds until ``scale``'s actor has accepted it (one hop),
    and seconds until all its outputs are back (two hops and the kernel's work)."""
    src = np.zeros(batch, RECORD)
    put, trip = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await rt.send_batch("scale", src)
        t1 = time.perf_counter()
        got = 0
        while got < batch:
            got += len(await rt.receive_batch("scale", batch, timeout=60))
        t2 = time.perf_counter()
        put.append(t1 - t0)
        trip.append(t2 - t0)
    return put, trip


async def coordinated(rt: RingKernelRuntime, n: int, batch: int) -> list[float]:
    """Items/s of an in-memory flow through scale and shift: as kernel-id stages (one
    request and reply per item; with one worker each, then with 64 whose requests are
    in flight together), and as one batching stage that sends its batch of items
    through both kernels with send_batch/receive_batch."""

    def record(i: int) -> np.void:
        rec = np.zeros(1, RECORD)
        rec["seq"] = i
        rec["value"] = i
        return rec[0]

    async def through(rt_batch: list[np.void]) -> list[float]:
        recs = np.array(rt_batch, RECORD)
        for kid in ("scale", "shift"):
            await rt.send_batch(kid, recs)
            parts, got = [], 0
            while got < len(recs):
                part = await rt.receive_batch(kid, len(recs) - got, timeout=60)
                parts.append(part)
                got += len(part)
            recs = np.concatenate(parts)
        return recs["value"].tolist()

    rates = []
    for name, graph, items in (
        ("per-item", stage(record) >> "scale" >> "shift" >> (lambda r: float(r["value"])), n),
        (
            "per-item-64",
            stage(record)
            >> stage("scale", workers=64)
            >> stage("shift", workers=64)
            >> (lambda r: float(r["value"])),
            n,
        ),
        ("batched", stage(record) >> FanIn(through, count=batch, timeout=0.01), 8 * n),
    ):
        flow = await rt.deploy(graph, name=name, journal=None)
        t0 = time.perf_counter()
        keys = await flow.submit_many(range(items))
        await flow.drain(timeout=300)
        rates.append(items / (time.perf_counter() - t0))
        assert await flow.result(keys[-1]) == (items - 1) * 2.0 + 1.0, "wrong results"
    return rates


def spread(values: list[float]) -> str:
    return (
        f"median {statistics.median(values) / 1e6:6.2f} M "
        f"(min {min(values) / 1e6:.2f}, max {max(values) / 1e6:.2f})"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1 << 20, help="records per pipeline run")
    ap.add_argument("--batch", type=int, default=4096, help="records per batch")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each measurement")
    ap.add_argument("--items", type=int, default=1000, help="items per coordinator flow")
    args = ap.parse_args()
    n = args.records // args.batch * args.batch

    local: list[float] = []
    async with RingKernelRuntime() as rt:
        await launch(rt, args.batch)
        await pipeline(rt, n // 8, args.batch)  # warm-up
        for _ in range(args.repeat):
            local.append(n / await pipeline(rt, n, args.batch))
        flow_local = await coordinated(rt, args.items, 512)

    remote: list[float] = []
    async with RingKernelRuntime(cluster="local") as rt:
        await launch(rt, args.batch)
        await pipeline(rt, n // 8, args.batch)
        for _ in range(args.repeat):
            remote.append(n / await pipeline(rt, n, args.batch))
        put_s, trip_s = await hops(rt, args.batch, 40 * args.repeat)
        flow_remote = await coordinated(rt, args.items, 512)

    print(f"two-kernel pipeline, {n} records of {RECORD.itemsize} B, batches of {args.batch}:")
    print(f"  one process         records/s {spread(local)}")
    print(f"  two Ray actors      records/s {spread(remote)}")
    ratio = statistics.median(remote) / statistics.median(local)
    print(f"  ratio Ray/process   {ratio:.2f}")
    put_rate = [args.batch / s for s in put_s]
    trip_rate = [2 * args.batch / s for s in trip_s]
    print(f"one Ray hop, one batch of {args.batch} records at a time:")
    print(f"  caller -> actor          records/s {spread(put_rate)}")
    print(f"  round trip, per hop      records/s {spread(trip_rate)}")
    print("coordinator flow through both kernels, items/s (one process / two Ray actors):")
    print(f"  kernel-id stages         {flow_local[0]:10.0f} / {flow_remote[0]:.0f}")
    print(f"  same, 64 workers each    {flow_local[1]:10.0f} / {flow_remote[1]:.0f}")
    print(f"  batching stage (512)     {flow_local[2]:10.0f} / {flow_remote[2]:.0f}")
    hop = statistics.median(put_rate)
    print(
        f"goal >= 1 M records/s per hop: {'met' if hop >= 1e6 else 'NOT met'} ({hop / 1e6:.2f} M)"
    )


if __name__ == "__main__":
    asyncio.run(main())
