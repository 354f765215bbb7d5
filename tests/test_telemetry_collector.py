"""The Prometheus collector: names, labels and exact values read from a source."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pydotcompute.telemetry.collector import KERNEL_STATES, TelemetryCollector
from pydotcompute.telemetry.snapshot import LATENCY_BUCKETS_NS, KernelTelemetry, LatencyRecorder

TELEMETRY_DIR = pathlib.Path(__file__).resolve().parent.parent / "pydotcompute" / "telemetry"


class FakeSource:
    """A source shaped like a runtime: snapshots per kernel, optional flows."""

    def __init__(self, kernels: dict[str, KernelTelemetry], flows=None) -> None:
        self.kernels = kernels
        self.flows = flows
        self.reads = 0

    def get_all_telemetry(self) -> dict[str, KernelTelemetry]:
        self.reads += 1
        return dict(self.kernels)


class FlowSource(FakeSource):
    def get_flow_telemetry(self) -> dict[str, dict[str, int]]:
        return self.flows


def scrape(source, gpu=None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(source, gpu=gpu))
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def kl(kernel: str, backend: str = "host", **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"kernel": kernel, "backend": backend, **extra}.items()))


def echo_snapshot() -> KernelTelemetry:
    rec = LatencyRecorder()
    for ns in (500, 1500, 1500, 3000, 5000, 70_000, 2**40):
        rec.record(ns)
    return KernelTelemetry(
        kernel_id="echo",
        backend="host",
        state="active",
        messages_processed=1000,
        messages_sent=990,
        messages_dropped=7,
        messages_rejected=3,
        errors=2,
        queue_depth=12,
        queue_capacity=64,
        output_queue_depth=5,
        restarts=1,
        idle_polls=42,
        uptime_s=2.5,
        latency_buckets=tuple(rec.buckets),
        latency_sum_s=rec.sum_ns / 1e9,
    )


def test_kernel_counters_and_gauges_exact() -> None:
    samples = scrape(FakeSource({"echo": echo_snapshot()}))
    lab = kl("echo")
    expected = {
        "pydotcompute_kernel_messages_processed_total": 1000,
        "pydotcompute_kernel_messages_sent_total": 990,
        "pydotcompute_kernel_messages_dropped_total": 7,
        "pydotcompute_kernel_messages_rejected_total": 3,
        "pydotcompute_kernel_messages_failed_total": 2,
        "pydotcompute_kernel_restarts_total": 1,
        "pydotcompute_kernel_idle_polls_total": 42,
        "pydotcompute_kernel_queue_depth": 12,
        "pydotcompute_kernel_queue_capacity": 64,
        "pydotcompute_kernel_output_queue_depth": 5,
        "pydotcompute_kernel_uptime_seconds": 2.5,
    }
    for name, value in expected.items():
        assert samples[(name, lab)] == value, name


def test_state_is_one_hot_over_every_lifecycle_state() -> None:
    snaps = {
        "a": KernelTelemetry("a", "cpu", "active"),
        "b": KernelTelemetry("b", "cuda", "FAILED"),
    }
    samples = scrape(FakeSource(snaps))
    for kernel, backend, current in (("a", "cpu", "active"), ("b", "cuda", "failed")):
        for state in KERNEL_STATES:
            key = ("pydotcompute_kernel_state", kl(kernel, backend, state=state))
            assert samples[key] == (1.0 if state == current else 0.0)


def test_kernel_states_match_the_runtime_lifecycle() -> None:
    from pydotcompute.runtime.lifecycle import KernelState

    assert KERNEL_STATES == tuple(s.value for s in KernelState)


def test_latency_is_a_cumulative_histogram_in_seconds() -> None:
    samples = scrape(FakeSource({"echo": echo_snapshot()}))
    lab = kl("echo")
    buckets = {
        dict(labels)["le"]: v
        for (name, labels), v in samples.items()
        if name == "pydotcompute_kernel_latency_seconds_bucket"
    }
    assert len(buckets) == len(LATENCY_BUCKETS_NS) + 1
    # 500 and the two 1500 ns samples land at or under 2.048 µs; 3000 under 4.096 µs, ...
    assert buckets["1.024e-06"] == 1
    assert buckets["2.048e-06"] == 3
    assert buckets["4.096e-06"] == 4
    assert buckets["8.192e-06"] == 5
    assert buckets["6.5536e-05"] == 5
    assert buckets["0.000131072"] == 6
    assert buckets["17.179869184"] == 6  # 2**40 ns is beyond the last finite bound
    assert buckets["+Inf"] == 7
    values = [buckets[k] for k in sorted(buckets, key=float)]
    assert values == sorted(values)
    assert samples[("pydotcompute_kernel_latency_seconds_count", lab)] == 7
    total_ns = 500 + 1500 + 1500 + 3000 + 5000 + 70_000 + 2**40
    assert samples[("pydotcompute_kernel_latency_seconds_sum", lab)] == pytest.approx(
        total_ns / 1e9
    )


def test_no_histogram_where_the_backend_cannot_measure_latency() -> None:
    samples = scrape(FakeSource({"k": KernelTelemetry("k", "cuda", "active")}))
    assert not [n for n, _ in samples if n.startswith("pydotcompute_kernel_latency")]
    assert samples[("pydotcompute_kernel_messages_processed_total", kl("k", "cuda"))] == 0


def test_wrong_bucket_count_is_an_error_not_a_wrong_histogram() -> None:
    bad = KernelTelemetry("k", "host", "active", latency_buckets=(1, 2, 3))
    with pytest.raises(ValueError, match="3 latency buckets"):
        scrape(FakeSource({"k": bad}))


def test_flow_counters_when_the_source_has_flows() -> None:
    flows = {
        "orders": {
            "submitted": 10,
            "completed": 7,
            "retried": 2,
            "dead_lettered": 1,
            "in_flight": 2,
            "lost_leases": 4,
        }
    }
    samples = scrape(FlowSource({}, flows))
    lab = (("flow", "orders"),)
    assert samples[("pydotcompute_flow_items_submitted_total", lab)] == 10
    assert samples[("pydotcompute_flow_items_completed_total", lab)] == 7
    assert samples[("pydotcompute_flow_items_retried_total", lab)] == 2
    assert samples[("pydotcompute_flow_items_dead_lettered_total", lab)] == 1
    assert samples[("pydotcompute_flow_items_in_flight", lab)] == 2
    assert samples[("pydotcompute_flow_leases_lost_total", lab)] == 4


def test_no_flow_samples_without_a_coordinator() -> None:
    samples = scrape(FakeSource({"echo": echo_snapshot()}))
    assert not [n for n, _ in samples if n.startswith("pydotcompute_flow")]


def test_names_units_and_labels_follow_prometheus_practice() -> None:
    source = FlowSource({"echo": echo_snapshot()}, {"f": {"submitted": 1}})
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(source))
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        assert family.name.startswith("pydotcompute_")
        for s in family.samples:
            if family.type == "counter":
                assert s.name.endswith("_total"), s.name
            assert set(s.labels) <= {"kernel", "backend", "state", "flow", "le"}, s


def test_registering_does_not_read_the_source() -> None:
    source = FakeSource({"echo": echo_snapshot()})
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(source))
    assert source.reads == 0
    generate_latest(registry)
    assert source.reads == 1


def test_two_collectors_in_one_registry_collide() -> None:
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(FakeSource({})))
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(TelemetryCollector(FakeSource({})))


def test_telemetry_imports_neither_runtime_nor_coordinator() -> None:
    for path in TELEMETRY_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("pydotcompute.runtime", "pydotcompute.coordinator")), (
                    f"{path.name} imports {name}"
                )


def test_importing_telemetry_starts_nothing() -> None:
    code = (
        "import threading, sys\n"
        "import pydotcompute.telemetry.server, pydotcompute.telemetry.gpu\n"
        "import pydotcompute.cli.top, pydotcompute.cli.dashboard\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert 'pynvml' not in sys.modules\n"
    )
    root = TELEMETRY_DIR.parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)


def test_package_exports_load_lazily() -> None:
    import pydotcompute.telemetry as telemetry

    assert sorted(telemetry.__all__) == sorted(telemetry._WHERE)
    for name in telemetry.__all__:
        assert getattr(telemetry, name).__name__ == name
    with pytest.raises(AttributeError):
        telemetry.nonexistent  # noqa: B018
