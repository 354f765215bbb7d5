"""``/metrics`` written directly gives the library encoders' bytes, or declines."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from pydotcompute.telemetry.collector import TelemetryCollector
from pydotcompute.telemetry.exposition import text_format, write_families
from pydotcompute.telemetry.server import serve_metrics
from pydotcompute.telemetry.snapshot import LATENCY_BUCKETS_NS, KernelTelemetry

ODD_ID = 'we"ird\\ id\nwith ünïcode'


class Source:
    def get_all_telemetry(self) -> dict[str, KernelTelemetry]:
        buckets = tuple(range(len(LATENCY_BUCKETS_NS) + 1))
        return {
            "echo": KernelTelemetry(
                "echo",
                "host",
                "active",
                messages_processed=123456789,
                messages_sent=7,
                queue_depth=3,
                queue_capacity=256,
                uptime_s=12.5,
                latency_buckets=buckets,
                latency_sum_s=0.000123,
            ),
            ODD_ID: KernelTelemetry(ODD_ID, "cpu", "failed", errors=1, uptime_s=1e-7),
            "odd-state": KernelTelemetry("odd-state", "cuda", "exploding", idle_polls=10**12),
        }

    def get_flow_telemetry(self) -> dict[str, dict[str, int]]:
        return {"inc": {"submitted": 9, "completed": 8, "in_flight": 1}, "x\ny": {"retried": 2}}


class Gpu:
    """Stands in for a GpuMonitor with readings (the collector asks for these two)."""

    def families(self) -> list[Metric]:
        return [GaugeMetricFamily("pydotcompute_gpu_power_watts", 'GPU "power"', labels=["gpu"])]

    def collect(self, refresh: bool = True):
        (power,) = self.families()
        power.add_metric(["0"], 212.5)  # type: ignore[attr-defined]
        yield power


ACCEPTED = [
    "",
    "text/plain",
    "text/plain;version=1.0.0;escaping=underscores",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    # What Prometheus itself sends.
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;"
    "version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.1",
]


@pytest.mark.parametrize("accept", ACCEPTED)
def test_same_bytes_as_the_library(accept: str) -> None:
    collector = TelemetryCollector(Source(), gpu=Gpu())  # type: ignore[arg-type]
    registry = CollectorRegistry()
    registry.register(collector)
    encoder, _ = choose_encoder(accept)
    fmt = text_format(encoder)
    assert fmt is not None
    assert collector.write_text(fmt == "openmetrics") == encoder(registry)
    # The generic writer, over the families themselves, agrees too.
    out: list[str] = []
    assert write_families(out, collector.collect(), fmt == "openmetrics")
    assert "".join(out).encode() == encoder(registry).removesuffix(b"# EOF\n")


@pytest.mark.parametrize(
    "accept",
    [
        "text/plain;version=1.0.0;escaping=dots",  # renames metrics: left to the library
        "application/openmetrics-text;version=2.0.0",
    ],
)
def test_declines_what_it_does_not_mirror(accept: str) -> None:
    assert text_format(choose_encoder(accept)[0]) is None


def test_declines_families_it_does_not_mirror() -> None:
    summary = SummaryMetricFamily("s", "a summary", count_value=1, sum_value=2.0)
    with_created = CounterMetricFamily("c", "a counter", value=1.0, created=123.0)
    stamped = GaugeMetricFamily("g", "a gauge")
    stamped.add_metric([], 1.0, timestamp=5.0)
    for family in (summary, with_created, stamped):
        assert not write_families([], [family], False)
    out: list[str] = []
    assert write_families(out, [GaugeMetricFamily("g", "a gauge", value=2.0)], False)
    assert out == ["# HELP g a gauge\n# TYPE g gauge\n", "g 2.0\n"]


def test_large_counts_are_written_as_go_writes_them() -> None:
    class Busy:
        def get_all_telemetry(self) -> dict[str, KernelTelemetry]:
            buckets = (10**7,) + (0,) * len(LATENCY_BUCKETS_NS)
            return {
                "k": KernelTelemetry(
                    "k",
                    "host",
                    "active",
                    messages_processed=12_345_678_901,
                    latency_buckets=buckets,
                )
            }

    collector = TelemetryCollector(Busy())
    registry = CollectorRegistry()
    registry.register(collector)
    text = collector.write_text(False)
    assert text == choose_encoder("")[0](registry)
    assert b"1.2345678901e+10" in text and b"1e+07" in text


def test_the_server_serves_the_library_bytes() -> None:
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(Source(), gpu=None))
    with serve_metrics(Source(), gpu=False) as server:
        for accept in ACCEPTED + ["text/plain;version=1.0.0;escaping=dots"]:
            request = urllib.request.Request(server.url, headers={"Accept": accept})
            with urllib.request.urlopen(request, timeout=5) as r:
                encoder, ctype = choose_encoder(accept)
                assert r.headers["Content-Type"] == ctype
                assert r.read() == encoder(registry), accept
