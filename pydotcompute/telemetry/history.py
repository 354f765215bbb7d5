"""The dashboard's history: a bounded ring of samples kept by the serving process.

Every ``interval`` seconds the server reads its metrics (a ``Scrape``) and turns it
into one sample: per kernel messages/s, latency p50/p99 and queue fill; per flow items
finished per second, retries per second, dead letters so far and items in flight; per
GPU utilisation and memory. Rates are measured against a scrape at least
``rate_window`` seconds older (the oldest kept while the history is younger), so a
kernel whose counters move in steps does not read as idle between two close samples.
A reload of the page, or a second viewer, gets the same samples.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from pydotcompute.telemetry.scrape import (
    Scrape,
    bucket_delta,
    counter_rate,
    histogram_quantile,
)

__all__ = ["HISTORY_INTERVAL_S", "HISTORY_SIZE", "MetricsHistory"]

HISTORY_INTERVAL_S = 1.0
HISTORY_SIZE = 3600  # an hour at one sample a second: about 1 MB as JSON for 10 kernels


class MetricsHistory:
    """The last ``size`` samples, oldest first. Safe to use from several threads.

    A sample is a dict: ``t`` (seconds since the epoch), ``kernels`` (name ->
    ``[msg/s, p50 s, p99 s, queue fill]``), ``flows`` (name -> ``[items/s, retries/s,
    dead-lettered, in flight]``) and ``gpus`` (id -> ``[utilisation, memory used,
    memory total]``); a value not known (no rate yet, no latency) is None.
    """

    KERNEL_FIELDS = ("msg_per_s", "p50_s", "p99_s", "fill")
    FLOW_FIELDS = ("items_per_s", "retries_per_s", "dead_lettered", "in_flight")
    GPU_FIELDS = ("utilization", "memory_used_bytes", "memory_total_bytes")

    def __init__(
        self,
        size: int = HISTORY_SIZE,
        interval: float = HISTORY_INTERVAL_S,
        rate_window: float | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a history keeps at least one sample, got size={size}")
        if interval <= 0:
            raise ValueError(f"the history interval must be > 0, got {interval}")
        self.size = size
        self.interval = interval
        self.rate_window = max(1.0, interval) if rate_window is None else rate_window
        self._samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self._recent: collections.deque[Scrape] = collections.deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._samples)

    def __repr__(self) -> str:
        return f"<MetricsHistory {len(self)}/{self.size} samples every {self.interval:g} s>"

    def add(self, scrape: Scrape) -> dict[str, Any]:
        """Turn ``scrape`` into a sample and keep it; returns the sample."""
        with self._lock:
            recent = self._recent
            while len(recent) > 1 and recent[1].time <= scrape.time - self.rate_window:
                recent.popleft()
            ref = recent[0] if recent else None
            sample = _sample(ref, scrape)
            recent.append(scrape)
            self._samples.append(sample)
            return sample

    def since(self, t: float | None = None) -> list[dict[str, Any]]:
        """Samples newer than ``t`` (every kept sample when None), oldest first."""
        with self._lock:
            if t is None:
                return list(self._samples)
            out = []
            for s in reversed(self._samples):
                if s["t"] <= t:
                    break
                out.append(s)
            out.reverse()
            return out

    def as_json(self, t: float | None = None) -> dict[str, Any]:
        """What ``/api/history`` answers."""
        return {
            "interval": self.interval,
            "size": self.size,
            "kernel_fields": self.KERNEL_FIELDS,
            "flow_fields": self.FLOW_FIELDS,
            "gpu_fields": self.GPU_FIELDS,
            "samples": self.since(t),
        }


def _sample(ref: Scrape | None, cur: Scrape) -> dict[str, Any]:
    dt = cur.time - ref.time if ref is not None else 0.0
    kernels: dict[str, list[float | None]] = {}
    for name, k in cur.kernels.items():
        p = ref.kernels.get(name) if ref is not None else None
        rate = counter_rate(p.messages_processed, k.messages_processed, dt) if p else None
        buckets = k.latency_buckets
        if p is not None:
            window = bucket_delta(p.latency_buckets, buckets)
            # Nothing handled in the window: the latency of the last work done stands.
            if window and window[-1][1] > 0:
                buckets = window
        kernels[name] = [
            rate,
            histogram_quantile(0.5, buckets),
            histogram_quantile(0.99, buckets),
            k.queue_fill,
        ]
    flows: dict[str, list[float | None]] = {}
    for name, f in cur.flows.items():
        p2 = ref.flows.get(name) if ref is not None else None
        flows[name] = [
            counter_rate(p2.completed, f.completed, dt) if p2 else None,
            counter_rate(p2.retried, f.retried, dt) if p2 else None,
            f.dead_lettered,
            f.in_flight,
        ]
    gpus = {
        gid: [g.utilization, g.memory_used_bytes, g.memory_total_bytes]
        for gid, g in cur.gpus.items()
    }
    return {"t": cur.time, "kernels": kernels, "flows": flows, "gpus": gpus}
