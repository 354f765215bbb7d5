"""Echo actor round trip: pydotcompute host actor vs the cheapest asyncio actor.

Throughput keeps a window of 256 messages in flight, measured with two client shapes:

* ``sender+receiver tasks``: one task sends (bounded by a 256-slot semaphore), another
  receives -- how an application usually drives an actor. The goal applies here. The
  semaphore costs every side the same per message (``asyncio.Semaphore.acquire``
  scans its waiters each time), which narrows every ratio a little.
* ``one task``: a single coroutine alternates receive/send with 256 queued. Neither
  side switches tasks, so this isolates per-call overhead. Reported for transparency;
  no goal.

Latency sends one message at a time (p50 and p99 of the round trip).

The baseline is measured in the same run: a task reading a deque woken by an
``asyncio.Event``, answering through another deque and event -- no bound, no
lifecycle, no telemetry. A second reference, the *API-shaped floor*, is the same
actor written the way a ring kernel must be: its loop awaits two tiny coroutine
methods per message (``await out(await inp())``), as ``ctx.send(await ctx.receive())``
does. It shows how much of the gap the API shape alone costs; it has no goal. Two more
references add, one at a time, what the runtime is asked to do on every message: the
*bounded floor* checks a queue bound on each put and counts what the actor processed
(``queue_size`` and ``messages_processed``); the *addressed floor* also takes the
actor's id on every call and looks it up (``rt.send(kernel_id, msg)``). That last one
does the least the runtime's API asks for, so it is the floor the runtime is held to;
the ratios to it are printed too.

Every measurement is repeated; repetitions interleave the references and
pydotcompute so drift on a busy machine hits them all alike. Ratios are taken per
repetition (each against the baseline run next to it) and reported as the median with
the lowest and highest repetition.

    python benchmarks/actor_roundtrip.py [--messages N] [--repeats R]

Goals: throughput (sender+receiver tasks) >= 0.8x the addressed floor, p50 latency
<= 1.2x the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable

from pydotcompute import RingKernelRuntime, ring_kernel

WINDOW = 256

Send = Callable[[object], Awaitable[None]]
Receive = Callable[[], Awaitable[object]]


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


class FloorActor(BaselineActor):
    """The baseline with the actor calling two coroutine methods per message."""

    async def _run(self) -> None:
        while True:
            await self._out(await self._in())

    async def _in(self) -> object:
        inbox = self.inbox
        while not inbox:
            self.in_ev.clear()
            await self.in_ev.wait()
        return inbox.popleft()

    async def _out(self, msg: object) -> None:
        self.outbox.append(msg)
        self.out_ev.set()


class BoundedFloor(FloorActor):
    """The floor with a queue bound checked on each put and a processed count."""

    capacity = 4096
    processed = 0

    async def _out(self, msg: object) -> None:
        if len(self.outbox) < self.capacity:
            self.outbox.append(msg)
            self.processed += 1
            self.out_ev.set()

    async def send(self, msg: object) -> None:
        if len(self.inbox) < self.capacity:
            self.inbox.append(msg)
            self.in_ev.set()


class AddressedFloor(BoundedFloor):
    """The bounded floor reached through an id looked up on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.actors = {"echo": self}

    async def send_to(self, actor_id: str, msg: object) -> None:
        actor = self.actors[actor_id]
        if len(actor.inbox) < actor.capacity:
            actor.inbox.append(msg)
            actor.in_ev.set()

    async def receive_from(self, actor_id: str) -> object:
        actor = self.actors[actor_id]
        outbox = actor.outbox
        while not outbox:
            actor.out_ev.clear()
            await actor.out_ev.wait()
        return outbox.popleft()


@ring_kernel(kernel_id="bench_echo", auto_register=False)
async def echo(ctx):  # type: ignore[no-untyped-def]
    while True:
        await ctx.send(await ctx.receive())


async def throughput(send: Send, receive: Receive, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(WINDOW):
        await send(i)
    for i in range(n - WINDOW):
        await receive()
        await send(i)
    for _ in range(WINDOW):
        await receive()
    return n / (time.perf_counter() - t0)


async def throughput_tasks(send: Send, receive: Receive, n: int) -> float:
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


async def latency(send: Send, receive: Receive, n: int) -> tuple[float, float]:
    samples = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        await send(i)
        await receive()
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def _spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


async def main(n: int, repeats: int) -> None:
    names = ("baseline", "floor", "bounded floor", "addressed floor", "pydotcompute")
    # rows[shape][name] -> one value per repetition
    rows: dict[str, dict[str, list[float]]] = {
        s: {k: [] for k in names} for s in ("tasks", "one", "p50", "p99")
    }
    async with RingKernelRuntime() as rt:
        await rt.launch("echo", echo)
        await rt.activate("echo")
        # One call level on each side, as for the baseline's bound methods.
        ours = (functools.partial(rt.send, "echo"), functools.partial(rt.receive, "echo"))
        base, floor, bounded, addressed = (
            BaselineActor(),
            FloorActor(),
            BoundedFloor(),
            AddressedFloor(),
        )
        actors = {
            "baseline": (base.send, base.receive),
            "floor": (floor.send, floor.receive),
            "bounded floor": (bounded.send, bounded.receive),
            "addressed floor": (
                functools.partial(addressed.send_to, "echo"),
                functools.partial(addressed.receive_from, "echo"),
            ),
            "pydotcompute": ours,
        }
        for r in range(repeats):
            # Rotate who goes first so a trend over the run favours no one.
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                rows["tasks"][name].append(await throughput_tasks(*actors[name], n // 4))
            for name in order:
                rows["one"][name].append(await throughput(*actors[name], n))
            for name in order:
                p50, p99 = await latency(*actors[name], n // 10)
                rows["p50"][name].append(p50)
                rows["p99"][name].append(p99)
        for reference in (base, floor, bounded, addressed):
            await reference.close()
        tele = rt.get_telemetry("echo")

    def ratios(shape: str, name: str, to: str = "baseline") -> list[float]:
        return [o / b for o, b in zip(rows[shape][name], rows[shape][to], strict=True)]

    print(f"messages per run: {n}, repeats: {repeats}, window: {WINDOW}")
    print("median [lowest-highest] over the repetitions; ratios are per repetition\n")
    labels = {
        "tasks": ("msg/s, 2 client tasks", ",.0f", "goal >= 0.8 the addressed floor"),
        "one": ("msg/s, 1 client task", ",.0f", "per-call cost"),
        "p50": ("latency p50 (us)", ".1f", "goal <= 1.2"),
        "p99": ("latency p99 (us)", ".1f", ""),
    }
    for shape, (label, fmt, note) in labels.items():
        print(f"{label}  ({note})" if note else label)
        for name in names:
            line = f"  {name:16}{_spread(rows[shape][name], fmt):>34}"
            if name != "baseline":
                line += f"   ratio {_spread(ratios(shape, name), '.2f')}"
            print(line)
        if shape in ("tasks", "one"):
            floor = _spread(ratios(shape, "pydotcompute", "addressed floor"), ".2f")
            print(f"  {'pydotcompute / addressed floor':50}   ratio {floor}")
    print(f"\nruntime telemetry: processed={tele.messages_processed} p50={tele.latency_p50_us} us")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    if a.messages < 4 * WINDOW or a.repeats < 1:
        # Fewer than a window per throughput run would time a partly filled window.
        ap.error(f"--messages must be at least {4 * WINDOW} and --repeats at least 1")
    asyncio.run(main(a.messages, a.repeats))
