"""``pydotcompute top [URL]``: a live terminal table of a runtime's kernels.

It reads any runtime's ``/metrics`` endpoint, so it watches a process it does not share
memory with. msg/s comes from counter deltas between two scrapes; p50/p99 are estimated
from the latency histogram buckets that changed between them (the lifetime buckets when
nothing was handled in between).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.text import Text

from pydotcompute.cli.fit import Column, fit_table
from pydotcompute.telemetry.scrape import (
    Scrape,
    bucket_delta,
    counter_rate,
    fetch_metrics,
    histogram_quantile,
    normalize_metrics_url,
    parse_metrics,
)
from pydotcompute.telemetry.server import DEFAULT_METRICS_PORT, default_metrics_port

__all__ = [
    "register",
    "add_top_arguments",
    "run_top",
    "render_top",
    "DEFAULT_METRICS_URL",
    "default_metrics_url",
]

DEFAULT_METRICS_URL = f"http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics"


def default_metrics_url() -> str:
    """Where ``top`` and ``dashboard`` look by default: where ``serve_metrics`` listens
    by default (``PYDOTCOMPUTE_METRICS_PORT`` moves both)."""
    return f"http://127.0.0.1:{default_metrics_port()}/metrics"


_STATE_STYLE = {
    "active": "green",
    "failed": "bold red",
    "deactivated": "yellow",
    "terminating": "yellow",
    "terminated": "dim",
}


def register(sub: Any) -> None:
    """Add the ``top`` subcommand to the ``pydotcompute`` command's subparsers."""
    p = sub.add_parser("top", help="live table of a runtime's kernels, read from its /metrics")
    add_top_arguments(p)
    p.set_defaults(run=run_top)


def add_top_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``top``'s arguments to a (sub)parser."""
    url = default_metrics_url()
    parser.add_argument(
        "url",
        nargs="?",
        default=url,
        help=f"the runtime's /metrics URL, or host:port (default {url})",
    )
    parser.add_argument(
        "-n",
        "--interval",
        type=float,
        default=1.0,
        help="seconds between refreshes (default 1)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="scrape twice, one interval apart, print one table and exit",
    )


def run_top(
    args: argparse.Namespace,
    *,
    console: Console | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run ``top`` until Ctrl-C (or once with ``--once``); returns the exit status."""
    console = console or Console()
    url = normalize_metrics_url(args.url)
    interval = max(0.05, float(args.interval))
    if args.once:
        return _run_once(url, interval, console, sleep)
    previous: Scrape | None = None
    try:
        with Live(
            Text(f"connecting to {url} …"), console=console, auto_refresh=False, transient=False
        ) as live:
            while True:
                try:
                    current = parse_metrics(fetch_metrics(url, timeout=max(interval, 2.0)))
                except (OSError, ValueError) as exc:
                    live.update(_unreadable(url, exc, "retrying"), refresh=True)
                else:
                    live.update(render_top(previous, current, url), refresh=True)
                    previous = current
                sleep(interval)
    except KeyboardInterrupt:
        return 0


def _run_once(url: str, interval: float, console: Console, sleep: Callable[[float], None]) -> int:
    try:
        first = parse_metrics(fetch_metrics(url))
        sleep(interval)
        second = parse_metrics(fetch_metrics(url))
    except (OSError, ValueError) as exc:
        console.print(_unreadable(url, exc))
        return 1
    except KeyboardInterrupt:
        return 0
    console.print(render_top(first, second, url))
    return 0


def _unreadable(url: str, exc: BaseException, then: str = "") -> Text:
    # OSError: unreachable or an HTTP error; ValueError: the body is not Prometheus text.
    what = "not Prometheus text" if isinstance(exc, ValueError) else "cannot read it"
    return Text(f"{url}: {what}: {exc}" + (f" ({then})" if then else ""), style="red")


KERNEL_COLUMNS = [
    Column("kernel", wrap=False, min_width=8),
    Column("state", wrap=False, min_width=6),
    Column("backend", drop=7, short="on", wrap=False, min_width=4),
    Column("msg/s", number=True),
    Column("queue", number=True),
    Column("fill", number=True, drop=5),
    Column("dropped", number=True, drop=3, short="drop"),
    Column("rejected", number=True, drop=6, short="rej"),
    Column("failed", number=True, drop=2, short="fail"),
    Column("p50", number=True, drop=4),
    Column("p99", number=True),
    Column("restarts", number=True, drop=8, short="rst"),
    Column("idle/s", number=True, drop=9),
]
"""``top``'s kernel columns: at 80 columns the low-priority ones go first (see ``fit``)."""

FLOW_COLUMNS = [
    Column("flow", wrap=False, min_width=8),
    Column("submitted", number=True, drop=3, short="in"),
    Column("completed", number=True, short="done"),
    Column("items/s", number=True),
    Column("retried", number=True, drop=2, short="retry"),
    Column("dead", number=True),
    Column("in flight", number=True, drop=1, short="flight"),
]


class TopFrame:
    """One frame of ``top``: the kernel table, GPU lines and flows, laid out for the
    width it is rendered at (numbers are never cut; see ``fit_table``)."""

    def __init__(self, previous: Scrape | None, current: Scrape, url: str = "") -> None:
        self.previous = previous
        self.current = current
        self.url = url

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        previous, current = self.previous, self.current
        dt = current.time - previous.time if previous is not None else 0.0
        yield fit_table(
            KERNEL_COLUMNS,
            _kernel_rows(previous, current, dt),
            width,
            title=f"pydotcompute · {self.url}" if self.url else "pydotcompute",
            title_justify="left",
            caption=None if current.kernels else "no kernels",
        )
        yield from _gpu_lines(current, width)
        if current.flows:
            yield fit_table(
                FLOW_COLUMNS,
                _flow_rows(previous, current, dt),
                width,
                title="flows",
                title_justify="left",
            )


def render_top(previous: Scrape | None, current: Scrape, url: str = "") -> RenderableType:
    """One frame of ``top``: the kernel table, then GPU lines and flows."""
    return TopFrame(previous, current, url)


def _kernel_rows(previous: Scrape | None, current: Scrape, dt: float) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for name in sorted(current.kernels):
        k = current.kernels[name]
        p = previous.kernels.get(name) if previous is not None else None
        rate = counter_rate(p.messages_processed, k.messages_processed, dt) if p else None
        idle = counter_rate(p.idle_polls, k.idle_polls, dt) if p else None
        buckets = k.latency_buckets
        if p is not None:
            window = bucket_delta(p.latency_buckets, buckets)
            if window and window[-1][1] > 0:
                buckets = window
        fill = k.queue_fill
        rows.append(
            [
                name,
                Text(k.state, style=_STATE_STYLE.get(k.state, "")),
                k.backend,
                _si(rate),
                f"{k.queue_depth:.0f}/{k.queue_capacity:.0f}",
                Text(f"{fill:.0%}", style="red" if fill >= 1 else "yellow" if fill >= 0.8 else ""),
                _count(k.messages_dropped),
                _count(k.messages_rejected),
                _count(k.errors),
                _duration(histogram_quantile(0.5, buckets)),
                _duration(histogram_quantile(0.99, buckets)),
                _si(k.restarts),
                _si(idle),
            ]
        )
    return rows


def _gpu_lines(scrape: Scrape, width: int = 1000) -> list[RenderableType]:
    if not scrape.gpus:
        if scrape.nvml_available is False:
            return [Text("GPU: no readings here (NVML unavailable)", style="dim")]
        return []
    lines: list[RenderableType] = []
    for gid in sorted(scrape.gpus, key=lambda g: (len(g), g)):
        g = scrape.gpus[gid]
        util = "–" if g.utilization is None else f"{g.utilization:.0%}"
        temp = "–" if g.temperature_celsius is None else f"{g.temperature_celsius:.0f}°C"
        power = "–" if g.power_watts is None else f"{g.power_watts:.0f} W"
        parts = [
            f"GPU {gid}",
            f"util {util}",
            f"mem {_bytes(g.memory_used_bytes)}/{_bytes(g.memory_total_bytes)}",
            temp,
            power,
            f"PCIe tx {_per_second(g.pcie_tx_bytes_per_second)}"
            f" rx {_per_second(g.pcie_rx_bytes_per_second)}",
        ]
        # The least needed readings go first when the line would not fit.
        while len(parts) > 3 and len("  ".join(parts)) > width:
            parts.pop()
        lines.append(Text("  ".join(parts)))
    return lines


def _flow_rows(previous: Scrape | None, current: Scrape, dt: float) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for name in sorted(current.flows):
        f = current.flows[name]
        p = previous.flows.get(name) if previous is not None else None
        rate = counter_rate(p.completed, f.completed, dt) if p else None
        rows.append(
            [
                name,
                _si(f.submitted),
                _si(f.completed),
                _si(rate),
                _si(f.retried),
                _count(f.dead_lettered),
                _si(f.in_flight),
            ]
        )
    return rows


def _count(v: float) -> Text:
    return Text(_si(v), style="red" if v else "")


def _si(v: float | None) -> str:
    if v is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{v:.0f}" if v == int(v) or abs(v) >= 100 else f"{v:.1f}"


def _bytes(v: float | None) -> str:
    if v is None:
        return "–"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= scale:
            return f"{v / scale:.1f} {unit}"
    return f"{v:.0f} B"


def _per_second(v: float | None) -> str:
    return "–" if v is None else f"{_bytes(v)}/s"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def main(argv: list[str] | None = None) -> int:
    """Run ``top`` as its own program (``python -m pydotcompute.cli.top``)."""
    parser = argparse.ArgumentParser(prog="pydotcompute top", description=__doc__)
    add_top_arguments(parser)
    return run_top(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
