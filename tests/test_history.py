"""The dashboard's history: samples read straight from snapshots, rates over a window,
a bounded ring."""

from __future__ import annotations

import math

import pytest

from pydotcompute.telemetry.history import MetricsHistory
from pydotcompute.telemetry.scrape import Scrape, parse_metrics, scrape_source
from pydotcompute.telemetry.server import serve_metrics
from pydotcompute.telemetry.snapshot import KernelTelemetry


class Source:
    def __init__(self) -> None:
        self.n = 0

    def get_all_telemetry(self) -> dict[str, KernelTelemetry]:
        buckets = [0] * 26
        buckets[4] = self.n
        return {
            "k": KernelTelemetry(
                "k", "cpu", "ACTIVE", messages_processed=self.n, messages_dropped=3,
                queue_depth=2, queue_capacity=8, restarts=1, latency_buckets=tuple(buckets),
                latency_sum_s=self.n * 1e-5,
            )
        }  # fmt: skip

    def get_flow_telemetry(self) -> dict[str, dict[str, int]]:
        return {"f": {"submitted": self.n, "completed": self.n // 2, "retried": 4,
                      "dead_lettered": 1, "in_flight": 7}}  # fmt: skip


def test_a_sample_from_snapshots_says_what_the_metrics_text_says() -> None:
    source = Source()
    source.n = 1234
    with serve_metrics(source, port=0, gpu=False, history_interval=None) as server:
        parsed = server._routes.scrape()
    direct = scrape_source(source, now=parsed.time)
    assert direct == parsed


def scrape(t: float, processed: int, completed: int, retried: int = 0) -> Scrape:
    s = Source()
    s.n = processed
    out = scrape_source(s, now=t)
    out.flows["f"].completed = completed
    out.flows["f"].retried = retried
    return out


def test_rates_are_measured_over_the_window() -> None:
    h = MetricsHistory(size=100, interval=0.1, rate_window=1.0)
    first = h.add(scrape(100.0, 0, 0))
    assert first["kernels"]["k"][0] is None  # no rate without an earlier scrape
    for i in range(1, 21):  # ten times a second, 1000 messages/s, 50 items/s
        sample = h.add(scrape(100.0 + i / 10, 100 * i, 5 * i, retried=i))
    msg, p50, p99, fill = sample["kernels"]["k"]
    assert msg == pytest.approx(1000.0)
    assert 8e-6 < p50 < 16.4e-6 and p50 < p99 <= 16.384e-6
    assert fill == pytest.approx(0.25)
    items, retries, dead, in_flight = sample["flows"]["f"]
    assert items == pytest.approx(50.0) and retries == pytest.approx(10.0)
    assert (dead, in_flight) == (1.0, 7.0)


def test_a_stepping_counter_does_not_read_as_idle_between_steps() -> None:
    h = MetricsHistory(size=100, interval=0.05, rate_window=1.0)
    for i in range(40):  # the counter moves by 500 every 0.5 s, sampled every 0.05 s
        sample = h.add(scrape(i * 0.05, 500 * (i // 10), 0))
    assert sample["kernels"]["k"][0] > 0


def test_the_ring_is_bounded_and_since_returns_what_is_new() -> None:
    h = MetricsHistory(size=5, interval=1.0)
    for i in range(12):
        h.add(scrape(float(i), i, i))
    assert len(h) == 5
    assert [s["t"] for s in h.since()] == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert [s["t"] for s in h.since(9.0)] == [10.0, 11.0]
    assert h.since(11.0) == []
    data = h.as_json(10.0)
    assert data["size"] == 5 and data["kernel_fields"][0] == "msg_per_s"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        MetricsHistory(size=0)
    with pytest.raises(ValueError):
        MetricsHistory(interval=0)
    assert not math.isnan(MetricsHistory().rate_window)


def test_parse_and_direct_agree_on_gpu_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from test_telemetry_gpu import DEVICES, fake_nvml

    from pydotcompute.telemetry.gpu import GpuMonitor

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(DEVICES))
    monitor = GpuMonitor()
    try:
        monitor.read()
        direct = scrape_source(Source(), monitor)
    finally:
        monitor.close()
    assert direct.nvml_available is True
    assert direct.gpus["0"].utilization == pytest.approx(0.37)
    with serve_metrics(Source(), port=0, history_interval=None) as server:
        parsed = parse_metrics(server._routes.render("text/plain")[0].decode())
    assert set(parsed.gpus) == set(direct.gpus)
