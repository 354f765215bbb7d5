"""The Ray backend's edges: configuration, Ray absent, the runtime's own Ray connection."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pydotcompute import RingKernelRuntime, ring_kernel
from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.errors import (
    BackendNotAvailableError,
    InvalidConfigurationError,
    KernelFailedError,
)
from tests.ray_kernels import SEQ, doubler, plus_one


def handler(msg, out, state):  # type: ignore[no-untyped-def]
    return False


@pytest.mark.parametrize(
    "options",
    [
        {"num_gpus": -1},
        {"num_gpus": True},
        {"num_cpus": float("nan")},
        {"num_cpus": float("inf")},
        {"num_gpus": "1"},
        {"resources": [("node_a", 1)]},
        {"resources": {"node_a": -1}},
        {"resources": {"": 1}},
        {"resources": {"GPU": 1}},
    ],
)
def test_placement_options_are_validated(options):
    with pytest.raises(InvalidConfigurationError):
        RingKernelConfig(**options)
    with pytest.raises(InvalidConfigurationError):
        ring_kernel(kernel_id="bad", auto_register=False, **options)(handler)


def test_placement_options_are_kept_and_copied():
    wanted = {"node_a": 1}
    fn = ring_kernel(
        kernel_id="placed", num_gpus=0.5, num_cpus=1, resources=wanted, auto_register=False
    )(handler)
    config = fn.__ring_kernel__.config
    wanted["node_a"] = 2
    assert (config.num_gpus, config.num_cpus, config.resources) == (0.5, 1, {"node_a": 1})
    assert RingKernelConfig().resources == {} and RingKernelConfig().num_gpus == 0


def test_importing_the_package_does_not_import_ray():
    code = (
        "import sys, pydotcompute, pydotcompute.runtime.runtime; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_cluster_without_ray_installed_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an absent package looks like
    with pytest.raises(BackendNotAvailableError, match=r'pip install "pydotcompute\[ray\]"'):
        RingKernelRuntime(cluster="local")


needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed (pip install 'pydotcompute[ray]')",
)


def test_bad_cluster_addresses_are_refused():
    with pytest.raises(InvalidConfigurationError):
        RingKernelRuntime(cluster="")


@needs_ray
async def test_a_cuda_kernel_on_a_cluster_must_ask_for_a_gpu():
    import ray

    async with RingKernelRuntime(cluster="local") as rt:
        with pytest.raises(InvalidConfigurationError, match="num_gpus"):
            await rt.launch("inc", plus_one, backend="cuda", input_type=SEQ, output_type=SEQ)
    assert not ray.is_initialized()  # refused before connecting


@needs_ray
async def test_the_runtime_owns_the_ray_instance_it_started():
    import ray

    assert not ray.is_initialized(), "another test left Ray connected"
    threads_before = set(threading.enumerate())
    first = RingKernelRuntime(cluster="local")
    second = RingKernelRuntime(cluster="local")
    async with first, second:
        await first.launch("double", doubler)
        await second.launch("double", doubler)  # same id, another runtime: another actor
        for rt in (first, second):
            await rt.activate("double")
        assert first.get_placement("double").actor_id != second.get_placement("double").actor_id
        await first.send("double", 4)
        await second.send("double", 5)
        assert await first.receive("double", timeout=10) == 8
        assert await second.receive("double", timeout=10) == 10

        # No node can hold it: the launch fails at once instead of waiting forever.
        with pytest.raises(KernelFailedError) as info:
            await first.launch("nowhere", doubler, resources={"no_such_node": 1})
        assert isinstance(info.value.__cause__, BackendNotAvailableError)

        await first.shutdown()  # the connection stays: the second runtime uses it
        assert ray.is_initialized()
        assert await second.send_and_receive("double", 6, timeout=10) == 12
    assert not ray.is_initialized()
    await asyncio.sleep(0.2)
    # The event loop's default executor (ray.init runs there) closes with the loop.
    left = {
        t
        for t in threading.enumerate()
        if t not in threads_before and t.is_alive() and not t.name.startswith("asyncio_")
    }
    assert not left, f"threads left behind: {left}"


@needs_ray
@pytest.mark.gpu
async def test_a_kernel_that_asks_for_a_gpu_gets_one():
    async with RingKernelRuntime(cluster="local") as rt:
        await rt.launch("inc", plus_one, num_gpus=1, input_type=SEQ, output_type=SEQ)
        placement = rt.get_placement("inc")
        assert placement.gpu_ids and placement.backend == "cuda"
        await rt.activate("inc")
        batch = np.zeros(4096, SEQ)
        batch["value"] = np.arange(4096)
        assert await rt.send_batch("inc", batch) == 4096
        got = []
        while len(got) < 4096:
            got.extend((await rt.receive_batch("inc", 4096, timeout=30))["value"].tolist())
        assert sorted(got) == [v + 1.0 for v in range(4096)]
        assert rt.get_telemetry("inc").backend == "cuda"


class _Ref:
    def __init__(self, fut: object) -> None:
        self._fut = fut

    def future(self) -> object:
        return self._fut


class _GetMethod:
    def __init__(self) -> None:
        self.calls: list[concurrent.futures.Future[object]] = []

    def remote(self, *args: object) -> _Ref:
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        self.calls.append(fut)
        return _Ref(fut)


async def test_a_receive_lets_a_fetch_that_just_landed_deliver() -> None:
    # The fetch has landed but its done callback waits for the next turn of the event
    # loop. Awaiting a finished future does not yield (wait_for, Python 3.12+), so a
    # receive that only awaited it spun until its deadline and the outputs never came.
    from pydotcompute.cluster.ray_backend import RayKernelBackend

    config = RingKernelConfig(queue_size=8)
    loop = RayKernelBackend("k", handler, config, None, None, lambda exc: None, cluster=None)  # type: ignore[arg-type]
    loop._event_loop = asyncio.get_running_loop()
    get = _GetMethod()
    loop._actor = type("Actor", (), {"get": get})()
    loop._start_fetch(8, 0.2)
    get.calls[0].set_result(["out"])  # lands on the event loop at its next turn
    await asyncio.sleep(0)
    assert loop._fetch is not None and loop._fetch.done() and loop._buffered == 0
    assert await loop.get(timeout=1.0) == "out"


def test_the_ray_extra_brings_what_a_ray_client_address_needs():
    """cluster="ray://..." connects through Ray Client, which needs Ray's client extra
    (grpcio); the dev extra, which the tests install, holds the same."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    root = Path(__file__).resolve().parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in ("ray", "dev"):
        rays = [r for r in extras[extra] if r.replace(" ", "").startswith("ray")]
        assert rays and all(r.replace(" ", "").startswith("ray[client]") for r in rays), extra
