"""Per-kernel telemetry as plain Python objects, and the latency recorder behind it."""

from __future__ import annotations

import array
import dataclasses
import time

import numpy as np

__all__ = ["ActiveTime", "KernelTelemetry", "LatencyRecorder", "LATENCY_BUCKETS_NS"]

# Upper bounds (ns) of the latency histogram: powers of two from 1 µs to ~17 s.
# A sample's bucket is found from its bit length, so recording stays O(1) and cheap.
LATENCY_BUCKETS_NS: tuple[int, ...] = tuple(1 << b for b in range(10, 35))
_FIRST_BIT = 10
_N_BUCKETS = len(LATENCY_BUCKETS_NS) + 1  # the last one is +Inf


class LatencyRecorder:
    """Keeps the last ``window`` latency samples (for percentiles) and a log2 histogram.

    Recording is two stores and an add; the samples sit in a flat ``array`` of int64
    (no object per sample to keep or free). Percentiles are computed only when asked,
    by partial selection (``numpy.partition``) over a view of that array rather than
    a full sort, since a scrape may ask for them several times a second.
    """

    __slots__ = ("_samples", "_mask", "_n", "buckets", "sum_ns", "_last")

    def __init__(self, window: int = 4096) -> None:
        if window < 1 or window & (window - 1):
            raise ValueError("window must be a power of two")
        self._samples = array.array("q", bytes(8 * window))
        self._mask = window - 1
        self._n = 0
        self.buckets: list[int] = [0] * _N_BUCKETS
        self.sum_ns = 0
        # (count, qs, answer) of the last percentiles() call: an idle kernel's answer
        # is reused, scrape after scrape.
        self._last: tuple[int, tuple[float, ...], tuple[float | None, ...]] | None = None

    def record(self, latency_ns: int) -> None:
        """Add one sample, in nanoseconds."""
        self._samples[self._n & self._mask] = latency_ns
        self._n += 1
        self.sum_ns += latency_ns
        b = latency_ns.bit_length() - _FIRST_BIT
        self.buckets[b if 0 <= b < _N_BUCKETS else (0 if b < 0 else _N_BUCKETS - 1)] += 1

    @property
    def count(self) -> int:
        """Samples recorded since creation."""
        return self._n

    def percentiles(self, *qs: float) -> tuple[float | None, ...]:
        """Percentiles (0–100) over the recent window, in microseconds; None when empty."""
        count, last = self._n, self._last
        if last is not None and last[0] == count and last[1] == qs:
            return last[2]
        n = min(count, self._mask + 1)
        if n == 0:
            return tuple(None for _ in qs)
        ranks = [min(n - 1, int(q / 100.0 * n)) for q in qs]
        # The rank-th smallest lands at index rank.
        recent = np.partition(np.frombuffer(self._samples, dtype=np.int64, count=n), ranks)
        answer = tuple(int(recent[r]) / 1000.0 for r in ranks)
        self._last = (count, qs, answer)
        return answer


class ActiveTime:
    """Seconds a kernel has spent ACTIVE: the denominator of its throughput."""

    __slots__ = ("_since", "_total")

    def __init__(self) -> None:
        self._since = 0.0
        self._total = 0.0

    def start(self) -> None:
        """The kernel became active (a no-op while already counting)."""
        if not self._since:
            self._since = time.monotonic()

    def pause(self) -> None:
        """The kernel stopped being active (a no-op while paused)."""
        if self._since:
            self._total += time.monotonic() - self._since
            self._since = 0.0

    @property
    def seconds(self) -> float:
        """Active seconds so far, including the current stretch."""
        return self._total + (time.monotonic() - self._since if self._since else 0.0)


@dataclasses.dataclass(frozen=True)
class KernelTelemetry:
    """A snapshot of one kernel's counters, read on demand.

    Counters are totals since launch. ``throughput`` is messages processed per second
    over the kernel's active life. Latency is time in queue plus handling, in µs;
    None where the backend cannot measure it or nothing was processed yet.
    """

    kernel_id: str
    backend: str
    state: str
    messages_processed: int = 0
    messages_sent: int = 0
    messages_dropped: int = 0
    messages_rejected: int = 0
    errors: int = 0
    queue_depth: int = 0
    queue_capacity: int = 0
    output_queue_depth: int = 0
    throughput: float = 0.0
    latency_p50_us: float | None = None
    latency_p99_us: float | None = None
    restarts: int = 0
    last_error: str | None = None
    """What the kernel's handler last raised, on which message, at which line."""
    idle_polls: int = 0
    uptime_s: float = 0.0
    latency_buckets: tuple[int, ...] = ()
    """Non-cumulative counts per bucket of ``LATENCY_BUCKETS_NS`` plus a final +Inf bucket."""
    latency_sum_s: float = 0.0
    timestamp: float = dataclasses.field(default_factory=time.time)

    @property
    def queue_fill(self) -> float:
        """Input queue depth as a fraction of its capacity."""
        return self.queue_depth / self.queue_capacity if self.queue_capacity else 0.0

    def __repr__(self) -> str:
        # The counters a person looks for, not the 26 latency buckets.
        parts = [
            f"{self.kernel_id!r} {self.backend} {self.state}",
            f"processed={self.messages_processed}",
            f"queue={self.queue_depth}/{self.queue_capacity}",
        ]
        for name in ("messages_dropped", "messages_rejected", "errors", "restarts"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name.replace('messages_', '')}={value}")
        if self.throughput:
            parts.append(f"{self.throughput:,.0f} msg/s")
        if self.latency_p50_us is not None:
            parts.append(f"p50={self.latency_p50_us:.1f}µs")
        if self.latency_p99_us is not None:
            parts.append(f"p99={self.latency_p99_us:.1f}µs")
        return f"KernelTelemetry({', '.join(parts)})"

    @property
    def messages_failed(self) -> int:
        """Alias of ``errors``: messages whose handling raised."""
        return self.errors
