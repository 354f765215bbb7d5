"""Telemetry: kernel snapshots, the Prometheus collector, GPU readings, the metrics server.

The names below load on first use, so importing the package (which every backend does
for ``KernelTelemetry``) does not pull in the HTTP server or the Prometheus client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydotcompute.telemetry.collector import TelemetryCollector, TelemetrySource
    from pydotcompute.telemetry.gpu import GpuMonitor, GpuReading
    from pydotcompute.telemetry.history import MetricsHistory
    from pydotcompute.telemetry.scrape import Scrape, parse_metrics, scrape_source
    from pydotcompute.telemetry.server import (
        DashboardViews,
        MetricsServer,
        default_metrics_port,
        serve_dashboard_proxy,
        serve_metrics,
    )
    from pydotcompute.telemetry.snapshot import KernelTelemetry, LatencyRecorder

_WHERE = {
    "KernelTelemetry": "snapshot",
    "LatencyRecorder": "snapshot",
    "TelemetryCollector": "collector",
    "TelemetrySource": "collector",
    "GpuMonitor": "gpu",
    "GpuReading": "gpu",
    "Scrape": "scrape",
    "parse_metrics": "scrape",
    "scrape_source": "scrape",
    "MetricsHistory": "history",
    "DashboardViews": "server",
    "default_metrics_port": "server",
    "MetricsServer": "server",
    "serve_metrics": "server",
    "serve_dashboard_proxy": "server",
}

__all__ = [
    "DashboardViews",
    "GpuMonitor",
    "GpuReading",
    "KernelTelemetry",
    "LatencyRecorder",
    "MetricsHistory",
    "MetricsServer",
    "Scrape",
    "TelemetryCollector",
    "TelemetrySource",
    "default_metrics_port",
    "parse_metrics",
    "scrape_source",
    "serve_dashboard_proxy",
    "serve_metrics",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
