"""NVML readings, with NVML faked at its module boundary (``pynvml`` in sys.modules)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import types
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pydotcompute.telemetry.collector import TelemetryCollector
from pydotcompute.telemetry.gpu import GpuMonitor
from pydotcompute.telemetry.server import serve_metrics
from pydotcompute.telemetry.snapshot import KernelTelemetry


class Source:
    def get_all_telemetry(self):
        return {"k": KernelTelemetry("k", "cuda", "active", messages_processed=5)}


def fake_nvml(devices: list[dict], init_error: str | None = None) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's ``pynvml`` with the calls the monitor makes."""
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's spelling
        pass

    m.NVMLError = NVMLError
    m.NVMLError_NotSupported = NVMLError_NotSupported
    m.NVML_TEMPERATURE_GPU = 0
    m.NVML_PCIE_UTIL_TX_BYTES = 0
    m.NVML_PCIE_UTIL_RX_BYTES = 1
    m.calls = {"init": 0, "shutdown": 0, "util": 0}

    def init():
        m.calls["init"] += 1
        if init_error:
            raise NVMLError(init_error)

    def shutdown():
        m.calls["shutdown"] += 1

    def field(handle, key):
        value = devices[handle][key]
        if value is None:
            raise NVMLError_NotSupported("Not Supported")
        return value

    m.nvmlInit = init
    m.nvmlShutdown = shutdown
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: field(h, "name")

    def utilization(h):
        m.calls["util"] += 1
        return types.SimpleNamespace(gpu=field(h, "util"), memory=0)

    m.nvmlDeviceGetUtilizationRates = utilization
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        used=field(h, "used"), total=field(h, "total"), free=0
    )
    m.nvmlDeviceGetTemperature = lambda h, sensor: field(h, "temp")
    m.nvmlDeviceGetPowerUsage = lambda h: field(h, "power_mw")
    m.nvmlDeviceGetPcieThroughput = lambda h, counter: field(h, ("tx_kb", "rx_kb")[counter])
    return m


DEVICES = [
    {
        "name": "Fake H100",
        "util": 37,
        "used": 3 * 2**30,
        "total": 80 * 2**30,
        "temp": 61,
        "power_mw": 212_500,
        "tx_kb": 2048,
        "rx_kb": 512,
    },
    {
        "name": b"Fake L4",
        "util": 0,
        "used": 2**20,
        "total": 24 * 2**30,
        "temp": 40,
        "power_mw": None,  # not supported on this board
        "tx_kb": 0,
        "rx_kb": 0,
    },
]


def scrape_gpu(monitor: GpuMonitor) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(Source(), gpu=monitor))
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
    }


def test_nvml_present_readings_in_base_units(monkeypatch, caplog) -> None:
    nvml = fake_nvml(DEVICES)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monitor = GpuMonitor(max_age=0.0)
    assert nvml.calls["init"] == 0  # nothing happens before the first reading
    with caplog.at_level(logging.INFO, logger="pydotcompute.telemetry"):
        samples = scrape_gpu(monitor)
        scrape_gpu(monitor)
    g0, g1 = (("gpu", "0"),), (("gpu", "1"),)
    assert samples[("pydotcompute_gpu_nvml_available", ())] == 1
    assert samples[("pydotcompute_gpu_utilization_ratio", g0)] == pytest.approx(0.37)
    assert samples[("pydotcompute_gpu_memory_used_bytes", g0)] == 3 * 2**30
    assert samples[("pydotcompute_gpu_memory_total_bytes", g0)] == 80 * 2**30
    assert samples[("pydotcompute_gpu_temperature_celsius", g0)] == 61
    assert samples[("pydotcompute_gpu_power_watts", g0)] == pytest.approx(212.5)
    assert samples[("pydotcompute_gpu_pcie_tx_bytes_per_second", g0)] == 2048 * 1024
    assert samples[("pydotcompute_gpu_pcie_rx_bytes_per_second", g0)] == 512 * 1024
    assert samples[("pydotcompute_gpu_memory_total_bytes", g1)] == 24 * 2**30
    # An unsupported reading is left out for that device, and said once, not per scrape.
    assert ("pydotcompute_gpu_power_watts", g1) not in samples
    assert [r.message for r in caplog.records].count("GPU 1: no power reading (Not Supported)") == 1
    # Kernel metrics are unaffected.
    assert (
        samples[
            ("pydotcompute_kernel_messages_processed_total", (("backend", "cuda"), ("kernel", "k")))
        ]
        == 5
    )
    readings = monitor.read()
    assert [r.name for r in readings] == ["Fake H100", "Fake L4"]
    monitor.close()
    assert (nvml.calls["init"], nvml.calls["shutdown"]) == (1, 1)
    assert monitor.read() == []


def test_readings_are_reused_for_max_age(monkeypatch) -> None:
    nvml = fake_nvml(DEVICES)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monitor = GpuMonitor(max_age=60.0)
    first = monitor.read()
    assert monitor.read() == first
    assert nvml.calls["util"] == len(DEVICES)  # one NVML round for both reads
    monitor.max_age = 0.0
    monitor.read()
    assert nvml.calls["util"] == 2 * len(DEVICES)
    monitor.close()


def test_needs_refresh_follows_age_and_availability(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(DEVICES))
    monitor = GpuMonitor(max_age=60.0)
    assert monitor.needs_refresh  # nothing read yet
    first = monitor.read()
    assert not monitor.needs_refresh
    assert monitor.read(refresh=False) == first
    monitor.max_age = 0.0
    assert monitor.needs_refresh
    monitor.close()
    assert not monitor.needs_refresh and monitor.read(refresh=False) == []
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    absent = GpuMonitor()
    assert absent.needs_refresh  # not known yet
    assert absent.read() == []
    assert not absent.needs_refresh  # known now: nothing to refresh, ever


async def test_served_on_a_loop_without_nvml_no_scrape_waits_for_a_worker(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    reads: list[bool] = []
    read = GpuMonitor.read

    def noting_read(self, refresh=True):
        reads.append(refresh)
        return read(self, refresh)

    monkeypatch.setattr(GpuMonitor, "read", noting_read)
    with serve_metrics(Source(), loop=asyncio.get_running_loop()) as server:
        for _ in range(3):
            status, text = await asyncio.to_thread(fetch, server.url)
            assert status == 200 and "pydotcompute_gpu_nvml_available 0.0" in text
    # The server learnt at its start that NVML is absent: the scrapes only looked at the
    # last readings, and none was handed to a worker thread.
    # (The history's samples read them the same way.)
    assert len(reads) >= 3 and not any(reads)


def test_nvml_module_absent_is_reported_once(monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    monitor = GpuMonitor()
    with caplog.at_level(logging.DEBUG, logger="pydotcompute.telemetry"):
        for _ in range(3):
            samples = scrape_gpu(monitor)
    assert samples[("pydotcompute_gpu_nvml_available", ())] == 0
    assert not [n for n, _ in samples if n.startswith("pydotcompute_gpu_") and "nvml" not in n]
    messages = [r.getMessage() for r in caplog.records if r.name == "pydotcompute.telemetry"]
    assert len(messages) == 1
    assert "pynvml (nvidia-ml-py) is not installed" in messages[0]
    assert all(r.levelno < logging.WARNING for r in caplog.records)
    assert monitor.available is False
    assert "not installed" in monitor.unavailable_reason


def test_nvml_without_driver_is_reported_once(monkeypatch, caplog) -> None:
    nvml = fake_nvml(DEVICES, init_error="Driver Not Loaded")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monitor = GpuMonitor()
    with caplog.at_level(logging.DEBUG, logger="pydotcompute.telemetry"):
        for _ in range(3):
            samples = scrape_gpu(monitor)
    assert samples[("pydotcompute_gpu_nvml_available", ())] == 0
    assert nvml.calls["init"] == 1  # not retried on every scrape
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["no GPU readings: NVML did not initialise: Driver Not Loaded"]


def test_nvml_with_no_device_releases_nvml(monkeypatch) -> None:
    nvml = fake_nvml([])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monitor = GpuMonitor()
    assert monitor.read() == []
    assert monitor.unavailable_reason == "NVML sees no GPU"
    assert (nvml.calls["init"], nvml.calls["shutdown"]) == (1, 1)


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_served_on_a_loop_nvml_is_read_off_the_loop(monkeypatch) -> None:
    nvml = fake_nvml(DEVICES)
    read_on: set[int] = set()
    utilization = nvml.nvmlDeviceGetUtilizationRates

    def noting_utilization(handle):
        read_on.add(threading.get_ident())
        return utilization(handle)

    nvml.nvmlDeviceGetUtilizationRates = noting_utilization
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with serve_metrics(Source(), loop=asyncio.get_running_loop()) as server:
        # Opened at the start; nothing is read before the first scrape.
        assert nvml.calls["init"] == 1 and nvml.calls["util"] == 0
        status, text = await asyncio.to_thread(fetch, server.url)
        assert status == 200
        status, body = await asyncio.to_thread(fetch, server.dashboard_url + "api/scrape")
        assert status == 200 and json.loads(body)["nvml_available"] is True
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("pydotcompute_gpu_nvml_available", ())] == 1
    assert samples[("pydotcompute_gpu_utilization_ratio", (("gpu", "0"),))] == pytest.approx(0.37)
    assert samples[("pydotcompute_gpu_temperature_celsius", (("gpu", "1"),))] == 40
    assert read_on and threading.get_ident() not in read_on
    assert nvml.calls["shutdown"] == 1  # released when the server stopped


async def test_served_on_a_loop_a_failing_gpu_read_is_a_500(monkeypatch, caplog) -> None:
    nvml = fake_nvml(DEVICES)

    def broken_utilization(handle):
        raise RuntimeError("driver exploded")

    nvml.nvmlDeviceGetUtilizationRates = broken_utilization
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with serve_metrics(Source(), loop=asyncio.get_running_loop()) as server:
        status, body = await asyncio.to_thread(fetch, server.url)
        assert (await asyncio.to_thread(fetch, server.dashboard_url))[0] == 200  # page: no NVML
    assert status == 500 and "driver exploded" in body
    assert any("error serving /metrics" in r.getMessage() for r in caplog.records)
