"""What watching a runtime costs: busy kernels with telemetry on and scraped, vs off.

For each kernel shape, rounds rotate between three settings:

* ``off``: ``RingKernelRuntime(enable_telemetry=False)``, no metrics server;
* ``on``: ``RingKernelRuntime(enable_telemetry=True)``, nothing scraping (what the
  backends themselves spend per message on telemetry);
* ``on+scraped``: the same, with ``rt.serve_metrics()`` running and another process
  reading ``/metrics`` over HTTP every 100 ms (as Prometheus, ``top`` or
  the dashboard would, only faster).

Each round runs the three settings back to back (rotating which goes first), so the
machine's load drifts over all three alike; a round's ratios compare its own runs.
The verdict is the median of the rounds' wall-clock ratios, printed with their
quartiles and extremes, beside the scrapes answered and how long they took. For the
host actor the same ratios per CPU-second of this process are printed too: on a
machine shared with other work they scatter far less. Shapes:

* ``host``: an ``async def`` echo actor kept busy with 256 messages in flight;
* ``cpu``: a compiled ``cpu`` kernel fed batches of 4096 records, 16 batches in flight.

    python benchmarks/telemetry_overhead.py [--seconds S] [--rounds R]

About 45 s with the defaults.

Goal: on+scraped / off >= 0.95x for every shape.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import numpy as np

from pydotcompute import BackendNotAvailableError, RingKernelRuntime, message

WINDOW = 256
SCRAPE_EVERY_S = 0.1


async def host_echo(ctx):  # type: ignore[no-untyped-def]
    while True:
        await ctx.send(await ctx.receive())


# The scraper is a separate process, as Prometheus, ``top`` or a browser would be: the
# runtime's process pays only for answering the scrapes.
_SCRAPER = """
import select, sys, time, urllib.request
url, every = sys.argv[1], float(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()  # "go"
took, next_at = [], time.monotonic() + every
while not select.select([sys.stdin], [], [], max(0.0, next_at - time.monotonic()))[0]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        r.read()
    took.append(time.perf_counter() - t0)
    next_at = max(next_at + every, time.monotonic())  # a late scrape does not pile up
print(" ".join(map(str, took)), flush=True)
"""


class Scraper:
    """A child process that GETs ``/metrics`` every ``SCRAPE_EVERY_S`` while running;
    ``took`` holds each scrape's duration (s) once it has stopped.

    The runtime answers on its event loop, so the loop never blocks on the child:
    ``stop()`` waits for it from a worker thread.
    """

    def __init__(self, url: str) -> None:
        self.took: list[float] = []
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SCRAPER, url, str(SCRAPE_EVERY_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdout.readline()  # started: its start-up is not timed

    def start(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write("go\n")
        self._proc.stdin.flush()

    async def stop(self) -> None:
        out, _ = await asyncio.to_thread(self._proc.communicate, "stop\n", 30)
        if self._proc.returncode != 0:
            raise RuntimeError(f"scraper failed with status {self._proc.returncode}")
        self.took = [float(x) for x in out.split()]


Outcome = tuple[float, float, list[float]]
"""A run's messages per second and per CPU-second of this process, and the duration of
each scrape that happened meanwhile."""


async def host_round(seconds: float, setting: str) -> Outcome:
    """Messages/s of a busy echo actor, and the scrapes meanwhile."""
    async with RingKernelRuntime(enable_telemetry=setting != "off") as rt:
        await rt.launch("echo", host_echo, queue_size=WINDOW * 2)
        await rt.activate("echo")

        async def drive(deadline: float) -> int:
            for i in range(WINDOW):
                await rt.send("echo", i)
            n = 0
            while time.perf_counter() < deadline:
                for _ in range(1000):
                    await rt.receive("echo")
                    await rt.send("echo", n)
                    n += 1
            for _ in range(WINDOW):
                await rt.receive("echo")
            return n + WINDOW

        return await _timed(rt, setting, drive, seconds)


@message
class Sample:
    x: float
    y: float


def scale(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x * 2.0
    out.y = msg.y + 1.0
    return True


async def cpu_round(seconds: float, setting: str) -> Outcome:
    """Messages/s of a busy cpu kernel fed record batches, and the scrapes meanwhile."""
    batch = 4096
    records = np.zeros(batch, dtype=Sample.__record_dtype__)
    records["x"] = np.arange(batch)
    async with RingKernelRuntime(enable_telemetry=setting != "off") as rt:
        await rt.launch(
            "scale",
            scale,
            input_type=Sample,
            output_type=Sample,
            backend="cpu",
            queue_size=32 * batch,
        )
        await rt.activate("scale")

        async def drive(deadline: float) -> int:
            sent = received = 0
            while received < sent or time.perf_counter() < deadline:
                while time.perf_counter() < deadline and sent - received + batch <= 16 * batch:
                    sent += await rt.send_batch("scale", records, timeout=10)
                received += len(await rt.receive_batch("scale", 16 * batch, timeout=10))
            return received

        return await _timed(rt, setting, drive, seconds)


async def _timed(
    rt: RingKernelRuntime,
    setting: str,
    drive: Callable[[float], Awaitable[int]],
    seconds: float,
) -> Outcome:
    """Run ``drive`` for about ``seconds`` under ``setting``."""
    scraper = None
    if setting == "scraped":
        host, port = rt.serve_metrics(port=0)
        scraper = Scraper(f"http://{host}:{port}/metrics")
        scraper.start()
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        n = await drive(t0 + seconds)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        if scraper is not None:
            await scraper.stop()
    return n / elapsed, n / cpu, scraper.took if scraper is not None else []


Round = Callable[[float, str], Awaitable[Outcome]]


SETTINGS = ("off", "on", "scraped")


def _spread(ratios: list[float]) -> str:
    spread = f"range {min(ratios):.3f}..{max(ratios):.3f}"
    if len(ratios) < 2:  # quartiles need two rounds
        return spread
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"quartiles {q1:.3f}..{q3:.3f}, {spread}"


def _ratios(rates: dict[str, list[float]], setting: str) -> list[float]:
    # Each round's own ratio: its runs were seconds apart, under the same load.
    return [x / off for x, off in zip(rates[setting], rates["off"], strict=True)]


async def compare(
    name: str, round_fn: Round, seconds: float, rounds: int, *, per_cpu: bool
) -> float:
    """Print the shape's figures; returns the median on+scraped / off ratio.

    ``per_cpu`` adds messages per CPU-second of this process, a cross-check that other
    processes on a shared machine disturb much less than wall-clock rates (meaningful
    where the process does nothing but the work: not beside a spinning kernel thread).
    """
    await round_fn(0.2, "scraped")  # warm up (compilation, first server start)
    rates: dict[str, list[float]] = {s: [] for s in SETTINGS}
    cpu_rates: dict[str, list[float]] = {s: [] for s in SETTINGS}
    took: list[float] = []
    for i in range(rounds):
        # Rotate which setting goes first, so a drift in machine load hits all alike.
        for setting in SETTINGS[i % 3 :] + SETTINGS[: i % 3]:
            rate, cpu_rate, scrapes = await round_fn(seconds, setting)
            rates[setting].append(rate)
            cpu_rates[setting].append(cpu_rate)
            took += scrapes
    on_ratios, ratios = _ratios(rates, "on"), _ratios(rates, "scraped")
    ratio = statistics.median(ratios)
    ms = sorted(t * 1000 for t in took) or [float("nan")]
    print(
        f"{name:5} off {statistics.median(rates['off']):>13,.0f} msg/s (median run)\n"
        f"{'':5} on          {statistics.median(on_ratios):.3f}x   ({_spread(on_ratios)})\n"
        f"{'':5} on+scraped  {ratio:.3f}x   ({_spread(ratios)})  "
        f"{'OK' if ratio >= 0.95 else 'BELOW GOAL'}"
    )
    if per_cpu:
        cpu_on, cpu_scraped = _ratios(cpu_rates, "on"), _ratios(cpu_rates, "scraped")
        print(
            f"{'':5} per CPU-second: on {statistics.median(cpu_on):.3f}x "
            f"({_spread(cpu_on)}), on+scraped {statistics.median(cpu_scraped):.3f}x "
            f"({_spread(cpu_scraped)})"
        )
    print(
        f"{'':5} {len(took)} scrapes answered ({len(took) / (rounds * seconds):.1f}/s), "
        f"median {ms[len(ms) // 2]:.1f} ms, slowest {ms[-1]:.1f} ms"
    )
    return ratio


async def main_async(seconds: float, rounds: int) -> None:
    print(f"telemetry overhead: {rounds} rounds, each {seconds} s per setting")
    print(
        "off: enable_telemetry=False | on: enable_telemetry=True, nothing scraping | "
        f"on+scraped: on, and /metrics read over HTTP every {SCRAPE_EVERY_S * 1000:.0f} ms "
        "by another process.\nratios: median over rounds of (setting / off in the same "
        "round); goal: on+scraped >= 0.95x\n"
    )
    await compare("host", host_round, seconds, rounds, per_cpu=True)
    try:
        await compare("cpu", cpu_round, seconds, rounds, per_cpu=False)
    except BackendNotAvailableError as exc:
        print(f"cpu    skipped: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.4, help="length of one run")
    parser.add_argument("--rounds", type=int, default=15, help="rounds (one run per setting)")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds above 0")
    asyncio.run(main_async(args.seconds, args.rounds))


if __name__ == "__main__":
    main()
