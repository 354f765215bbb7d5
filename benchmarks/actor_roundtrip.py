"""Echo actor round trip: pydotcompute host actor vs the cheapest asyncio actor.

Throughput keeps a window of 256 messages in flight, measured with two client shapes:

* ``sender+receiver tasks``: one task sends (bounded by a 256-slot semaphore), another
  receives -- how an application usually drives an actor. The goal applies here.
* ``one task``: a single coroutine alternates receive/send with 256 queued. Neither
  side switches tasks, so this isolates per-call overhead: the baseline actor is
  inlined, while a ring kernel makes two ``await ctx...`` calls per message that the
  API requires. Reported for transparency; no goal.

Latency sends one message at a time. The baseline is measured in the same run: a
task reading a deque woken by an ``asyncio.Event``, answering through another deque
and event.

    python benchmarks/actor_roundtrip.py [--messages N] [--repeats R]

Goal: throughput (sender+receiver tasks) >= 0.85x the baseline, p50 latency <= 1.2x.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
from collections import deque

from pydotcompute import RingKernelRuntime, ring_kernel

WINDOW = 256


class BaselineActor:
    """A deque plus an asyncio.Event each way: no bound, no lifecycle, no telemetry."""

    def __init__(self) -> None:
        self.inbox: deque[object] = deque()
        self.outbox: deque[object] = deque()
        self.in_ev = asyncio.Event()
        self.out_ev = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        inbox, outbox, in_ev, out_ev = self.inbox, self.outbox, self.in_ev, self.out_ev
        while True:
            while not inbox:
                in_ev.clear()
                await in_ev.wait()
            outbox.append(inbox.popleft())
            out_ev.set()

    async def send(self, msg: object) -> None:
        self.inbox.append(msg)
        self.in_ev.set()

    async def receive(self) -> object:
        while not self.outbox:
            self.out_ev.clear()
            await self.out_ev.wait()
        return self.outbox.popleft()

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@ring_kernel(kernel_id="bench_echo", auto_register=False)
async def echo(ctx):  # type: ignore[no-untyped-def]
    while True:
        await ctx.send(await ctx.receive())


async def throughput(send, receive, n: int) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for i in range(WINDOW):
        await send(i)
    for i in range(n - WINDOW):
        await receive()
        await send(i)
    for _ in range(WINDOW):
        await receive()
    return n / (time.perf_counter() - t0)


async def throughput_tasks(send, receive, n: int) -> float:  # type: ignore[no-untyped-def]
    window = asyncio.Semaphore(WINDOW)

    async def sender() -> None:
        for i in range(n):
            await window.acquire()
            await send(i)

    async def receiver() -> None:
        for _ in range(n):
            await receive()
            window.release()

    t0 = time.perf_counter()
    await asyncio.gather(sender(), receiver())
    return n / (time.perf_counter() - t0)


async def latency(send, receive, n: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    samples = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        await send(i)
        await receive()
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


async def main(n: int, repeats: int) -> None:
    base_tp, base_lat, ours_tp, ours_lat = [], [], [], []
    base_tt, ours_tt = [], []
    async with RingKernelRuntime() as rt:
        await rt.launch("echo", echo)
        await rt.activate("echo")

        # One call level on each side, as for the baseline's bound methods.
        send = functools.partial(rt.send, "echo")
        receive = functools.partial(rt.receive, "echo")

        base = BaselineActor()
        # Interleave repeats so drift on a noisy machine hits both sides alike.
        for _ in range(repeats):
            base_tt.append(await throughput_tasks(base.send, base.receive, n // 4))
            ours_tt.append(await throughput_tasks(send, receive, n // 4))
            base_tp.append(await throughput(base.send, base.receive, n))
            ours_tp.append(await throughput(send, receive, n))
            base_lat.append(await latency(base.send, base.receive, n // 10))
            ours_lat.append(await latency(send, receive, n // 10))
        await base.close()
        tele = rt.get_telemetry("echo")

    b_tp, o_tp = statistics.median(base_tp), statistics.median(ours_tp)
    b_tt, o_tt = statistics.median(base_tt), statistics.median(ours_tt)
    b_p50 = statistics.median(x[0] for x in base_lat)
    o_p50 = statistics.median(x[0] for x in ours_lat)
    b_p99 = statistics.median(x[1] for x in base_lat)
    o_p99 = statistics.median(x[1] for x in ours_lat)
    print(f"messages per run: {n}, repeats: {repeats}, window: {WINDOW}")
    print(f"{'':24}{'baseline':>14}{'pydotcompute':>14}{'ratio':>10}")
    print(
        f"{'msg/s, 2 client tasks':24}{b_tt:14,.0f}{o_tt:14,.0f}{o_tt / b_tt:10.2f}x  (goal >= 0.85)"
    )
    print(
        f"{'msg/s, 1 client task':24}{b_tp:14,.0f}{o_tp:14,.0f}{o_tp / b_tp:10.2f}x  (per-call cost)"
    )
    print(f"{'latency p50 (us)':24}{b_p50:14.1f}{o_p50:14.1f}{o_p50 / b_p50:10.2f}x  (goal <= 1.2)")
    print(f"{'latency p99 (us)':24}{b_p99:14.1f}{o_p99:14.1f}{o_p99 / b_p99:10.2f}x")
    print(f"runtime telemetry: processed={tele.messages_processed} p50={tele.latency_p50_us} us")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    asyncio.run(main(a.messages, a.repeats))
