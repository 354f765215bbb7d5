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

Then single messages (``send_and_receive``, one at a time: the latency of one request
and its reply), and coordinator flows through the same two kernels: kernel-id stages with
one worker each, whose worker sends the items it took together, against the same
pipeline calling the kernels one item at a time (what kernel-id stages did before: the
baseline), in memory and durable on SQLite and on PostgreSQL; then with 64 workers per
stage, and one batching stage that moves 512 items at a time with
``send_batch``/``receive_batch``.

    python benchmarks/ray_hop.py [--records N] [--batch B] [--repeat R] [--items N]
        [--address HOST:PORT | ray://HOST:PORT] [--pin RES_A,RES_B] [--dsn DSN]

``--address`` measures a running cluster (default: a new local Ray instance); ``--pin``
names a custom resource for each kernel, so that ``scale`` and ``shift`` land on two
different nodes (e.g. ``--pin node_a,node_b`` on nodes started with those resources).
``--dsn`` names the PostgreSQL database for the durable flows (default: a throwaway
server, where its binaries are installed; otherwise they are skipped).

Goal: a batch of 4096 records crosses a Ray hop at >= 1 M records/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pydotcompute import RingKernelRuntime
from pydotcompute.coordinator import FanIn, PostgresJournal, SQLiteJournal, stage

RECORD = np.dtype([("seq", np.int64), ("value", np.float64)])


def scale(msg, out, state):  # type: ignore[no-untyped-def]
    out.seq = msg.seq
    out.value = msg.value * 2.0
    return True


def shift(msg, out, state):  # type: ignore[no-untyped-def]
    out.seq = msg.seq
    out.value = msg.value + 1.0
    return True


async def launch(rt: RingKernelRuntime, batch: int, pin: list[str] | None = None) -> None:
    for i, (kid, fn) in enumerate((("scale", scale), ("shift", shift))):
        await rt.launch(
            kid,
            fn,
            backend="cpu",
            input_type=RECORD,
            output_type=RECORD,
            queue_size=max(4 * batch, 16384),
            resources={pin[i]: 1} if pin else {},
        )
        await rt.activate(kid)


async def single(rt: RingKernelRuntime, rounds: int) -> list[float]:
    """Seconds per message sent alone and waited for (``send_and_receive``)."""
    rec = np.zeros(1, RECORD)[0]
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await rt.send_and_receive("scale", rec, timeout=60)
        out.append(time.perf_counter() - t0)
    return out


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


def record(i: int) -> np.void:
    rec = np.zeros(1, RECORD)
    rec["seq"] = i
    rec["value"] = i
    return rec[0]


def value(r: np.void) -> float:
    return float(r["value"])


async def coordinated(
    rt: RingKernelRuntime, n: int, batch: int, journals: dict[str, object]
) -> dict[str, float]:
    """Items/s of flows through scale and shift (see the module): per journal, kernel-id
    stages and the one-item-at-a-time baseline; then, in memory, 64 workers per stage
    and a batching stage."""

    async def scale_one(r: np.void) -> np.void:
        return await rt.send_and_receive("scale", r, timeout=60)

    async def shift_one(r: np.void) -> np.void:
        return await rt.send_and_receive("shift", r, timeout=60)

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

    runs = []
    for where, journal in journals.items():
        runs.append(
            (
                f"one at a time, {where}",
                stage(record) >> scale_one >> shift_one >> value,
                n,
                journal,
            )
        )
        runs.append(
            (f"kernel stages, {where}", stage(record) >> "scale" >> "shift" >> value, n, journal)
        )
    runs.append(
        (
            "64 workers, memory",
            stage(record) >> stage("scale", workers=64) >> stage("shift", workers=64) >> value,
            n,
            None,
        )
    )
    runs.append(
        (
            "batching stage, memory",
            stage(record) >> FanIn(through, count=batch, timeout=0.01),
            8 * n,
            None,
        )
    )
    rates = {}
    for i, (name, graph, items, journal) in enumerate(runs):
        flow = await rt.deploy(graph, name=f"bench-{i}", journal=journal)
        try:
            t0 = time.perf_counter()
            keys = await flow.submit_many(range(items))
            await flow.drain(timeout=600)
            rates[name] = items / (time.perf_counter() - t0)
            assert await flow.result(keys[-1]) == (items - 1) * 2.0 + 1.0, "wrong results"
        finally:
            await flow.close()
    return rates


@contextlib.contextmanager
def journals(dsn: str | None) -> Iterator[dict[str, object]]:
    """Where the flows keep their items: memory, an SQLite file, a PostgreSQL schema."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        out: dict[str, object] = {
            "memory": None,
            "SQLite": SQLiteJournal(str(Path(tmp) / "hop.db")),
        }
        try:
            import sys

            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.postgres_server import NoServer, fresh_schema, throwaway_server

            base = dsn or stack.enter_context(throwaway_server())
            out["PostgreSQL"] = PostgresJournal(stack.enter_context(fresh_schema(base)))
        except (ImportError, NoServer) as exc:
            print(f"(PostgreSQL flows skipped: {exc})")
        yield out


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
    ap.add_argument("--items", type=int, default=200, help="items per coordinator flow")
    ap.add_argument("--address", default="local", help="the Ray cluster (default: a new one)")
    ap.add_argument("--pin", default="", help="custom resources for scale and shift: A,B")
    ap.add_argument("--dsn", default=None, help="PostgreSQL for durable flows")
    args = ap.parse_args()
    n = args.records // args.batch * args.batch
    pin = args.pin.split(",") if args.pin else None
    if pin is not None and len(pin) != 2:
        ap.error("--pin takes two resource names, one per kernel: A,B")

    with journals(args.dsn) as where:
        local: list[float] = []
        async with RingKernelRuntime() as rt:
            await launch(rt, args.batch)
            await pipeline(rt, max(n // 8, args.batch), args.batch)  # warm-up
            for _ in range(args.repeat):
                local.append(n / await pipeline(rt, n, args.batch))
            one_local = await single(rt, 20 * args.repeat)
            flow_local = await coordinated(rt, args.items, 512, {"memory": None})

        remote: list[float] = []
        async with RingKernelRuntime(cluster=args.address) as rt:
            await launch(rt, args.batch, pin)
            nodes = {rt.get_placement(k).node_id for k in ("scale", "shift")}
            await pipeline(rt, max(n // 8, args.batch), args.batch)
            for _ in range(args.repeat):
                remote.append(n / await pipeline(rt, n, args.batch))
            put_s, trip_s = await hops(rt, args.batch, 40 * args.repeat)
            one_remote = await single(rt, 20 * args.repeat)
            flow_remote = await coordinated(rt, args.items, 512, where)

    print(f"cluster: {args.address}, kernels on {len(nodes)} node(s)")
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
    print("one message and its reply (send_and_receive), ms, median (min-max):")
    for name, times in (("one process", one_local), ("Ray actor", one_remote)):
        ms = [t * 1e3 for t in times]
        print(f"  {name:24s} {statistics.median(ms):7.3f} ({min(ms):.3f}-{max(ms):.3f})")
    print(f"coordinator flows through both kernels, {args.items} items, items/s:")
    print(f"  {'':32s} {'one process':>12s} {'Ray':>10s}")
    for name, rate in flow_remote.items():
        here = flow_local.get(name)
        here_text = "-" if here is None else f"{here:.0f}"
        print(f"  {name:32s} {here_text:>12s} {rate:10.0f}")
    for where_ in ("memory", "SQLite", "PostgreSQL"):
        before = flow_remote.get(f"one at a time, {where_}")
        after = flow_remote.get(f"kernel stages, {where_}")
        if before and after:
            print(f"  kernel stages / one at a time, {where_}: {after / before:.1f}x")
    hop = statistics.median(put_rate)
    print(
        f"goal >= 1 M records/s per hop: {'met' if hop >= 1e6 else 'NOT met'} ({hop / 1e6:.2f} M)"
    )


if __name__ == "__main__":
    asyncio.run(main())
