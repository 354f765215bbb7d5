"""A Prometheus collector that reads kernel counters at scrape time.

Nothing here runs on the per-message path: ``collect()`` asks the source for its
snapshots when Prometheus (or ``top``, or the dashboard) scrapes, and builds the metric
families from them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pydotcompute.telemetry.exposition import family_header, label_value, write_families
from pydotcompute.telemetry.gpu import GpuMonitor
from pydotcompute.telemetry.snapshot import LATENCY_BUCKETS_NS, KernelTelemetry

__all__ = [
    "TelemetrySource",
    "TelemetryCollector",
    "KERNEL_STATES",
    "KERNEL_COUNTERS",
    "KERNEL_GAUGES",
    "FLOW_COUNTERS",
    "FLOW_GAUGES",
    "LATENCY_METRIC",
    "STATE_METRIC",
    "LATENCY_BOUNDS_S",
]

# The lifecycle states, spelled as the runtime's ``KernelState`` values. Kept here because
# telemetry is a leaf and must not import the runtime; a test holds the two together.
KERNEL_STATES: tuple[str, ...] = (
    "created",
    "launched",
    "active",
    "deactivated",
    "terminating",
    "terminated",
    "failed",
    "restarting",
)

# metric name (without ``_total``) -> (KernelTelemetry attribute, help)
KERNEL_COUNTERS: dict[str, tuple[str, str]] = {
    "pydotcompute_kernel_messages_processed": (
        "messages_processed",
        "Messages the kernel has handled.",
    ),
    "pydotcompute_kernel_messages_sent": ("messages_sent", "Messages the kernel has emitted."),
    "pydotcompute_kernel_messages_dropped": (
        "messages_dropped",
        "Input messages dropped by a DROP_OLDEST or DROP_NEWEST queue, or left "
        "unhandled by a failure or terminate.",
    ),
    "pydotcompute_kernel_messages_rejected": (
        "messages_rejected",
        "Sends refused because the input queue was full (REJECT, or BLOCK timing out).",
    ),
    "pydotcompute_kernel_messages_failed": (
        "errors",
        "Messages whose handling raised.",
    ),
    "pydotcompute_kernel_restarts": ("restarts", "Times the supervisor restarted the kernel."),
    "pydotcompute_kernel_idle_polls": (
        "idle_polls",
        "Polls of the input queue that found nothing: a spinning kernel's real idleness.",
    ),
}

# metric name -> (KernelTelemetry attribute, help)
KERNEL_GAUGES: dict[str, tuple[str, str]] = {
    "pydotcompute_kernel_queue_depth": ("queue_depth", "Messages waiting in the input queue."),
    "pydotcompute_kernel_queue_capacity": ("queue_capacity", "Capacity of the input queue."),
    "pydotcompute_kernel_output_queue_depth": (
        "output_queue_depth",
        "Messages waiting in the output queue.",
    ),
    "pydotcompute_kernel_uptime_seconds": ("uptime_s", "Seconds since the kernel was launched."),
}

STATE_METRIC = "pydotcompute_kernel_state"
LATENCY_METRIC = "pydotcompute_kernel_latency_seconds"

# Flow counters from a coordinator: metric name (without ``_total``) -> (key, help)
FLOW_COUNTERS: dict[str, tuple[str, str]] = {
    "pydotcompute_flow_items_submitted": ("submitted", "Items submitted to the flow."),
    "pydotcompute_flow_items_completed": ("completed", "Items that left the flow's last stage."),
    "pydotcompute_flow_items_filtered": (
        "filtered",
        "Items a stage consumed without output (a handler returned False).",
    ),
    "pydotcompute_flow_items_retried": ("retried", "Stage attempts that were retried."),
    "pydotcompute_flow_items_dead_lettered": (
        "dead_lettered",
        "Items that exhausted their retries and went to the dead-letter table.",
    ),
    "pydotcompute_flow_leases_lost": (
        "lost_leases",
        "Item leases this process lost to another worker (it stalled past its lease).",
    ),
}
FUSED_STAGE_COUNTER = "pydotcompute_flow_fused_stage_records"
"""Records per stage of a fused chain (labels flow, stage, outcome: processed, emitted,
dropped), from ``get_fused_stage_telemetry()`` when the source offers it."""
_FUSED_STAGE_DOC = "Records a stage of a fused chain handled (processed), passed on or dropped."
FLOW_GAUGES: dict[str, tuple[str, str]] = {
    "pydotcompute_flow_items_in_flight": ("in_flight", "Items inside the flow right now."),
}

# Histogram bucket bounds in seconds, as Prometheus ``le`` label values.
LATENCY_BOUNDS_S: tuple[float, ...] = tuple(ns / 1e9 for ns in LATENCY_BUCKETS_NS)
_LE_LABELS: tuple[str, ...] = tuple(repr(b) for b in LATENCY_BOUNDS_S) + ("+Inf",)

_KERNEL_LABELS = ("kernel", "backend")
_STATE_DOC = "1 for the kernel's current lifecycle state, 0 for the others."
_LATENCY_DOC = "Time from enqueue to the end of handling (queue wait plus handling)."


@runtime_checkable
class TelemetrySource(Protocol):
    """What the collector reads: a runtime, or anything shaped like one.

    A source may also offer ``get_flow_telemetry() -> dict[str, dict[str, int]]``
    (coordinator counters per flow) and ``get_fused_stage_telemetry()`` (per flow, the
    counts of each fused stage); the collector uses them when present.

    Both are called on the metrics server's thread, while the runtime keeps working on
    its own: they must not need the event loop, and must copy any container the runtime
    may change meanwhile before iterating it.
    """

    def get_all_telemetry(self) -> Mapping[str, KernelTelemetry]: ...


class TelemetryCollector(Collector):
    """Builds ``pydotcompute_*`` metric families from a source on every scrape.

    Register it in a ``prometheus_client.CollectorRegistry``. ``gpu`` adds NVML readings
    (see ``GpuMonitor``); None leaves them out. ``refresh_gpu=False`` reports the
    monitor's last readings and leaves refreshing them to the caller (a server on an
    event loop refreshes them on a worker thread before each scrape).
    """

    def __init__(
        self, source: TelemetrySource, gpu: GpuMonitor | None = None, *, refresh_gpu: bool = True
    ) -> None:
        self._source = source
        self._gpu = gpu
        self._refresh_gpu = refresh_gpu

    def describe(self) -> Iterator[Metric]:
        """The families this collector yields, without samples (no source read)."""
        yield from self._kernel_families().values()
        yield from self._flow_families().values()
        if self._gpu is not None:
            yield from self._gpu.families()

    def collect(self) -> Iterator[Metric]:
        """Read the source now and yield the families with their samples."""
        kernels = self._kernel_families()
        snapshots = self._source.get_all_telemetry()
        for kernel_id in sorted(snapshots):
            self._add_kernel(kernels, kernel_id, snapshots[kernel_id])
        yield from kernels.values()
        yield from self._other_families()

    def write_text(self, openmetrics: bool) -> bytes | None:
        """What ``collect()`` encoded by ``prometheus_client`` would give (its text
        format, or OpenMetrics 1.0 with the final ``# EOF``), written directly: the
        kernels' lines straight from their snapshots, without building metric families.
        None where the writer does not mirror the library (see ``exposition``)."""
        snapshots = self._source.get_all_telemetry()
        out: list[str] = []
        _write_kernels(out, snapshots, openmetrics)
        if not write_families(out, self._other_families(), openmetrics):
            return None
        if openmetrics:
            out.append("# EOF\n")
        return "".join(out).encode("utf-8")

    def _other_families(self) -> Iterator[Metric]:
        flow_reader = getattr(self._source, "get_flow_telemetry", None)
        if flow_reader is not None:
            flows = self._flow_families()
            counts = flow_reader()
            for flow in sorted(counts):
                for name, (key, _) in {**FLOW_COUNTERS, **FLOW_GAUGES}.items():
                    if key in counts[flow]:
                        flows[name].add_metric([flow], float(counts[flow][key]))
            yield from flows.values()
        fused_reader = getattr(self._source, "get_fused_stage_telemetry", None)
        if fused_reader is not None:
            fused = CounterMetricFamily(
                FUSED_STAGE_COUNTER, _FUSED_STAGE_DOC, labels=("flow", "stage", "outcome")
            )
            for flow, stages in sorted(fused_reader().items()):
                for stage_name, counts in stages.items():
                    for outcome, n in counts.items():
                        fused.add_metric([flow, stage_name, outcome], float(n))
            yield fused

        if self._gpu is not None:
            yield from self._gpu.collect(self._refresh_gpu)

    @staticmethod
    def _kernel_families() -> dict[str, Metric]:
        families: dict[str, Metric] = {}
        for name, (_, doc) in KERNEL_COUNTERS.items():
            families[name] = CounterMetricFamily(name, doc, labels=_KERNEL_LABELS)
        for name, (_, doc) in KERNEL_GAUGES.items():
            families[name] = GaugeMetricFamily(name, doc, labels=_KERNEL_LABELS)
        families[STATE_METRIC] = GaugeMetricFamily(
            STATE_METRIC, _STATE_DOC, labels=(*_KERNEL_LABELS, "state")
        )
        families[LATENCY_METRIC] = HistogramMetricFamily(
            LATENCY_METRIC, _LATENCY_DOC, labels=_KERNEL_LABELS
        )
        return families

    @staticmethod
    def _flow_families() -> dict[str, CounterMetricFamily | GaugeMetricFamily]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for name, (_, doc) in FLOW_COUNTERS.items():
            families[name] = CounterMetricFamily(name, doc, labels=("flow",))
        for name, (_, doc) in FLOW_GAUGES.items():
            families[name] = GaugeMetricFamily(name, doc, labels=("flow",))
        return families

    @staticmethod
    def _add_kernel(families: dict[str, Metric], kernel_id: str, t: KernelTelemetry) -> None:
        labels = [kernel_id, t.backend]
        for name, (attr, _) in KERNEL_COUNTERS.items():
            families[name].add_metric(labels, float(getattr(t, attr)))  # type: ignore[attr-defined]
        for name, (attr, _) in KERNEL_GAUGES.items():
            families[name].add_metric(labels, float(getattr(t, attr)))  # type: ignore[attr-defined]
        state = t.state.lower()
        states = KERNEL_STATES if state in KERNEL_STATES else (*KERNEL_STATES, state)
        for s in states:
            families[STATE_METRIC].add_metric([*labels, s], 1.0 if s == state else 0.0)  # type: ignore[attr-defined]
        if t.latency_buckets:
            if len(t.latency_buckets) != len(_LE_LABELS):
                raise ValueError(
                    f"kernel {kernel_id!r} reports {len(t.latency_buckets)} latency buckets, "
                    f"expected {len(_LE_LABELS)}"
                )
            cumulative, buckets = 0, []
            for le, count in zip(_LE_LABELS, t.latency_buckets, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            families[LATENCY_METRIC].add_metric(labels, buckets, sum_value=t.latency_sum_s)  # type: ignore[attr-defined]


def _write_kernels(
    out: list[str], snapshots: Mapping[str, KernelTelemetry], openmetrics: bool
) -> None:
    """The kernel families' lines, as ``collect()`` and the library encoder give them."""
    ids = sorted(snapshots)
    # backend, kernel: label names in the sorted order the encoders use
    labels = {
        k: f'backend="{label_value(snapshots[k].backend)}",kernel="{label_value(k)}"' for k in ids
    }
    for name, (attr, doc) in KERNEL_COUNTERS.items():
        out.append(family_header(name, "counter", doc, openmetrics))
        for k in ids:
            out.append(
                f"{name}_total{{{labels[k]}}} {floatToGoString(getattr(snapshots[k], attr))}\n"
            )
    for name, (attr, doc) in KERNEL_GAUGES.items():
        out.append(family_header(name, "gauge", doc, openmetrics))
        for k in ids:
            out.append(f"{name}{{{labels[k]}}} {floatToGoString(getattr(snapshots[k], attr))}\n")
    out.append(family_header(STATE_METRIC, "gauge", _STATE_DOC, openmetrics))
    for k in ids:
        state = snapshots[k].state.lower()
        states = KERNEL_STATES if state in KERNEL_STATES else (*KERNEL_STATES, state)
        for st in states:
            value = "1.0" if st == state else "0.0"
            out.append(f'{STATE_METRIC}{{{labels[k]},state="{label_value(st)}"}} {value}\n')
    out.append(family_header(LATENCY_METRIC, "histogram", _LATENCY_DOC, openmetrics))
    for k in ids:
        t = snapshots[k]
        if not t.latency_buckets:
            continue
        if len(t.latency_buckets) != len(_LE_LABELS):
            raise ValueError(
                f"kernel {k!r} reports {len(t.latency_buckets)} latency buckets, "
                f"expected {len(_LE_LABELS)}"
            )
        cumulative = 0
        for le, count in zip(_LE_LABELS, t.latency_buckets, strict=True):
            cumulative += count
            out.append(
                f'{LATENCY_METRIC}_bucket{{{labels[k]},le="{le}"}} {floatToGoString(cumulative)}\n'
            )
        out.append(f"{LATENCY_METRIC}_count{{{labels[k]}}} {floatToGoString(cumulative)}\n")
        out.append(f"{LATENCY_METRIC}_sum{{{labels[k]}}} {floatToGoString(t.latency_sum_s)}\n")
