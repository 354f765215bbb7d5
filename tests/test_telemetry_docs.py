"""The Grafana dashboard and the guide name only metrics the collector really exports."""

from __future__ import annotations

import json
import pathlib
import re

from pydotcompute.telemetry.collector import (
    FLOW_COUNTERS,
    FLOW_GAUGES,
    FUSED_STAGE_COUNTER,
    KERNEL_COUNTERS,
    KERNEL_GAUGES,
    LATENCY_METRIC,
    STATE_METRIC,
)
from pydotcompute.telemetry.gpu import GPU_GAUGES, NVML_AVAILABLE_METRIC

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "dashboards" / "pydotcompute.json"
GUIDE = ROOT / "docs" / "telemetry.md"

EXPORTED = (
    {f"{n}_total" for n in (*KERNEL_COUNTERS, *FLOW_COUNTERS)}
    | set(KERNEL_GAUGES)
    | set(FLOW_GAUGES)
    | set(GPU_GAUGES)
    | {STATE_METRIC, NVML_AVAILABLE_METRIC, LATENCY_METRIC, f"{FUSED_STAGE_COUNTER}_total"}
    | {f"{LATENCY_METRIC}_{s}" for s in ("bucket", "sum", "count")}
)
NAME = re.compile(r"pydotcompute_[a-z_]+")


def targets(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out += p.get("targets", [])
        out += targets(p.get("panels", []))
    return out


def test_grafana_dashboard_queries_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 30
    exprs = [t["expr"] for t in targets(dash["panels"])]
    assert len(exprs) >= 15
    used = {name for e in exprs for name in NAME.findall(e)}
    assert used <= EXPORTED, used - EXPORTED
    # Every kernel counter, the state, queue fill, the histogram and GPU readings appear.
    for needed in (
        "pydotcompute_kernel_messages_processed_total",
        "pydotcompute_kernel_messages_dropped_total",
        "pydotcompute_kernel_idle_polls_total",
        "pydotcompute_kernel_queue_capacity",
        STATE_METRIC,
        f"{LATENCY_METRIC}_bucket",
        "pydotcompute_gpu_utilization_ratio",
        "pydotcompute_flow_items_dead_lettered_total",
    ):
        assert needed in used, needed
    # Panels query through the dashboard's data source variable, so import needs no edits.
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_guide_documents_every_metric_and_only_those() -> None:
    documented: set[str] = set()
    # Table cells such as `pydotcompute_gpu_memory_{used,total}_bytes` name several.
    for m in re.finditer(
        r"`(pydotcompute_[a-z_]*)(?:\{([a-z_,]+)\}([a-z_]*))?`", GUIDE.read_text()
    ):
        head, alternatives, tail = m.groups()
        documented |= {head + a + tail for a in alternatives.split(",")} if alternatives else {head}
    assert documented - EXPORTED == set()
    assert EXPORTED - documented == {f"{LATENCY_METRIC}_{s}" for s in ("bucket", "sum", "count")}
