"""The dashboard page, loaded in headless Chromium, plots a running kernel's throughput."""

from __future__ import annotations

import argparse
import asyncio
import html.parser
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest
from rich.console import Console

from pydotcompute import RingKernelRuntime
from pydotcompute.cli.dashboard import add_dashboard_arguments, run_dashboard
from pydotcompute.telemetry.server import serve_metrics
from pydotcompute.telemetry.snapshot import KernelTelemetry

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
    None,
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install -y chromium)",
)


class DomReader(html.parser.HTMLParser):
    """Collects the chart canvas' and the kernel rows' data attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.canvas: dict[str, str] = {}
        self.rows: dict[str, dict[str, str]] = {}
        self.gpus: dict[str, dict[str, str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "canvas" and a.get("id") == "throughput":
            self.canvas = a
        elif tag == "tr" and "data-kernel" in a:
            self.rows[a["data-kernel"]] = a
        elif tag == "tr" and "data-gpu" in a:
            self.gpus[a["data-gpu"]] = a


def load_page(url: str, virtual_ms: int = 4000) -> DomReader:
    """Load ``url`` in headless Chromium, let the page run ``virtual_ms`` of virtual time
    (timers jump ahead, network waits are real), and read the resulting DOM."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={virtual_ms}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    reader = DomReader()
    reader.feed(done.stdout)
    return reader


class RunningKernel:
    """A source whose kernel processes about 1000 messages/s of wall time."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def get_all_telemetry(self) -> dict[str, KernelTelemetry]:
        n = int((time.monotonic() - self.start) * 1000)
        return {
            "echo": KernelTelemetry(
                "echo", "host", "active", messages_processed=n, queue_depth=2, queue_capacity=8
            ),
            "idle": KernelTelemetry("idle", "host", "deactivated", queue_capacity=8),
        }


@needs_chromium
def test_chart_shows_throughput_of_the_running_kernel() -> None:
    with serve_metrics(RunningKernel(), gpu=False, history_interval=0.1) as server:
        dom = load_page(server.dashboard_url + "?interval=200")
    rates = json.loads(dom.canvas["data-last-rates"])
    assert int(dom.canvas["data-points"]) >= 2
    assert rates["echo"] > 0
    assert rates["idle"] == 0
    assert float(dom.rows["echo"]["data-rate"]) > 0
    assert dom.rows["echo"]["data-state"] == "active"
    assert dom.rows["idle"]["data-state"] == "deactivated"


class SteppingKernel:
    """A kernel whose counter moves in steps every 50 ms, as a batch-processing kernel's does."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def get_all_telemetry(self) -> dict[str, KernelTelemetry]:
        steps = int((time.monotonic() - self.start) / 0.05)
        return {"batch": KernelTelemetry("batch", "cpu", "active", messages_processed=4096 * steps)}


@needs_chromium
def test_polls_close_together_do_not_read_a_busy_kernel_as_idle() -> None:
    # The server samples much faster than the counter steps; the plotted rate must still
    # be the kernel's, not 0.
    with serve_metrics(SteppingKernel(), gpu=False, history_interval=0.02) as server:
        time.sleep(0.3)  # some history before the page asks for it
        dom = load_page(server.dashboard_url + "?interval=100", virtual_ms=6000)
    assert int(dom.canvas["data-points"]) >= 10
    assert json.loads(dom.canvas["data-last-rates"])["batch"] > 0


@needs_chromium
def test_page_shows_gpu_readings(monkeypatch) -> None:
    from test_telemetry_gpu import DEVICES, fake_nvml

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(DEVICES))
    with serve_metrics(RunningKernel()) as server:
        dom = load_page(server.dashboard_url + "?interval=200", virtual_ms=1000)
    assert sorted(dom.gpus) == ["0", "1"]
    assert float(dom.gpus["0"]["data-utilization"]) == pytest.approx(0.37)


@needs_chromium
def test_dashboard_command_proxies_another_runtime() -> None:
    parser = argparse.ArgumentParser()
    add_dashboard_arguments(parser)
    stop = threading.Event()
    out = io.StringIO()
    with serve_metrics(RunningKernel(), gpu=False) as upstream:
        args = parser.parse_args([upstream.url, "--history-interval", "0.1"])
        console = Console(file=out, width=200, color_system=None)
        status: list[int] = []
        runner = threading.Thread(
            target=lambda: status.append(run_dashboard(args, console=console, stop=stop))
        )
        runner.start()
        try:
            deadline = time.monotonic() + 10
            while " at http" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.01)
            page_url = out.getvalue().split(" at ")[1].split()[0]
            dom = load_page(page_url + "?interval=200")
        finally:
            stop.set()
            runner.join(10)
    assert status == [0]
    assert json.loads(dom.canvas["data-last-rates"])["echo"] > 0


async def echo(ctx):
    while not ctx.should_terminate:
        await ctx.send(await ctx.receive())


async def load_page_async(url: str) -> DomReader:
    # Chromium runs in a worker thread so the runtime's traffic keeps flowing meanwhile.
    return await asyncio.to_thread(load_page, url)


@needs_chromium
async def test_chart_shows_throughput_of_a_running_runtime() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("echo", echo, queue_size=256)
        await rt.activate("echo")
        await rt.launch("parked", echo)
        server = serve_metrics(rt, gpu=False, history_interval=0.1)
        rt.add_closer(server.stop)
        stop = asyncio.Event()

        async def traffic() -> None:
            i = 0
            while not stop.is_set():
                await rt.send("echo", i)
                await rt.receive("echo", timeout=5)
                i += 1

        driver = asyncio.create_task(traffic())
        try:
            dom = await load_page_async(server.dashboard_url + "?interval=200")
        finally:
            stop.set()
            await driver
    rates = json.loads(dom.canvas["data-last-rates"])
    assert rates["echo"] > 0, rates
    assert rates["parked"] == 0
    assert float(dom.rows["echo"]["data-rate"]) > 0
    assert dom.rows["echo"]["data-state"] == "active"
    assert dom.rows["parked"]["data-state"] == "launched"


def test_dashboard_command_serves_until_ctrl_c() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    with serve_metrics(RunningKernel(), gpu=False) as upstream:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pydotcompute", "dashboard", upstream.url],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert " at http" in line, (line, proc.poll())
            page_url = line.split(" at ")[1].split()[0]
            with urllib.request.urlopen(page_url + "api/scrape", timeout=10) as r:
                data = json.loads(r.read())
            assert data["kernels"]["echo"]["state"] == "active"
            with urllib.request.urlopen(page_url, timeout=10) as r:
                assert b'<main id="view">' in r.read()
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, (out, err)
    assert "Traceback" not in err
