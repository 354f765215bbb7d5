"""The telemetry snapshot's building blocks: latency recorder and active-time clock."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pydotcompute.telemetry.snapshot import LATENCY_BUCKETS_NS, ActiveTime, LatencyRecorder


def test_latency_recorder_percentiles_and_buckets():
    r = LatencyRecorder(window=1024)
    assert r.percentiles(50, 99) == (None, None)
    for ns in range(1000, 101_000, 100):  # 1000 samples, 1 µs .. 100.9 µs
        r.record(ns)
    p50, p99 = r.percentiles(50, 99)
    assert p50 == pytest.approx(51.0, abs=0.2) and p99 == pytest.approx(100.0, abs=0.2)
    assert r.count == 1000 and sum(r.buckets) == 1000
    assert len(r.buckets) == len(LATENCY_BUCKETS_NS) + 1
    assert r.sum_ns == sum(range(1000, 101_000, 100))


def test_latency_recorder_window_keeps_the_most_recent():
    r = LatencyRecorder(window=4)
    for ns in (10_000, 10_000, 10_000, 10_000, 1_000, 1_000, 1_000, 1_000):
        r.record(ns)
    assert r.percentiles(99) == (1.0,)  # only the last four remain in the window
    with pytest.raises(ValueError):
        LatencyRecorder(window=3)


@given(
    st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=300),
    st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=4),
)
def test_latency_percentiles_are_the_windows_order_statistics(samples, qs):
    r = LatencyRecorder(window=128)
    for ns in samples:
        r.record(ns)
    window = sorted(samples[-128:])
    n = len(window)
    expected = tuple(window[min(n - 1, int(q / 100.0 * n))] / 1000.0 for q in qs)
    got = r.percentiles(*qs)
    assert got == expected
    assert all(type(p) is float for p in got)


def test_latency_percentiles_are_reused_until_a_new_sample():
    r = LatencyRecorder(window=8)
    for ns in (5000, 1000, 3000):
        r.record(ns)
    first = r.percentiles(50, 99)
    assert first == (3.0, 5.0)
    assert r.percentiles(50, 99) is first  # nothing new: the same answer
    assert r.percentiles(50) == (3.0,)  # other percentiles are computed
    r.record(9000)
    assert r.percentiles(50, 99) == (5.0, 9.0)


def test_active_time_counts_only_active_stretches():
    clock = ActiveTime()
    assert clock.seconds == 0.0
    clock.start()
    time.sleep(0.02)
    clock.start()  # already counting: no restart
    clock.pause()
    paused_at = clock.seconds
    assert paused_at >= 0.02
    time.sleep(0.02)
    assert clock.seconds == paused_at  # paused time is not counted
    clock.pause()
    clock.start()
    time.sleep(0.01)
    assert clock.seconds >= paused_at + 0.01
