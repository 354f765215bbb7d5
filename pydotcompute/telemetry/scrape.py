"""Reading ``/metrics`` back: Prometheus text into typed samples, rates and quantiles.

``top`` and the dashboard both see a runtime only through its ``/metrics`` text, so they
work against any runtime's endpoint, local or remote.
"""

from __future__ import annotations

import dataclasses
import math
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from pydotcompute.telemetry.collector import (
    FLOW_COUNTERS,
    FLOW_GAUGES,
    KERNEL_COUNTERS,
    KERNEL_GAUGES,
    LATENCY_METRIC,
    STATE_METRIC,
    TelemetrySource,
)
from pydotcompute.telemetry.gpu import GPU_GAUGES, NVML_AVAILABLE_METRIC, GpuMonitor
from pydotcompute.telemetry.snapshot import LATENCY_BUCKETS_NS

__all__ = [
    "KernelSample",
    "GpuSample",
    "FlowSample",
    "Scrape",
    "parse_metrics",
    "fetch_metrics",
    "histogram_quantile",
    "counter_rate",
    "normalize_metrics_url",
    "scrape_source",
]

# sample name as it appears in the text -> field name
_KERNEL_FIELDS: dict[str, str] = {
    **{f"{name}_total": attr for name, (attr, _) in KERNEL_COUNTERS.items()},
    **{name: attr for name, (attr, _) in KERNEL_GAUGES.items()},
}
_FLOW_FIELDS: dict[str, str] = {
    **{f"{name}_total": key for name, (key, _) in FLOW_COUNTERS.items()},
    **{name: key for name, (key, _) in FLOW_GAUGES.items()},
}
_GPU_FIELDS: dict[str, str] = {name: attr for name, (attr, _) in GPU_GAUGES.items()}


@dataclasses.dataclass
class KernelSample:
    """One kernel as read from ``/metrics``. Counters are totals since launch."""

    kernel: str
    backend: str = "?"
    state: str = "?"
    messages_processed: float = 0.0
    messages_sent: float = 0.0
    messages_dropped: float = 0.0
    messages_rejected: float = 0.0
    errors: float = 0.0
    restarts: float = 0.0
    idle_polls: float = 0.0
    queue_depth: float = 0.0
    queue_capacity: float = 0.0
    output_queue_depth: float = 0.0
    uptime_s: float = 0.0
    latency_buckets: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    """Cumulative ``(upper bound in seconds, count)`` pairs, the last bound ``inf``."""
    latency_sum_s: float = 0.0

    @property
    def queue_fill(self) -> float:
        """Input queue depth as a fraction of its capacity."""
        return self.queue_depth / self.queue_capacity if self.queue_capacity else 0.0


@dataclasses.dataclass
class GpuSample:
    """One GPU's readings; None where the endpoint did not report them."""

    gpu: str
    utilization: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    pcie_tx_bytes_per_second: float | None = None
    pcie_rx_bytes_per_second: float | None = None


@dataclasses.dataclass
class FlowSample:
    """One coordinator flow's item counters."""

    flow: str
    submitted: float = 0.0
    completed: float = 0.0
    retried: float = 0.0
    dead_lettered: float = 0.0
    in_flight: float = 0.0
    lost_leases: float = 0.0


@dataclasses.dataclass
class Scrape:
    """Everything one scrape of ``/metrics`` said, stamped with when it was read."""

    time: float
    kernels: dict[str, KernelSample] = dataclasses.field(default_factory=dict)
    gpus: dict[str, GpuSample] = dataclasses.field(default_factory=dict)
    flows: dict[str, FlowSample] = dataclasses.field(default_factory=dict)
    nvml_available: bool | None = None
    """None when the endpoint does not say (not a pydotcompute runtime, or no monitor)."""


def parse_metrics(text: str, now: float | None = None) -> Scrape:
    """Parse Prometheus text exposition into a ``Scrape``; foreign metrics are ignored."""
    scrape = Scrape(time=time.time() if now is None else now)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name in _KERNEL_FIELDS or name.startswith((STATE_METRIC, LATENCY_METRIC)):
                if "kernel" not in labels:
                    continue
                k = scrape.kernels.get(labels["kernel"])
                if k is None:
                    k = scrape.kernels[labels["kernel"]] = KernelSample(labels["kernel"])
                k.backend = labels.get("backend", k.backend)
                if name in _KERNEL_FIELDS:
                    setattr(k, _KERNEL_FIELDS[name], value)
                elif name == STATE_METRIC:
                    if value == 1.0:
                        k.state = labels.get("state", "?")
                elif name == f"{LATENCY_METRIC}_bucket":
                    k.latency_buckets.append((float(labels["le"]), value))
                elif name == f"{LATENCY_METRIC}_sum":
                    k.latency_sum_s = value
            elif name in _FLOW_FIELDS and "flow" in labels:
                f = scrape.flows.setdefault(labels["flow"], FlowSample(labels["flow"]))
                setattr(f, _FLOW_FIELDS[name], value)
            elif name in _GPU_FIELDS and "gpu" in labels:
                g = scrape.gpus.setdefault(labels["gpu"], GpuSample(labels["gpu"]))
                setattr(g, _GPU_FIELDS[name], value)
            elif name == NVML_AVAILABLE_METRIC:
                scrape.nvml_available = value == 1.0
    for k in scrape.kernels.values():
        k.latency_buckets.sort()
    return scrape


def normalize_metrics_url(url: str) -> str:
    """Accept ``host:port``, ``http://host:port`` or a full URL; default the path to
    ``/metrics``."""
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    if "/" not in rest:
        rest += "/metrics"
    return f"{scheme}://{rest}"


def fetch_metrics(url: str, timeout: float = 5.0) -> str:
    """GET a ``/metrics`` URL and return its text (``OSError`` when unreachable)."""
    req = urllib.request.Request(url, headers={"Accept": "text/plain"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        charset = resp.headers.get_content_charset() or "utf-8"
        text: str = resp.read().decode(charset)
        return text


def counter_rate(previous: float | None, current: float, seconds: float) -> float:
    """Per-second increase of a counter; a counter that went down restarted from zero."""
    if previous is None or seconds <= 0:
        return 0.0
    increase = current - previous if current >= previous else current
    return increase / seconds


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Estimate the ``q`` quantile (0–1) from cumulative ``(upper bound, count)`` buckets.

    Interpolates linearly inside the bucket that holds the rank, as Prometheus'
    ``histogram_quantile`` does; the first bucket starts at 0 and a rank in the ``+Inf``
    bucket reports the highest finite bound. None when the buckets hold nothing.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > lower_count:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def bucket_delta(
    previous: list[tuple[float, float]], current: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Cumulative buckets of the observations made between two scrapes.

    When the bounds differ or a count went down (a restart), the current buckets are
    returned whole.
    """
    if [b for b, _ in previous] != [b for b, _ in current]:
        return current
    delta = [(b, c - p) for (b, c), (_, p) in zip(current, previous, strict=True)]
    if any(c < 0 for _, c in delta):
        return current
    return delta


_BOUNDS_S = [ns / 1e9 for ns in LATENCY_BUCKETS_NS] + [math.inf]
_KERNEL_ATTRS = [attr for attr in _KERNEL_FIELDS.values()]


def scrape_source(
    source: TelemetrySource, gpu: GpuMonitor | None = None, now: float | None = None
) -> Scrape:
    """What a scrape of ``source``'s ``/metrics`` would say, read straight from its
    snapshots (no text written and parsed back: a fraction of the cost). ``gpu``: a
    monitor whose last readings are taken as they are (refresh it elsewhere)."""
    scrape = Scrape(time=time.time() if now is None else now)
    for kid, t in source.get_all_telemetry().items():
        k = KernelSample(kid, t.backend, t.state.lower())
        for attr in _KERNEL_ATTRS:
            setattr(k, attr, float(getattr(t, attr)))
        if t.latency_buckets:
            cumulative = 0.0
            for bound, count in zip(_BOUNDS_S, t.latency_buckets, strict=False):
                cumulative += count
                k.latency_buckets.append((bound, cumulative))
            k.latency_sum_s = t.latency_sum_s
        scrape.kernels[kid] = k
    flow_reader = getattr(source, "get_flow_telemetry", None)
    if flow_reader is not None:
        for name, counts in flow_reader().items():
            f = scrape.flows[name] = FlowSample(name)
            for key, value in counts.items():
                if hasattr(f, key):
                    setattr(f, key, float(value))
    if gpu is not None:
        readings = gpu.read(refresh=False)
        scrape.nvml_available = bool(readings)
        for r in readings:
            scrape.gpus[str(r.index)] = GpuSample(
                str(r.index), **{attr: getattr(r, attr) for attr, _ in GPU_GAUGES.values()}
            )
    return scrape
