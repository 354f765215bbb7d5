"""What the dashboard's history costs the serving process: one sample a second.

A sample reads the kernels' snapshots (as a scrape does, without writing the text) and
adds rates and percentiles to the ring. Measured against answering one ``/metrics``
scrape (the baseline, timed in the same run) for sources of 1, 10 and 50 kernels with
full latency histograms and a flow per ten kernels, then as the share of one core taken
at one sample a second. The first design parsed the scrape's text back: shown beside
it, as ``parsed``.

    python benchmarks/dashboard_history.py [--repeats N]

Goal: a sample costs <= 5x a scrape, and under 1 % of a core for 10 kernels.
"""

from __future__ import annotations

import argparse
import time

from pydotcompute.telemetry.history import MetricsHistory
from pydotcompute.telemetry.scrape import scrape_source
from pydotcompute.telemetry.server import serve_metrics
from pydotcompute.telemetry.snapshot import KernelTelemetry


class Source:
    def __init__(self, kernels: int) -> None:
        self.kernels = kernels
        self.n = 0

    def get_all_telemetry(self) -> dict[str, KernelTelemetry]:
        self.n += 1000
        buckets = tuple((self.n // (i + 1)) for i in range(26))
        return {
            f"k{i}": KernelTelemetry(
                f"k{i}",
                "cpu",
                "active",
                messages_processed=self.n,
                queue_depth=5,
                queue_capacity=1024,
                latency_buckets=buckets,
                latency_sum_s=self.n * 1e-5,
            )
            for i in range(self.kernels)
        }

    def get_flow_telemetry(self) -> dict[str, dict[str, int]]:
        return {
            f"f{i}": {"submitted": self.n, "completed": self.n, "retried": 1, "dead_lettered": 0}
            for i in range(max(1, self.kernels // 10))
        }


def best_of(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(
        f"{'kernels':>8} {'scrape ms':>10} {'sample ms':>10} {'sample/scrape':>14} "
        f"{'parsed/scrape':>14} {'core at 1 Hz':>13}"
    )
    verdicts = []
    for kernels in (1, 10, 50):
        source = Source(kernels)
        with serve_metrics(source, port=0, gpu=False, history_interval=None) as server:
            routes = server._routes  # the server's own render and parse paths
            history = MetricsHistory(size=3600)
            scrape = best_of(lambda: routes.render("text/plain"), args.repeats)  # noqa: B023
            sample = best_of(lambda: history.add(scrape_source(source)), args.repeats)  # noqa: B023
            parsed = best_of(lambda: history.add(routes.scrape()), args.repeats)  # noqa: B023
        ratio = sample / scrape
        share = sample / 1.0 * 100
        verdicts.append((kernels, ratio, share))
        print(
            f"{kernels:>8} {scrape * 1e3:>10.3f} {sample * 1e3:>10.3f} {ratio:>13.1f}x "
            f"{parsed / scrape:>13.1f}x {share:>12.3f}%"
        )
    worst = max(r for _, r, _ in verdicts)
    ten = next(s for k, _, s in verdicts if k == 10)
    print(
        f"goal sample/scrape <= 5x: worst {worst:.1f}x ({'met' if worst <= 5 else 'NOT met'}); "
        f"goal < 1 % of a core at 10 kernels: {ten:.3f}% ({'met' if ten < 1 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
