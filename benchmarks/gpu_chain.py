"""Three resident kernels in a chain against one: linked in device memory, and through
the host.

Measured in one run, every kernel running ``affine`` (y = 2x + 1) on 16-byte records:

* ``one``: one kernel; a record sent with ``rt.send`` and its reply taken with
  ``rt.receive`` (round trip p50/p99), and a stream of records in batches
  (``send_batch`` while ``receive_batch`` takes the replies: records/s);
* ``linked x3``: three kernels joined by ``rt.link`` (``k1`` to ``k2`` to ``k3``): records
  go from ``k1``'s loop to ``k2``'s and on to ``k3``'s through rings in device memory;
  sent to ``k1``, taken from ``k3``;
* ``host x3``: the same three kernels unlinked, the host taking each kernel's replies
  and sending them to the next (what a chain costs without links);

and through the coordinator, a flow ``make >> <middle> >> unwrap`` of ``@message``
records (x + 1 per kernel): the middle one kernel stage, three stages fused into one
resident kernel (the default), or three stages kept apart and linked (``fuse=False``):
items/s over a burst, and the round trip of one item (``submit`` then ``result``).

    python benchmarks/gpu_chain.py [--messages N] [--records N] [--simulator] [--json P]

Goals (on a GPU, same run): linked x3 moves >= 0.8x the records/s of one kernel, and
its round trip p50 is <= 1.3x one kernel's; through the coordinator, the fused and the
linked three-stage flows move >= 0.8x the items/s of the one-stage flow, with a round
trip p50 <= 1.3x its.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import gpu_common as gc
import numpy as np

from pydotcompute import message

BATCH = 4096


@message
class Num:
    x: np.float64


def inc(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x + 1.0
    return True


async def _flow_rate(rt: Any, graph: Any, n: int, adds: int, name: str) -> float:
    flow = await rt.deploy(graph, name=name)
    async with flow:
        t0 = time.perf_counter()
        for i in range(0, n, 1000):
            await flow.submit_many(range(i, min(n, i + 1000)))
        await flow.drain()
        elapsed = time.perf_counter() - t0
        total = 0.0
        async for _, v in flow.results():
            total += v
        assert total == sum(range(n)) + adds * n, "wrong results"
    return n / elapsed


async def _flow_trips(rt: Any, graph: Any, n: int, adds: int, name: str) -> list[int]:
    flow = await rt.deploy(graph, name=name)
    samples = []
    async with flow:
        for i in range(n):
            t0 = time.perf_counter_ns()
            key = await flow.submit(i)
            got = await flow.result(key, timeout=30)
            samples.append(time.perf_counter_ns() - t0)
            assert got == i + adds
    return samples


async def flows(n: int, trips: int) -> dict[str, Any]:
    """One kernel stage, three fused, three linked: items/s and round trips."""
    from pydotcompute.coordinator import stage
    from pydotcompute.runtime.runtime import RingKernelRuntime

    def make(i: int) -> Num:
        return Num(x=float(i))

    def unwrap(m: Num) -> float:
        return float(m.x)

    out: dict[str, Any] = {}
    async with RingKernelRuntime() as rt:
        for k in range(3):
            await rt.launch(f"f{k}", inc, backend="cuda", input_type=Num, output_type=Num,
                            queue_size=BATCH)  # fmt: skip
            await rt.activate(f"f{k}")
        graphs = {
            "one": (stage(make) >> "f0" >> stage(unwrap), 1),
            "fused": (stage(make) >> "f0" >> "f1" >> "f2" >> stage(unwrap), 3),
            "linked": (
                stage(make)
                >> stage("f0", fuse=False)
                >> stage("f1", fuse=False)
                >> stage("f2", fuse=False)
                >> stage(unwrap),
                3,
            ),
        }
        for name, (g, adds) in graphs.items():
            await _flow_rate(rt, g, min(n, 200), adds, f"warm-{name}")  # compile, link
            out[f"flow_{name}_ips"] = await _flow_rate(rt, g, n, adds, f"rate-{name}")
            out[f"flow_{name}_us"] = gc.percentiles_us(
                await _flow_trips(rt, g, trips, adds, f"trips-{name}")
            )
    return out


async def _kernels(rt: Any, names: list[str]) -> None:
    for kid in names:
        await rt.launch(kid, gc.affine, backend="cuda", input_type=gc.REC,
                        output_type=gc.REC, queue_size=BATCH * 2)  # fmt: skip
        await rt.activate(kid)


async def _round_trips(rt: Any, first: str, last: str, hops: list[str], n: int) -> list[int]:
    """``n`` round trips of one record, in at ``first``, out of ``last``; ``hops``: kernels
    whose replies the host forwards to the next (the unlinked chain)."""
    one = gc.records(1)
    samples = []
    for i in range(n):
        one["seq"] = i
        t0 = time.perf_counter_ns()
        await rt.send(first, one[0], timeout=30)
        for a, b in zip(hops[:-1], hops[1:], strict=True):
            await rt.send(b, await rt.receive(a, timeout=30), timeout=30)
        got = await rt.receive(last, timeout=30)
        samples.append(time.perf_counter_ns() - t0)
        assert got["seq"] == i
    return samples


async def _stream(rt: Any, first: str, last: str, hops: list[str], total: int, depth: int) -> float:
    """Records/s of ``total`` records in batches, replies taken as they come."""
    data = gc.records(total)

    async def feed() -> None:
        for i in range(0, total, BATCH):
            await rt.send_batch(first, data[i : i + BATCH], timeout=60)

    async def forward(a: str, b: str) -> None:
        moved = 0
        while moved < total:
            got = await rt.receive_batch(a, BATCH, timeout=60)
            await rt.send_batch(b, got, timeout=60)
            moved += len(got)

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(feed())]
    tasks += [
        asyncio.ensure_future(forward(a, b)) for a, b in zip(hops[:-1], hops[1:], strict=True)
    ]
    seen = 0
    expect_x = data["x"]
    for _ in range(depth):
        expect_x = 2.0 * expect_x + 1.0
    while seen < total:
        got = await rt.receive_batch(last, BATCH, timeout=60)
        assert np.array_equal(got["x"], expect_x[seen : seen + len(got)]), "wrong or out of order"
        seen += len(got)
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    return total / elapsed


async def measure(n: int, total: int) -> dict[str, Any]:
    from pydotcompute.runtime.runtime import RingKernelRuntime

    out: dict[str, Any] = {}
    async with RingKernelRuntime(backend="cuda") as rt:
        await _kernels(rt, ["k0"])
        await _round_trips(rt, "k0", "k0", [], min(n, 50))  # warm up
        out["one_us"] = gc.percentiles_us(await _round_trips(rt, "k0", "k0", [], n))
        out["one_rps"] = await _stream(rt, "k0", "k0", [], total, 1)
        chain = ["k1", "k2", "k3"]
        await _kernels(rt, chain)
        out["host_x3_us"] = gc.percentiles_us(await _round_trips(rt, "k1", "k3", chain, n))
        out["host_x3_rps"] = await _stream(rt, "k1", "k3", chain, total, 3)
        await rt.link("k1", "k2")
        await rt.link("k2", "k3")
        await _round_trips(rt, "k1", "k3", [], min(n, 50))
        out["linked_x3_us"] = gc.percentiles_us(await _round_trips(rt, "k1", "k3", [], n))
        out["linked_x3_rps"] = await _stream(rt, "k1", "k3", [], total, 3)
    return out


def _table(res: dict[str, Any], title: str, unit: str, prefix: str, rate: str, rows: Any) -> None:
    """Print p50/p99 and rate per variant against the first row, and add each other
    row's ``*_throughput_ratio`` and ``*_roundtrip_ratio`` to ``res``."""
    base_us, base_rate = res[f"{prefix}one_us"][0], res[f"{prefix}one_{rate}"]
    print(f"{title:<14}{'p50 us':>10}{'p99 us':>10}{'/ one':>8}{unit:>14}{'/ one':>8}")
    for key, label in rows:
        p50, p99 = res[f"{prefix}{key}_us"]
        r = res[f"{prefix}{key}_{rate}"]
        print(f"{label:<14}{p50:>10.2f}{p99:>10.2f}{p50 / base_us:>7.2f}x{r:>14.0f}"
              f"{r / base_rate:>7.2f}x")  # fmt: skip
        if key != "one":
            res[f"{prefix}{key}_throughput_ratio"] = r / base_rate
            res[f"{prefix}{key}_roundtrip_ratio"] = p50 / base_us


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--messages", type=int, default=None, help="round trips per variant")
    ap.add_argument("--records", type=int, default=None, help="records streamed per variant")
    ap.add_argument("--items", type=int, default=None, help="items per flow burst")
    gc.add_standard_args(ap)
    args = ap.parse_args()
    gc.start(args)
    n = args.messages or (2 if gc.SIMULATOR else 5000)
    total = args.records or (4 if gc.SIMULATOR else 1_000_000)
    print(f"device: {gc.device_name()}; {n} round trips, {total} records streamed per variant")
    res = asyncio.run(measure(n, total))
    res.update(asyncio.run(flows(args.items or (2 if gc.SIMULATOR else 20_000),
                                 min(n, 1 if gc.SIMULATOR else 1000))))  # fmt: skip
    _table(
        res,
        "variant",
        "records/s",
        "",
        "rps",
        (("one", "one kernel"), ("host_x3", "host x3"), ("linked_x3", "linked x3")),
    )
    _table(res, "flow", "items/s", "flow_", "ips",
           (("one", "one stage"), ("fused", "fused x3"), ("linked", "linked x3")))  # fmt: skip
    print("goals: linked x3 records/s >= 0.8x one kernel's; linked x3 round trip p50 "
          "<= 1.3x one kernel's; flows: fused and linked x3 items/s >= 0.8x one stage's, "
          "round trip p50 <= 1.3x")  # fmt: skip
    gc.finish(args, res)


if __name__ == "__main__":
    main()
