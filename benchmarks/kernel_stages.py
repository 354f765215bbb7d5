"""Kernel stages through the coordinator: a compiled ``cpu`` kernel as a stage, against
the same work as an async function stage, and a chain of kernel stages against one.

Every graph is ``make >> <middle> >> unwrap`` over the same items, where ``make`` turns
an int into an ``@message`` record and ``unwrap`` takes the int back out:

- ``function``: the middle is an async function computing x + 1;
- ``kernel``: the middle is a ``cpu`` kernel whose handler computes x + 1;
- ``unfused x3``: the middle is three such kernels, one after the other, each its
  own stage (``fuse=False, link=False``: every record goes back through the host);
- ``fused x3``: the same three stages fused (the default): one kernel whose compiled
  loop calls the three handlers in order;
- ``2 linked`` and ``2 unlinked``: two such kernel stages that do not fuse
  (``fuse=False``), their kernels linked (the default: the first kernel's loop feeds
  the second's input ring; a durable flow links copies of them) or not
  (``link=False``);

each in memory and durable (SQLite journal in a temporary folder), in this one run.
Printed: items/s, kernel/function, the event loop thread's CPU time per item in the
function and kernel graphs (the host side of a kernel stage, SQLite commits included
when durable; other threads, such as the kernel's worker, and other processes are not
in it), the unfused chain's per-stage figure (items/s x 3 stages) over one kernel
stage's, the fused chain's items/s over one kernel stage's and over the unfused
chain's, and the linked pair's over the unlinked pair's. Each run starts after a
garbage collection, off the clock. Then a floor, per item on one thread: the function
stage's call against the record conversion a kernel stage cannot batch away (inputs
packed into records, outputs decoded into messages).

    python benchmarks/kernel_stages.py [--items N] [--durable-items N] [--repeat R]
                                       [--backend cpu|cuda] [--work W]

``--work W`` gives every handler (the kernel's compiled, the function's Python) W
multiply-adds per item besides x + 1, to show where a kernel stage overtakes the
function stage: the record conversion a kernel stage pays per item is fixed, the
handler's work is not.

Goals: kernel >= function; a chain per stage not slower than one stage; the fused
chain of three at least 0.8x one kernel stage; two linked stages faster than the same
two unlinked.

``--backend cuda`` runs the kernels on the ``cuda`` backend (the fused chain is one
resident device loop; linked stages pass records through device memory). Under
numba-cuda's simulator (``NUMBA_ENABLE_CUDASIM=1``), which is slow, only the fused
chain runs and no ratio is printed: use tiny ``--items`` there.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from typing import Any

import numpy as np

from pydotcompute import RingKernelRuntime, message
from pydotcompute.coordinator import stage
from pydotcompute.messages import messages_from_records, records_from_messages


@message
class Num:
    x: np.int64


def inc(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x + 1
    return True


async def inc_fn(m: Num) -> Num:
    return Num(x=m.x + 1)


def with_work(work: int) -> tuple[Any, Any]:
    """The kernel handler and the async function, each doing ``work`` multiply-adds
    per item before x + 1 (their result decides nothing, but no compiler can know)."""
    if work == 0:
        return inc, inc_fn

    def inc_w(msg, out, state):  # type: ignore[no-untyped-def]
        acc = float(msg.x)
        for _ in range(work):
            acc = acc * 0.5 + 1.0
        out.x = msg.x + 1 if acc != -1.0 else 0
        return True

    async def inc_fn_w(m: Num) -> Num:
        acc = float(m.x)
        for _ in range(work):
            acc = acc * 0.5 + 1.0
        return Num(x=m.x + 1 if acc != -1.0 else 0)

    return inc_w, inc_fn_w


def make(i: int) -> Num:
    return Num(x=i)


def unwrap(m: Num) -> int:
    return int(m.x)


CPU: dict[str, float] = {}  # name of a run: the event loop thread's CPU s per item


async def run(graph: Any, rt: RingKernelRuntime, n: int, adds: int, name: str) -> float:
    flow = await rt.deploy(graph, name=name)
    async with flow:
        # The garbage of earlier runs is collected off the clock: a full collection
        # (a tenth of a second in a process this size) lands in no run by chance.
        gc.collect()
        t0, c0 = time.perf_counter(), time.thread_time()
        for i in range(0, n, 1000):
            await flow.submit_many(range(i, min(n, i + 1000)))
        await flow.drain()
        elapsed = time.perf_counter() - t0
        CPU[name] = (time.thread_time() - c0) / n
        total = 0
        async for _, v in flow.results():
            total += v
        assert total == sum(range(n)) + adds * n, "wrong results"
    return n / elapsed


def simulated(backend: str) -> bool:
    """Whether ``backend`` is ``cuda`` under numba-cuda's simulator."""
    if backend != "cuda":
        return False
    from pydotcompute.backends.cuda import require_cuda_backend

    return require_cuda_backend()


def graphs(fn: Any) -> dict[str, tuple[Any, int]]:
    """Each variant's graph and how much it adds to every item."""
    apart = [stage(f"inc{k}", fuse=False, link=False) for k in range(3)]
    pair = [stage(f"inc{k}", fuse=False) for k in range(2)]
    return {
        "function": (stage(make) >> stage(fn) >> stage(unwrap), 1),
        "kernel": (stage(make) >> "inc0" >> stage(unwrap), 1),
        "unfused x3": (stage(make) >> apart[0] >> apart[1] >> apart[2] >> stage(unwrap), 3),
        "fused x3": (stage(make) >> "inc0" >> "inc1" >> "inc2" >> stage(unwrap), 3),
        "2 linked": (stage(make) >> pair[0] >> pair[1] >> stage(unwrap), 2),
        "2 unlinked": (stage(make) >> apart[0] >> apart[1] >> stage(unwrap), 2),
    }


async def measure(
    n: int, journal: str | None, kernels: int, backend: str = "cpu", work: int = 0
) -> dict[str, float]:
    """Every variant in a runtime of its own (durable: on a journal of its own, so no
    variant writes into a journal the ones before it have grown)."""
    sim = simulated(backend)
    handler, fn = with_work(work)
    out: dict[str, float] = {}
    for name, (graph, adds) in graphs(fn).items():
        if sim and name != "fused x3":
            continue  # the simulator is slow: the fused chain alone
        path = None if journal is None else f"{journal}-{name.replace(' ', '_')}.db"
        async with RingKernelRuntime(journal=path) as rt:
            for k in range(kernels):
                await rt.launch(f"inc{k}", handler, backend=backend, input_type=Num,
                                output_type=Num)  # fmt: skip
                await rt.activate(f"inc{k}")
            await run(graph, rt, min(n, 200), adds, "warm")  # compile, link: off the clock
            out[name] = await run(graph, rt, n, adds, name)
    if not sim:
        out["cpu function"], out["cpu kernel"] = CPU["function"], CPU["kernel"]
    return out


async def floor(n: int, repeat: int, work: int = 0) -> tuple[float, float]:
    """Per item, on this thread, best of ``repeat``: the function stage's own work (its
    call, which builds the output message) and the part of a kernel stage's that no
    batching removes: its inputs made records and its outputs (each naming its request
    in ``correlation_id``, as the kernel loop writes) made messages again. No thread, no
    ring, no reply matching: what is left for a kernel stage to match the function stage."""
    msgs = [make(i) for i in range(n)]
    fn = with_work(work)[1]
    call, convert = [], []
    for _ in range(repeat):
        t0 = time.thread_time()
        for m in msgs:
            await fn(m)
        call.append((time.thread_time() - t0) / n)
        t0 = time.thread_time()
        for i in range(0, n, 64):
            recs = records_from_messages(msgs[i : i + 64], Num)
            out = recs.copy()
            out["correlation_id"] = recs["message_id"]
            messages_from_records(Num, out)
        convert.append((time.thread_time() - t0) / n)
    return min(call), min(convert)


def report(where: str, runs: list[dict[str, float]]) -> None:
    best = {k: max(r[k] for r in runs) for k in runs[0] if not k.startswith("cpu")}
    for k, v in best.items():
        print(f"  {where:9s} {k:12s} {v:10.0f} items/s")
    if "kernel" not in best:
        print(f"  {where:9s} (simulator: no ratios, they need a GPU)")
        return
    print(f"  {where:9s} kernel / function          {best['kernel'] / best['function']:.2f}x")
    # What the event loop's thread spends per item (the least of the runs): the host
    # side of a kernel stage against the function stage's call, without the other
    # threads (a kernel's worker, the journal writer) or other processes in it.
    f_cpu, k_cpu = (min(r[f"cpu {k}"] for r in runs) * 1e6 for k in ("function", "kernel"))
    print(
        f"  {where:9s} event loop CPU per item: function {f_cpu:.1f} us, kernel "
        f"{k_cpu:.1f} us, kernel / function {k_cpu / f_cpu:.2f}x"
    )
    per_stage = best["unfused x3"] * 3 / best["kernel"]
    print(f"  {where:9s} unfused x3, per stage / one {per_stage:.2f}x")
    print(f"  {where:9s} fused x3 / one stage       {best['fused x3'] / best['kernel']:.2f}x")
    print(f"  {where:9s} fused x3 / unfused x3      {best['fused x3'] / best['unfused x3']:.2f}x")
    ratio = best["2 linked"] / best["2 unlinked"]
    print(f"  {where:9s} 2 linked / 2 unlinked      {ratio:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--durable-items", type=int, default=5_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--work", type=int, default=0, help="multiply-adds per item per handler")
    args = ap.parse_args()
    print(
        f"kernel stages on {args.backend}, {os.cpu_count()} CPUs, best of {args.repeat}"
        + (f", {args.work} multiply-adds per item per handler" if args.work else "")
        + ":"
    )
    mem = [
        asyncio.run(measure(args.items, None, 3, args.backend, args.work))
        for _ in range(args.repeat)
    ]
    report("in memory", mem)
    call, convert = asyncio.run(floor(args.items, args.repeat, args.work))
    print(
        f"  floor     per item: the function's call {call * 1e6:.1f} us; a kernel stage's "
        f"records in and messages out {convert * 1e6:.1f} us (no thread, no matching)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        dur = [
            asyncio.run(
                measure(args.durable_items, os.path.join(tmp, f"k{i}"), 3, args.backend, args.work)
            )
            for i in range(args.repeat)
        ]
    report("durable", dur)


if __name__ == "__main__":
    main()
