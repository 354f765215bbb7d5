"""``pydotcompute demo``: a streaming pipeline of ring kernels with a live table.

Sensor readings flow ``sensors → zscore → detect → alerts``: ``zscore`` (a compiled
ring kernel on the best backend here: cuda with a GPU, else cpu) normalises each
reading against its sensor's running mean and variance, ``detect`` (an asyncio
actor, like ``alerts``) flags
readings more than 5 standard deviations out, ``alerts`` counts them. The demo
prints a live per-kernel table while it runs and a summary at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from typing import Any

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pydotcompute import RingKernelRuntime, message, ring_kernel
from pydotcompute.messages import messages_from_records, records_from_messages

N_SENSORS = 8
WARMUP = 30
THRESHOLD = 5.0  # sigmas; planted spikes are 12 sigma out, noise passes 5 once in 2 million


@message
class Reading:
    """One raw sample of one sensor."""

    sensor: int
    value: float


@message
class Score:
    """A reading normalised against its sensor's history."""

    sensor: int
    value: float
    z: float


@message
class Alert:
    """A reading far out of its sensor's normal range."""

    sensor: int
    value: float
    z: float


@ring_kernel(
    kernel_id="zscore",
    input_type=Reading,
    output_type=Score,
    backend="auto",
    state=np.zeros((N_SENSORS, 3)),
    auto_register=False,
)
def zscore(msg: Any, out: Any, state: Any) -> bool:
    """Compiled handler: running count/mean/M2 per sensor in ``state`` (Welford),
    emitting each reading's z-score. Runs on cuda where a GPU is usable, else cpu."""
    s = msg.sensor
    n = state[s, 0] + 1.0
    delta = msg.value - state[s, 1]
    mean = state[s, 1] + delta / n
    m2 = state[s, 2] + delta * (msg.value - mean)
    state[s, 0] = n
    state[s, 1] = mean
    state[s, 2] = m2
    # z stays 0 until a sensor has history enough for its variance to mean something
    std = math.sqrt(m2 / (n - 1.0)) if n > WARMUP else 0.0
    out.sensor = s
    out.value = msg.value
    out.z = (msg.value - mean) / std if std > 0.0 else 0.0
    for i in range(16):
        out.correlation_id[i] = msg.message_id[i]
    return True


@ring_kernel(kernel_id="detect", input_type=Score, auto_register=False)
async def detect(ctx: Any) -> None:
    """Forward readings beyond THRESHOLD sigmas to the ``alerts`` kernel."""
    while not ctx.should_terminate:
        s = await ctx.receive()
        if abs(s.z) > THRESHOLD:
            await ctx.send_to("alerts", Alert(sensor=s.sensor, value=s.value, z=s.z))


@ring_kernel(kernel_id="alerts", input_type=Alert, auto_register=False)
async def alerts(ctx: Any) -> None:
    """Sink for alerts: its processed count is the number of alerts raised."""
    while not ctx.should_terminate:
        await ctx.receive()


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a streaming pipeline of ring kernels with a live table")
    p.add_argument("--seconds", type=float, default=5.0, help="how long to stream (default 5)")
    p.add_argument(
        "--rate", type=int, default=0, help="readings per second (0: as fast as possible)"
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--serve",
        action="store_true",
        help="serve /metrics and the dashboard while it runs (watch it with top or a browser)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="port for --serve (default 9464, where top and dashboard look; 0: any free one)",
    )
    p.set_defaults(run=run)


def _table(rt: RingKernelRuntime, elapsed: float) -> Table:
    table = Table(title=f"pydotcompute demo — {elapsed:4.1f} s", title_justify="left")
    for col in (
        "kernel",
        "backend",
        "state",
        "processed",
        "msg/s",
        "queue",
        "dropped",
        "p50 µs",
        "p99 µs",
    ):
        table.add_column(col, justify="left" if col in ("kernel", "backend", "state") else "right")
    for kid, t in rt.get_all_telemetry().items():
        table.add_row(
            kid,
            t.backend,
            t.state,
            f"{t.messages_processed:,}",
            f"{t.throughput:,.0f}",
            f"{t.queue_depth}/{t.queue_capacity}",
            f"{t.messages_dropped:,}",
            "-" if t.latency_p50_us is None else f"{t.latency_p50_us:,.1f}",
            "-" if t.latency_p99_us is None else f"{t.latency_p99_us:,.1f}",
        )
    return table


async def stream(
    seconds: float,
    rate: int,
    seed: int,
    console: Console,
    serve: bool = False,
    port: int | None = None,
) -> dict[str, Any]:
    """Run the pipeline for ``seconds``; returns the summary numbers. With ``serve``,
    its metrics and dashboard are served meanwhile (on ``port``, by default 9464)."""
    rng = random.Random(seed)
    centres = [rng.uniform(-50, 50) for _ in range(N_SENSORS)]
    sent = planted = 0
    async with RingKernelRuntime() as rt:
        for kid, fn in (("zscore", zscore), ("detect", detect), ("alerts", alerts)):
            await rt.launch(kid, fn, queue_size=4096)
            await rt.activate(kid)
        if serve:
            rt.serve_metrics(port=port)
            url = rt.serve_dashboard()
            console.print(f"metrics:   {url}metrics   (pydotcompute top {url}metrics)")
            console.print(f"dashboard: {url}", soft_wrap=True)

        async def pump() -> None:  # zscore's output records feed the detect actor
            while True:
                batch = await rt.receive_batch("zscore", 1024)
                for score in messages_from_records(Score, batch):
                    await rt.send("detect", score)

        pump_task = asyncio.ensure_future(pump())
        t0 = time.monotonic()
        with Live(_table(rt, 0.0), console=console, refresh_per_second=4, transient=False) as live:
            next_draw = t0
            while (now := time.monotonic()) - t0 < seconds:
                readings = []
                for _ in range(256):
                    s = rng.randrange(N_SENSORS)
                    value = rng.gauss(centres[s], 1.0)
                    if sent > 1000 and rng.random() < 0.001:
                        value += rng.choice((-1, 1)) * 12.0
                        planted += 1
                    readings.append(Reading(sensor=s, value=value))
                    sent += 1
                # one ring operation for the whole batch
                await rt.send_batch("zscore", records_from_messages(readings))
                if rate:
                    await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
                else:
                    await asyncio.sleep(0)
                if now >= next_draw:
                    live.update(_table(rt, now - t0))
                    next_draw = now + 0.25
            # let the queues drain (bounded: 10 s), then show the final state
            for _ in range(1000):
                tele = rt.get_all_telemetry()
                if (
                    all(t.queue_depth == 0 for t in tele.values())
                    and tele["detect"].messages_processed >= sent - 1
                ):
                    break
                await asyncio.sleep(0.01)
            elapsed = time.monotonic() - t0
            live.update(_table(rt, elapsed))
        pump_task.cancel()
        await asyncio.gather(pump_task, return_exceptions=True)
        tele = rt.get_all_telemetry()
    return {
        "sent": sent,
        "planted": planted,
        "alerts": tele["alerts"].messages_processed,
        "elapsed": elapsed,
        "telemetry": tele,
    }


def run(args: argparse.Namespace) -> int:
    console = Console()
    console.print(
        "[bold]pydotcompute demo[/]: sensors → zscore → detect → alerts "
        f"({N_SENSORS} sensors, {args.seconds:g} s)"
    )
    try:
        summary = asyncio.run(
            stream(args.seconds, args.rate, args.seed, console, args.serve, args.port)
        )
    except OSError as exc:  # the port is taken
        console.print(f"[red]cannot serve: {exc}[/red]")
        return 1
    tele = summary["telemetry"]
    console.print(
        f"\n[bold]summary[/]: {summary['sent']:,} readings in {summary['elapsed']:.1f} s "
        f"({summary['sent'] / summary['elapsed']:,.0f}/s end to end); "
        f"{summary['planted']} anomalies planted, {summary['alerts']} alerts raised; "
        f"dropped {sum(t.messages_dropped for t in tele.values())}, "
        f"errors {sum(t.errors for t in tele.values())}"
    )
    return 0
