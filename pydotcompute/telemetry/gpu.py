"""GPU readings through NVML (the ``pynvml`` module of nvidia-ml-py), read at scrape time.

NVML is opened on the first reading, not at import or construction. Where it cannot be
used (module missing, no driver, no device) the monitor says so once in the log and
then yields only ``pydotcompute_gpu_nvml_available 0``; a reading NVML does not support
on a device is left out for that device.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

__all__ = ["GpuMonitor", "GpuReading", "GPU_GAUGES", "NVML_AVAILABLE_METRIC"]

logger = logging.getLogger("pydotcompute.telemetry")

NVML_AVAILABLE_METRIC = "pydotcompute_gpu_nvml_available"

# metric name -> (GpuReading attribute, help)
GPU_GAUGES: dict[str, tuple[str, str]] = {
    "pydotcompute_gpu_utilization_ratio": (
        "utilization",
        "Fraction of the last sample period a kernel ran on the GPU (NVML). A persistent "
        "kernel reads 1.0 while it polls; see pydotcompute_kernel_idle_polls_total.",
    ),
    "pydotcompute_gpu_memory_used_bytes": ("memory_used_bytes", "GPU memory in use."),
    "pydotcompute_gpu_memory_total_bytes": ("memory_total_bytes", "GPU memory in total."),
    "pydotcompute_gpu_temperature_celsius": ("temperature_celsius", "GPU die temperature."),
    "pydotcompute_gpu_power_watts": ("power_watts", "GPU board power draw."),
    "pydotcompute_gpu_pcie_tx_bytes_per_second": (
        "pcie_tx_bytes_per_second",
        "PCIe transmit throughput of the GPU (NVML, sampled over 20 ms).",
    ),
    "pydotcompute_gpu_pcie_rx_bytes_per_second": (
        "pcie_rx_bytes_per_second",
        "PCIe receive throughput of the GPU (NVML, sampled over 20 ms).",
    ),
}


@dataclasses.dataclass(frozen=True)
class GpuReading:
    """One device's readings; None where NVML does not support the reading."""

    index: int
    name: str
    utilization: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    pcie_tx_bytes_per_second: float | None = None
    pcie_rx_bytes_per_second: float | None = None


class GpuMonitor:
    """Reads every visible GPU through NVML on demand. Close it to release NVML.

    Readings younger than ``max_age`` seconds are reused: NVML samples PCIe throughput
    over 20 ms per device and direction, so several scrapers at once would otherwise
    each wait for it.
    """

    def __init__(self, max_age: float = 1.0) -> None:
        self.max_age = max_age
        self._cached: tuple[float, list[GpuReading]] | None = None
        self._lock = threading.Lock()
        self._nvml: ModuleType | None = None
        self._handles: list[Any] = []
        self._unavailable: str | None = None
        self._unsupported: set[tuple[int, str]] = set()

    @property
    def available(self) -> bool:
        """Whether NVML is open with at least one device (opens it on first use)."""
        with self._lock:
            return self._open()

    @property
    def unavailable_reason(self) -> str | None:
        """Why NVML cannot be used here, once that is known."""
        return self._unavailable

    @property
    def needs_refresh(self) -> bool:
        """Whether ``read()`` would call NVML now: it is not known to be unavailable and
        no reading is younger than ``max_age``."""
        if self._unavailable is not None:
            return False
        cached = self._cached
        return cached is None or time.monotonic() - cached[0] >= self.max_age

    def read(self, refresh: bool = True) -> list[GpuReading]:
        """Current readings of every device; empty where NVML is unavailable.

        ``refresh=False`` returns the last readings taken without calling NVML (which
        may block for tens of milliseconds), for callers that refresh elsewhere.
        """
        if not refresh:
            cached = self._cached
            return [] if cached is None else list(cached[1])
        with self._lock:
            if not self._open():
                return []
            assert self._nvml is not None
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.max_age:
                readings = [self._read_one(self._nvml, i, h) for i, h in enumerate(self._handles)]
                self._cached = (now, readings)
            return list(self._cached[1])

    def close(self) -> None:
        """Release NVML if this monitor opened it."""
        with self._lock:
            self._cached = None
            if self._nvml is not None:
                nvml, self._nvml, self._handles = self._nvml, None, []
                try:
                    nvml.nvmlShutdown()
                except nvml.NVMLError as exc:
                    logger.debug("nvmlShutdown failed: %s", exc)
            self._unavailable = self._unavailable or "monitor closed"

    def families(self) -> list[Metric]:
        """Empty metric families of every reading (for ``describe``)."""
        gauges: list[Metric] = [
            GaugeMetricFamily(name, doc, labels=("gpu",)) for name, (_, doc) in GPU_GAUGES.items()
        ]
        return [
            GaugeMetricFamily(
                NVML_AVAILABLE_METRIC, "1 when NVML readings of a GPU are available here."
            ),
            *gauges,
        ]

    def collect(self, refresh: bool = True) -> Iterator[Metric]:
        """Families with the current readings, labelled by device index (``refresh``:
        as in ``read``)."""
        readings = self.read(refresh)
        available, *gauges = self.families()
        available.add_metric([], 1.0 if readings else 0.0)  # type: ignore[attr-defined]
        yield available
        for family, (_, (attr, _)) in zip(gauges, GPU_GAUGES.items(), strict=True):
            for r in readings:
                value = getattr(r, attr)
                if value is not None:
                    family.add_metric([str(r.index)], float(value))  # type: ignore[attr-defined]
            yield family

    def _open(self) -> bool:
        if self._nvml is not None:
            return True
        if self._unavailable is not None:
            return False
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError as exc:
            return self._give_up(f"pynvml (nvidia-ml-py) is not installed ({exc})")
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return self._give_up(f"NVML did not initialise: {exc}")
        try:
            count = nvml.nvmlDeviceGetCount()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except nvml.NVMLError as exc:
            nvml.nvmlShutdown()
            return self._give_up(f"NVML could not list devices: {exc}")
        if not handles:
            nvml.nvmlShutdown()
            return self._give_up("NVML sees no GPU")
        self._nvml, self._handles = nvml, handles
        logger.info("GPU readings from NVML for %d device(s)", len(handles))
        return True

    def _give_up(self, reason: str) -> bool:
        self._unavailable = reason
        logger.info("no GPU readings: %s", reason)
        return False

    def _read_one(self, nvml: ModuleType, index: int, handle: Any) -> GpuReading:
        def ask(what: str, fn: Any, *args: Any) -> Any:
            if (index, what) in self._unsupported:
                return None
            try:
                return fn(handle, *args)
            except nvml.NVMLError as exc:
                # Unsupported readings stay unsupported; say so once per device and reading.
                self._unsupported.add((index, what))
                logger.info("GPU %d: no %s reading (%s)", index, what, exc)
                return None

        name = ask("name", nvml.nvmlDeviceGetName)
        util = ask("utilization", nvml.nvmlDeviceGetUtilizationRates)
        mem = ask("memory", nvml.nvmlDeviceGetMemoryInfo)
        temp = ask("temperature", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
        power_mw = ask("power", nvml.nvmlDeviceGetPowerUsage)
        tx_kb = ask("pcie_tx", nvml.nvmlDeviceGetPcieThroughput, nvml.NVML_PCIE_UTIL_TX_BYTES)
        rx_kb = ask("pcie_rx", nvml.nvmlDeviceGetPcieThroughput, nvml.NVML_PCIE_UTIL_RX_BYTES)
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        return GpuReading(
            index=index,
            name=name or f"GPU {index}",
            utilization=None if util is None else util.gpu / 100.0,
            memory_used_bytes=None if mem is None else int(mem.used),
            memory_total_bytes=None if mem is None else int(mem.total),
            temperature_celsius=None if temp is None else float(temp),
            power_watts=None if power_mw is None else power_mw / 1000.0,
            # NVML reports PCIe throughput in KB/s.
            pcie_tx_bytes_per_second=None if tx_kb is None else tx_kb * 1024.0,
            pcie_rx_bytes_per_second=None if rx_kb is None else rx_kb * 1024.0,
        )
