"""``pydotcompute top`` against a fixture endpoint serving fixed metrics text."""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from rich.console import Console

from pydotcompute.cli.top import add_top_arguments, render_top, run_top
from pydotcompute.telemetry.scrape import histogram_quantile, normalize_metrics_url, parse_metrics

LABELS = 'backend="cpu",kernel="scale"'


def metrics_text(processed: int, le_counts: tuple[int, int, int], gpu: bool = True) -> str:
    """A runtime's /metrics as written by the collector (abridged)."""
    b1, b2, b3 = le_counts
    lines = [
        "# TYPE pydotcompute_kernel_messages_processed_total counter",
        f"pydotcompute_kernel_messages_processed_total{{{LABELS}}} {processed}",
        "# TYPE pydotcompute_kernel_messages_dropped_total counter",
        f"pydotcompute_kernel_messages_dropped_total{{{LABELS}}} 4",
        "# TYPE pydotcompute_kernel_messages_rejected_total counter",
        f"pydotcompute_kernel_messages_rejected_total{{{LABELS}}} 0",
        "# TYPE pydotcompute_kernel_messages_failed_total counter",
        f"pydotcompute_kernel_messages_failed_total{{{LABELS}}} 0",
        "# TYPE pydotcompute_kernel_idle_polls_total counter",
        f"pydotcompute_kernel_idle_polls_total{{{LABELS}}} {processed // 2}",
        "# TYPE pydotcompute_kernel_queue_depth gauge",
        f"pydotcompute_kernel_queue_depth{{{LABELS}}} 768",
        "# TYPE pydotcompute_kernel_queue_capacity gauge",
        f"pydotcompute_kernel_queue_capacity{{{LABELS}}} 1024",
        "# TYPE pydotcompute_kernel_state gauge",
        f'pydotcompute_kernel_state{{{LABELS},state="active"}} 1',
        f'pydotcompute_kernel_state{{{LABELS},state="failed"}} 0',
        'pydotcompute_kernel_state{backend="host",kernel="sink",state="failed"} 1',
        "# TYPE pydotcompute_kernel_latency_seconds histogram",
        f'pydotcompute_kernel_latency_seconds_bucket{{{LABELS},le="1e-05"}} {b1}',
        f'pydotcompute_kernel_latency_seconds_bucket{{{LABELS},le="2e-05"}} {b2}',
        f'pydotcompute_kernel_latency_seconds_bucket{{{LABELS},le="+Inf"}} {b3}',
        f"pydotcompute_kernel_latency_seconds_count{{{LABELS}}} {b3}",
        f"pydotcompute_kernel_latency_seconds_sum{{{LABELS}}} 0.001",
        "# TYPE pydotcompute_flow_items_completed_total counter",
        'pydotcompute_flow_items_completed_total{flow="etl"} 12',
        "# TYPE pydotcompute_gpu_nvml_available gauge",
        f"pydotcompute_gpu_nvml_available {1 if gpu else 0}",
    ]
    if gpu:
        lines += [
            "# TYPE pydotcompute_gpu_utilization_ratio gauge",
            'pydotcompute_gpu_utilization_ratio{gpu="0"} 0.42',
            "# TYPE pydotcompute_gpu_memory_used_bytes gauge",
            'pydotcompute_gpu_memory_used_bytes{gpu="0"} 2147483648',
            "# TYPE pydotcompute_gpu_memory_total_bytes gauge",
            'pydotcompute_gpu_memory_total_bytes{gpu="0"} 85899345920',
            "# TYPE pydotcompute_gpu_temperature_celsius gauge",
            'pydotcompute_gpu_temperature_celsius{gpu="0"} 55',
            "# TYPE pydotcompute_gpu_power_watts gauge",
            'pydotcompute_gpu_power_watts{gpu="0"} 180.5',
        ]
    return "\n".join(lines) + "\n"


class Fixture:
    """A local HTTP server that serves the given texts in turn (the last one repeats)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.hits = 0
        fixture = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = fixture.texts[min(fixture.hits, len(fixture.texts) - 1)].encode()
                fixture.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def endpoint() -> Iterator[Fixture]:
    fx = Fixture([metrics_text(1000, (10, 10, 10)), metrics_text(3000, (10, 210, 210))])
    yield fx
    fx.close()


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_top_arguments(parser)
    return parser.parse_args(list(argv))


def cells(out: str, kernel: str) -> list[str]:
    """The cells of ``kernel``'s row in a rendered table."""
    for line in out.splitlines():
        parts = [c.strip() for c in line.split("│")]
        parts = [c for c in parts if c]
        if parts[:1] == [kernel]:
            return parts
    raise AssertionError(f"no row for {kernel!r} in:\n{out}")


def recording_console() -> Console:
    return Console(file=io.StringIO(), width=160, record=True, color_system=None)


def test_frame_values_from_two_scrapes() -> None:
    first = parse_metrics(metrics_text(1000, (10, 10, 10)), now=100.0)
    second = parse_metrics(metrics_text(3000, (10, 210, 210)), now=102.0)
    console = recording_console()
    console.print(render_top(first, second, "http://x/metrics"))
    out = console.export_text()
    row = cells(out, "scale")
    # kernel state backend msg/s queue fill dropped rejected failed p50 p99 restarts idle/s
    assert row[:6] == ["scale", "active", "cpu", "1.0k", "768/1024", "75%"]
    assert row[6:9] == ["4", "0", "0"]
    # The 200 new samples all fell in (10 µs, 20 µs]: p50 = 15 µs, p99 = 19.95 µs.
    assert row[9:11] == ["15.0µs", "19.9µs"]
    assert row[12] == "500"  # idle polls per second
    assert cells(out, "sink")[1] == "failed"
    assert "GPU 0  util 42%  mem 2.0 GiB/80.0 GiB  55°C  180 W" in out
    assert "etl" in out


def test_first_frame_has_no_rate_and_lifetime_latency() -> None:
    only = parse_metrics(metrics_text(1000, (10, 10, 10)), now=1.0)
    console = recording_console()
    console.print(render_top(None, only))
    row = cells(console.export_text(), "scale")
    assert row[3] == "–"
    assert row[9] == "5.0µs"


def test_gpu_line_says_when_nvml_is_unavailable() -> None:
    scrape = parse_metrics(metrics_text(1, (0, 0, 0), gpu=False), now=1.0)
    console = recording_console()
    console.print(render_top(None, scrape))
    assert "no readings here (NVML unavailable)" in console.export_text()


def test_once_against_the_fixture_endpoint(endpoint: Fixture) -> None:
    console = recording_console()
    assert run_top(args(endpoint.url, "--once", "-n", "0.05"), console=console) == 0
    out = console.export_text()
    assert endpoint.hits == 2
    assert endpoint.url in out
    row = cells(out, "scale")
    assert row[:3] == ["scale", "active", "cpu"]
    assert row[3] != "–"  # a rate from the two scrapes
    assert row[9:11] == ["15.0µs", "19.9µs"]


def test_live_refreshes_until_ctrl_c(endpoint: Fixture) -> None:
    console = recording_console()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    assert run_top(args(endpoint.url, "-n", "0.2"), console=console, sleep=sleep) == 0
    assert endpoint.hits == 3
    assert sleeps == [0.2, 0.2, 0.2]
    assert "scale" in console.export_text()


def test_unreachable_endpoint(endpoint: Fixture) -> None:
    endpoint.close()
    console = recording_console()
    assert run_top(args(endpoint.url, "--once"), console=console) == 1
    out = console.export_text()
    assert "cannot read it" in out and "retrying" not in out


def test_endpoint_that_is_not_prometheus() -> None:
    fx = Fixture(["<html>this is a web page</html>\n"])
    try:
        console = recording_console()
        assert run_top(args(fx.url, "--once"), console=console) == 1
        assert "not Prometheus text" in console.export_text()
    finally:
        fx.close()


def test_live_keeps_trying_an_unreachable_endpoint(endpoint: Fixture) -> None:
    endpoint.close()
    console = recording_console()
    calls = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 2:
            raise KeyboardInterrupt

    assert run_top(args(endpoint.url, "-n", "0.1"), console=console, sleep=sleep) == 0
    assert "retrying" in console.export_text()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("localhost:9464", "http://localhost:9464/metrics"),
        ("http://h:1", "http://h:1/metrics"),
        ("http://h:1/custom", "http://h:1/custom"),
    ],
)
def test_url_forms(given: str, expected: str) -> None:
    assert normalize_metrics_url(given) == expected


def test_histogram_quantile_edges() -> None:
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None
    # Everything beyond the last finite bound reports that bound.
    assert histogram_quantile(0.99, [(1.0, 0.0), (float("inf"), 5.0)]) == 1.0
    assert histogram_quantile(0.5, [(2.0, 4.0), (float("inf"), 4.0)]) == 1.0


def _command(*argv: str) -> subprocess.Popen[str]:
    root = pathlib.Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        [sys.executable, "-m", "pydotcompute", *argv],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "160"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_command_once(endpoint: Fixture) -> None:
    proc = _command("top", endpoint.url, "--once", "--interval", "0.05")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert cells(out, "scale")[:3] == ["scale", "active", "cpu"]


def test_command_exits_cleanly_on_ctrl_c(endpoint: Fixture) -> None:
    proc = _command("top", endpoint.url, "--interval", "0.05")
    deadline = time.monotonic() + 30
    while endpoint.hits < 3 and time.monotonic() < deadline:  # it is refreshing
        time.sleep(0.02)
    assert endpoint.hits >= 3
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "scale" in out


def table_rows(out: str) -> list[list[str]]:
    """Every row of every table in ``out``, heading rows included, as stripped cells."""
    rows = []
    for line in out.splitlines():
        sep = "│" if "│" in line else "┃" if "┃" in line else None
        if sep is None:
            continue
        rows.append([c.strip() for c in line.strip().strip(sep).split(sep)])
    return rows


@pytest.mark.parametrize("width", [80, 100, 160])
def test_top_fits_the_terminal_and_never_cuts_a_number(width: int) -> None:
    from pydotcompute.cli.top import FLOW_COLUMNS, KERNEL_COLUMNS

    first = parse_metrics(metrics_text(1000, (10, 10, 10)), now=100.0)
    second = parse_metrics(metrics_text(987_654_321, (10, 210, 210)), now=102.0)
    long_name = "ingest-normalise-and-enrich-sensor-readings"
    second.kernels[long_name] = second.kernels["scale"]
    wide = Console(file=io.StringIO(), width=400, record=True, color_system=None)
    wide.print(render_top(first, second, "http://127.0.0.1:9464/metrics"))
    narrow = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    narrow.print(render_top(first, second, "http://127.0.0.1:9464/metrics"))
    out = narrow.export_text()
    assert max(len(line.rstrip()) for line in out.splitlines()) <= width

    names = {c.short or c.name: c.name for c in [*KERNEL_COLUMNS, *FLOW_COLUMNS]}
    names.update({c.name: c.name for c in [*KERNEL_COLUMNS, *FLOW_COLUMNS]})
    numbers = {c.name for c in [*KERNEL_COLUMNS, *FLOW_COLUMNS] if c.number}

    def by_column(text: str) -> dict[str, dict[str, str]]:
        table: dict[str, dict[str, str]] = {}
        heading: list[str] = []
        for row in table_rows(text):
            if row[0] in ("kernel", "flow"):
                heading = [names[h] for h in row]
                continue
            table[row[0]] = dict(zip(heading, row, strict=True))
        return table

    full, shown = by_column(wide.export_text()), by_column(out)
    cut = [n for n in shown if n.endswith("…")]
    assert set(shown) - set(cut) - {long_name} == {"scale", "sink", "etl"}
    if width < 160:
        assert cut and long_name.startswith(cut[0][:-1])  # the name is shortened ...
    else:
        assert long_name in shown
    for name, cells in shown.items():
        whole = full[long_name if name in cut else name]
        for column, value in cells.items():
            if column in numbers:
                assert value == whole[column], (width, name, column)  # ... numbers never
    kernel_columns = next(r for r in table_rows(out) if r[0] == "kernel")
    assert {"msg/s", "queue", "p99"} <= set(kernel_columns)
    if width == 160:
        assert len(kernel_columns) == len(KERNEL_COLUMNS)
