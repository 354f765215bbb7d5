"""Coordinator throughput: a 3-stage pipeline of trivial async functions.

In memory, against pipevine (a small pure-Python async pipeline library) when it is
installed, else against a plain chain of ``asyncio.Queue``s (the script says which);
the queue chain is always reported too. Then the same pipeline durable on an SQLite
journal: items/s, hops/s (committed stage completions) and the durable/in-memory ratio.
Everything is measured in this one run.

    python benchmarks/coordinator.py [--items N] [--durable-items N] [--buffer B]

Goals: in memory >= 10x pipevine's items/s; durable >= 5 000 items/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from pydotcompute.coordinator import SQLiteJournal, deploy, stage


async def s1(x: int) -> int:
    return x + 1


async def s2(x: int) -> int:
    return x * 2


async def s3(x: int) -> int:
    return x - 1


def expected_sum(n: int) -> int:
    return sum((i + 1) * 2 - 1 for i in range(n))


def graph(buffer: int):  # type: ignore[no-untyped-def]
    """The 3-stage pipeline every coordinator benchmark runs."""
    return stage(s1, buffer=buffer) >> stage(s2, buffer=buffer) >> stage(s3, buffer=buffer)


async def ours(n: int, buffer: int, journal: SQLiteJournal | None) -> tuple[float, int]:
    flow = await deploy(None, graph(buffer), name="bench", journal=journal)
    async with flow:
        t0 = time.perf_counter()
        chunk = 1000
        for i in range(0, n, chunk):
            await flow.submit_many(range(i, min(n, i + chunk)))
        await flow.drain()
        elapsed = time.perf_counter() - t0
        total = 0
        async for _, v in flow.results():
            total += v
        assert total == expected_sum(n), "wrong results"
        hops = flow.journal.hops if flow.journal is not None else 3 * n
    return elapsed, hops


async def queue_chain(n: int, buffer: int) -> float:
    """The floor: three worker tasks joined by bounded asyncio.Queues."""
    qs = [asyncio.Queue(buffer) for _ in range(4)]
    done = object()
    total = 0

    async def worker(fn, inq, outq):
        while True:
            v = await inq.get()
            if v is done:
                await outq.put(done)
                return
            await outq.put(await fn(v))

    async def sink():
        nonlocal total
        while True:
            v = await qs[3].get()
            if v is done:
                return
            total += v

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(worker(f, qs[i], qs[i + 1])) for i, f in enumerate((s1, s2, s3))]
    tasks.append(asyncio.create_task(sink()))
    for i in range(n):
        await qs[0].put(i)
    await qs[0].put(done)
    await asyncio.gather(*tasks)
    assert total == expected_sum(n)
    return time.perf_counter() - t0


async def pipevine_run(n: int, buffer: int) -> float | None:
    try:
        import pipevine
    except ImportError:
        return None
    total = 0

    async def p1(x, state):
        return x + 1

    async def p2(x, state):
        return x * 2

    async def p3(x, state):
        nonlocal total
        total += x * 1 - 1  # the sink's sum rides on the last stage
        return None

    def mk(fn):
        return pipevine.work_pool(buffer=buffer, retries=1, num_workers=1)(fn)

    t0 = time.perf_counter()
    await pipevine.Pipeline(iter(range(n))).stage(mk(p1)).stage(mk(p2)).stage(mk(p3)).run()
    elapsed = time.perf_counter() - t0
    assert total == expected_sum(n), f"pipevine produced {total}"
    return elapsed


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--durable-items", type=int, default=100_000)
    ap.add_argument("--buffer", type=int, default=1024)
    args = ap.parse_args()
    n, b = args.items, args.buffer

    mem_t, _ = await ours(n, b, None)
    mem_rate = n / mem_t
    print(f"in memory   pydotcompute  {n:>7} items  {mem_t:6.2f} s  {mem_rate:10,.0f} items/s")
    q_t = await queue_chain(n, b)
    print(f"in memory   asyncio.Queue {n:>7} items  {q_t:6.2f} s  {n / q_t:10,.0f} items/s")
    pv_t = await pipevine_run(n, b)
    if pv_t is None:
        print("pipevine is not installed: the baseline is the asyncio.Queue chain")
        base_name, base_rate = "asyncio.Queue chain", n / q_t
    else:
        print(f"in memory   pipevine      {n:>7} items  {pv_t:6.2f} s  {n / pv_t:10,.0f} items/s")
        base_name, base_rate = "pipevine", n / pv_t
    ratio = mem_rate / base_rate
    print(f"ratio vs {base_name}: {ratio:.1f}x (goal >= 10x) {'OK' if ratio >= 10 else 'MISSED'}")
    print(f"ratio vs asyncio.Queue chain: {mem_rate / (n / q_t):.2f}x")

    dn = args.durable_items
    with tempfile.TemporaryDirectory() as tmp:
        journal = SQLiteJournal(os.path.join(tmp, "bench.db"))
        d_t, hops = await ours(dn, b, journal)
    d_rate = dn / d_t
    print(
        f"durable     pydotcompute  {dn:>7} items  {d_t:6.2f} s  {d_rate:10,.0f} items/s  "
        f"{hops / d_t:10,.0f} hops/s"
    )
    print(f"durable goal >= 5000 items/s: {'OK' if d_rate >= 5000 else 'MISSED'}")
    print(f"durable / in-memory: {d_rate / mem_rate:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
