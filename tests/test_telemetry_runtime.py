"""Metrics of a real runtime with host actors: exact counts, and scrapes under traffic."""

from __future__ import annotations

import asyncio
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from pydotcompute import (
    BackendNotAvailableError,
    QueueFullError,
    RingKernelRuntime,
    message,
)
from pydotcompute.telemetry.scrape import parse_metrics
from pydotcompute.telemetry.server import serve_metrics


async def echo(ctx):
    while not ctx.should_terminate:
        await ctx.send(await ctx.receive())


async def explodes_on_three(ctx):
    while True:
        msg = await ctx.receive()
        if msg == 3:
            raise ValueError("three")
        await ctx.send(msg)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def lab(kernel: str, **extra: str) -> frozenset:
    return frozenset({"kernel": kernel, "backend": "host", **extra}.items())


async def test_exact_values_after_known_traffic() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("echo", echo, queue_size=256)
        await rt.activate("echo")
        for i in range(250):
            await rt.send("echo", i)
        for _ in range(250):
            await rt.receive("echo", timeout=5)

        await rt.launch("dropper", echo, queue_size=4, backpressure="drop_newest")
        for i in range(10):
            await rt.send("dropper", i)  # LAUNCHED, not active: nothing is consumed

        await rt.launch("picky", echo, queue_size=2, backpressure="reject")
        rejected = 0
        for i in range(5):
            try:
                await rt.send("picky", i)
            except QueueFullError:
                rejected += 1
        assert rejected == 3

        server = serve_metrics(rt, gpu=False)
        rt.add_closer(server.stop)
        text = await asyncio.to_thread(fetch, server.url)

    s = samples(text)
    assert s[("pydotcompute_kernel_messages_processed_total", lab("echo"))] == 250
    assert s[("pydotcompute_kernel_messages_sent_total", lab("echo"))] == 250
    assert s[("pydotcompute_kernel_messages_failed_total", lab("echo"))] == 0
    assert s[("pydotcompute_kernel_queue_depth", lab("echo"))] == 0
    assert s[("pydotcompute_kernel_queue_capacity", lab("echo"))] == 256
    assert s[("pydotcompute_kernel_state", lab("echo", state="active"))] == 1
    assert s[("pydotcompute_kernel_state", lab("echo", state="launched"))] == 0
    # The host backend times a sample of the messages, so the histogram holds fewer.
    timed = s[("pydotcompute_kernel_latency_seconds_count", lab("echo"))]
    assert 1 <= timed <= 250
    assert s[("pydotcompute_kernel_latency_seconds_bucket", lab("echo", le="+Inf"))] == timed
    assert s[("pydotcompute_kernel_latency_seconds_sum", lab("echo"))] > 0

    assert s[("pydotcompute_kernel_messages_dropped_total", lab("dropper"))] == 6
    assert s[("pydotcompute_kernel_queue_depth", lab("dropper"))] == 4
    assert s[("pydotcompute_kernel_messages_processed_total", lab("dropper"))] == 0
    assert s[("pydotcompute_kernel_state", lab("dropper", state="launched"))] == 1

    assert s[("pydotcompute_kernel_messages_rejected_total", lab("picky"))] == 3
    assert s[("pydotcompute_kernel_queue_depth", lab("picky"))] == 2


async def test_failed_kernel_and_restart_are_visible() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("x", explodes_on_three)
        await rt.activate("x")
        for i in (1, 2, 3):
            await rt.send("x", i)
        for _ in range(100):
            if rt.get_kernel_state("x").name == "FAILED":
                break
            await asyncio.sleep(0.01)
        with serve_metrics(rt, gpu=False) as server:
            s = samples(await asyncio.to_thread(fetch, server.url))
            assert s[("pydotcompute_kernel_state", lab("x", state="failed"))] == 1
            assert s[("pydotcompute_kernel_messages_failed_total", lab("x"))] == 1
            await rt.launch("x", explodes_on_three)  # relaunch after failure
            s = samples(await asyncio.to_thread(fetch, server.url))
            assert s[("pydotcompute_kernel_restarts_total", lab("x"))] == 1
            assert s[("pydotcompute_kernel_state", lab("x", state="launched"))] == 1


async def test_scrape_under_concurrent_traffic() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("echo", echo, queue_size=256)
        await rt.activate("echo")
        server = serve_metrics(rt, registry=CollectorRegistry(), gpu=False)
        rt.add_closer(server.stop)
        stop = asyncio.Event()
        sent = 0

        async def traffic() -> None:
            nonlocal sent
            while not stop.is_set():
                for _ in range(64):
                    await rt.send("echo", sent)
                    sent += 1
                for _ in range(64):
                    await rt.receive("echo", timeout=10)
                await asyncio.sleep(0)

        driver = asyncio.create_task(traffic())
        seen: list[float] = []
        while len(seen) < 8:  # scrapes taken while the kernel is busy
            k = parse_metrics(await asyncio.to_thread(fetch, server.url)).kernels["echo"]
            seen.append(k.messages_processed)
        stop.set()
        await driver
        final = parse_metrics(await asyncio.to_thread(fetch, server.url)).kernels["echo"]

    assert seen == sorted(seen)  # counters never go backwards between scrapes
    assert len(set(seen)) > 1, f"traffic did not move between scrapes: {seen}"
    assert 0 < seen[-1] <= sent
    assert (final.messages_processed, final.messages_sent) == (sent, sent)
    assert 1 <= final.latency_buckets[-1][1] <= sent


async def test_server_stops_with_the_runtime() -> None:
    import threading

    rt = RingKernelRuntime()
    server = serve_metrics(rt, gpu=False)
    rt.add_closer(server.stop)
    await rt.shutdown()
    assert not server.running
    assert not [t for t in threading.enumerate() if t.name.startswith("pydotcompute-metrics")]
    with pytest.raises(OSError):
        await asyncio.to_thread(fetch, server.url)


@message
class Reading:
    value: float
    seq: int


def keep_even(msg, out, state):  # compiled once by the cpu backend
    out.value = msg.value * 2.0
    out.seq = msg.seq
    return msg.seq % 2 == 0


async def launch_cpu(rt: RingKernelRuntime, kernel_id: str, **options) -> None:
    try:
        await rt.launch(
            kernel_id,
            keep_even,
            input_type=Reading,
            output_type=Reading,
            backend="cpu",
            **options,
        )
    except BackendNotAvailableError as exc:
        pytest.skip(f"no cpu backend here: {exc}")


def readings(n: int) -> np.ndarray:
    records = np.zeros(n, dtype=Reading.__record_dtype__)
    records["seq"] = np.arange(n)
    return records


async def test_cpu_kernel_exact_values() -> None:
    async with RingKernelRuntime() as rt:
        await launch_cpu(rt, "even", queue_size=1024)
        await rt.activate("even")
        assert await rt.send_batch("even", readings(1000), timeout=10) == 1000
        got = 0
        while got < 500:
            got += len(await rt.receive_batch("even", 1000, timeout=10))
        await launch_cpu(rt, "parked", queue_size=4, backpressure="drop_newest")
        await rt.send_batch("parked", readings(10), timeout=10)
        for _ in range(200):  # an active kernel with nothing to do polls idly
            if rt.get_telemetry("even").idle_polls > 0:
                break
            await asyncio.sleep(0.005)
        with serve_metrics(rt, gpu=False) as server:
            s = samples(await asyncio.to_thread(fetch, server.url))

    def cpu(kernel: str, **extra: str) -> frozenset:
        return frozenset({"kernel": kernel, "backend": "cpu", **extra}.items())

    assert got == 500
    assert s[("pydotcompute_kernel_messages_processed_total", cpu("even"))] == 1000
    assert s[("pydotcompute_kernel_messages_sent_total", cpu("even"))] == 500
    assert s[("pydotcompute_kernel_queue_depth", cpu("even"))] == 0
    assert s[("pydotcompute_kernel_queue_capacity", cpu("even"))] == 1024
    assert s[("pydotcompute_kernel_idle_polls_total", cpu("even"))] > 0
    assert s[("pydotcompute_kernel_state", cpu("even", state="active"))] == 1
    assert s[("pydotcompute_kernel_messages_dropped_total", cpu("parked"))] == 6
    assert s[("pydotcompute_kernel_queue_depth", cpu("parked"))] == 4
    assert s[("pydotcompute_kernel_state", cpu("parked", state="launched"))] == 1


async def test_flow_counters_of_a_real_flow() -> None:
    from pydotcompute.coordinator import deploy, stage

    attempts: dict[int, int] = {}

    def double(x: int) -> int:
        attempts[x] = attempts.get(x, 0) + 1
        if x == 3 and attempts[x] == 1:
            raise ValueError("fails once")
        if x == 4:
            raise ValueError("always fails")
        return 2 * x

    class FlowSource:
        """How a runtime exposes the flows deployed on it."""

        def __init__(self, flow) -> None:
            self.flow = flow

        def get_all_telemetry(self):
            return {}

        def get_flow_telemetry(self):
            return {self.flow.name: self.flow.counters()}

    async with await deploy(None, stage(double, retries=2, backoff=0.001), name="d") as flow:
        for i in range(10):
            await flow.submit(i)
        await flow.drain()
        with serve_metrics(FlowSource(flow), gpu=False) as server:
            s = samples(await asyncio.to_thread(fetch, server.url))

    d = frozenset({"flow": "d"}.items())
    assert s[("pydotcompute_flow_items_submitted_total", d)] == 10
    assert s[("pydotcompute_flow_items_completed_total", d)] == 9
    assert s[("pydotcompute_flow_items_retried_total", d)] == 2  # item 3 once, item 4 once
    assert s[("pydotcompute_flow_items_dead_lettered_total", d)] == 1
    assert s[("pydotcompute_flow_items_in_flight", d)] == 0
    assert s[("pydotcompute_flow_leases_lost_total", d)] == 0
