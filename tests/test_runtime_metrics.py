"""Metrics served by the runtime itself: rt.serve_metrics / serve_dashboard."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request

from prometheus_client import CollectorRegistry, generate_latest

from pydotcompute import RingKernelRuntime, stage


async def echo(ctx):
    while not ctx.should_terminate:
        await ctx.send(await ctx.receive())


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


async def test_nothing_listens_unless_asked():
    async with RingKernelRuntime() as rt:
        await rt.launch("echo", echo)
        assert rt._metrics_server is None


async def test_served_metrics_count_traffic_and_flows_and_stop_at_shutdown():
    async with RingKernelRuntime() as rt:
        await rt.launch("echo", echo)
        await rt.activate("echo")
        for i in range(25):
            await rt.send_and_receive("echo", i, timeout=5)
        flow = await rt.deploy(stage(lambda x: x + 1), name="inc")
        keys = [await flow.submit(i) for i in range(7)]
        await flow.drain()
        assert [await flow.result(k) for k in keys] == list(range(1, 8))
        host, port = rt.serve_metrics()
        assert rt.serve_metrics() == (host, port)  # one server per runtime
        text = await asyncio.to_thread(_get, f"http://{host}:{port}/metrics")
        assert 'pydotcompute_kernel_messages_sent_total{backend="host",kernel="echo"} 25.0' in text
        assert 'pydotcompute_flow_items_completed_total{flow="inc"} 7.0' in text
        page = await asyncio.to_thread(_get, rt.serve_dashboard())
        assert '<main id="view">' in page
    with socket.socket() as s:  # the port is free again: the server stopped with the runtime
        # SO_REUSEADDR passes over connections in TIME_WAIT, never over a live listener
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen()


async def test_scrapes_are_answered_by_the_runtimes_event_loop():
    # A server thread beside a busy loop waits for the GIL after every socket call
    # (seconds per scrape); the runtime's loop answers between messages instead.
    async with RingKernelRuntime() as rt:
        await rt.launch("echo", echo)
        await rt.activate("echo")
        for i in range(10):
            await rt.send_and_receive("echo", i, timeout=5)
        read_on: list[int] = []
        snapshots = rt.get_all_telemetry

        def noting_reader():
            read_on.append(threading.get_ident())
            return snapshots()

        rt.get_all_telemetry = noting_reader  # type: ignore[method-assign]
        before = {t.name for t in threading.enumerate()}
        host, port = rt.serve_metrics()
        assert {t.name for t in threading.enumerate()} == before
        text = await asyncio.to_thread(_get, f"http://{host}:{port}/metrics")
        assert (
            'pydotcompute_kernel_messages_processed_total{backend="host",kernel="echo"} 10.0'
            in text
        )
        # The scrape and the history's samples: all read on the loop's own thread.
        assert read_on and set(read_on) == {threading.get_ident()}


async def test_metrics_into_a_callers_registry():
    registry = CollectorRegistry()
    async with RingKernelRuntime() as rt:
        await rt.launch("echo", echo)
        rt.serve_metrics(registry=registry)
        assert b"pydotcompute_kernel_queue_capacity" in generate_latest(registry)
