"""A two-node Ray cluster started with ``ray start`` as docs/scale-out.md says (token
authentication on), driven by child processes: placements that wait and fail within
their launch timeout, a Ray Client (``ray://``) driver, a host actor's ``send_to`` from one
node to the other, and ``ray_hop.py --address``.

One cluster serves the module; its nodes are stopped at the end, whatever happened, by
ending the processes they started (never ``ray stop``, which would end any other Ray on
the machine). One CPU per node keeps it light on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'pydotcompute[ray]')")

from tests.ray_nodes import NoCluster, two_nodes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def nodes():
    try:
        with two_nodes({"node_a": 1}, {"node_b": 1}) as n:
            yield n
    except NoCluster as exc:
        pytest.skip(str(exc))


def drive(nodes, *args: str, timeout: float = 240) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ray_drivers.py"), *args],
        env={**os.environ, **nodes.env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + nodes.tail()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_launch_whose_resources_are_taken_fails_within_its_launch_timeout(nodes):
    seen = drive(nodes, "placement", nodes.gcs)
    whole, fraction, never, after = seen["whole"], seen["fraction"], seen["never"], seen["next"]
    for failed, timeout in ((whole, 3), (fraction, 2)):
        assert not failed.get("hung"), f"the launch hung: {failed}"
        assert failed["error"] == "KernelFailedError"
        assert failed["cause"] == "PlacementTimeoutError"
        assert timeout <= failed["waited"] < timeout + 30
        assert failed["state"] == "FAILED"
    # What it asked for, and what holds it: the kernels by id.
    assert "'node_b': 1" in whole["text"] and "KernelActor('b1')" in whole["text"]
    assert "node_b 0 of 1 free" in whole["text"]
    assert "'node_a': 0.5" in fraction["text"]
    assert "KernelActor('f1')" in fraction["text"] and "KernelActor('f2')" in fraction["text"]
    # No half-launched actor kept waiting for node_b: the next launch got it at once.
    assert after["same_node"] and after["waited"] < 30 and after["sum"] == 3000.0
    assert never["cause"] == "BackendNotAvailableError" and never["waited"] < 30


def test_a_ray_client_driver_places_kernels_on_both_nodes(nodes):
    if not nodes.client:
        pytest.skip("grpcio is missing: Ray Client needs pip install 'ray[client]'")
    seen = drive(nodes, "client", nodes.client)
    if "skip" in seen:
        pytest.skip(seen["skip"])
    assert seen == {"nodes": 2, "sums": [3000.0, 3000.0]}


def test_a_host_actor_on_one_node_sends_to_a_kernel_on_another(nodes):
    seen = drive(nodes, "send_to", nodes.gcs)
    assert seen == {"nodes": 2, "in_order": True, "done": 500, "extra": "QueueTimeoutError"}


def test_ray_hop_benchmark_measures_a_cluster_given_by_address(nodes):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ray_hop.py"), "--address", nodes.gcs,
         "--records", "8192", "--batch", "4096", "--repeat", "1", "--items", "40"],
        env={**os.environ, **nodes.env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert nodes.gcs in proc.stdout
