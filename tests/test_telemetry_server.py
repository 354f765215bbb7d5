"""The opt-in metrics server: routes, registries, lifetime, and scrapes under traffic."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from pydotcompute.errors import InvalidConfigurationError
from pydotcompute.telemetry import server as server_module
from pydotcompute.telemetry.scrape import parse_metrics
from pydotcompute.telemetry.server import serve_dashboard_proxy, serve_metrics
from pydotcompute.telemetry.snapshot import KernelTelemetry


class CountingSource:
    """A source whose counter a traffic thread bumps, as a kernel loop would."""

    def __init__(self) -> None:
        self.processed = 0

    def get_all_telemetry(self) -> dict[str, KernelTelemetry]:
        return {
            "echo": KernelTelemetry(
                "echo", "host", "active", messages_processed=self.processed, queue_capacity=8
            )
        }


class BrokenSource:
    def get_all_telemetry(self):
        raise RuntimeError("counters unreadable")


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def metrics_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pydotcompute-metrics")]


def test_routes() -> None:
    source = CountingSource()
    source.processed = 17
    with serve_metrics(source, gpu=False) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        status, ctype, text = get(server.url)
        assert status == 200 and ctype.startswith("text/plain")
        assert (
            'pydotcompute_kernel_messages_processed_total{backend="host",kernel="echo"} 17.0'
            in text
        )
        status, ctype, page = get(server.dashboard_url)
        assert status == 200 and ctype.startswith("text/html")
        assert '<main id="view">' in page
        assert get(f"http://{host}:{port}/dashboard")[2] == page
        status, ctype, body = get(f"http://{host}:{port}/api/scrape")
        data = json.loads(body)
        assert data["kernels"]["echo"]["messages_processed"] == 17
        assert get(f"http://{host}:{port}/nope")[0] == 404


def test_openmetrics_on_request() -> None:
    with serve_metrics(CountingSource(), gpu=False) as server:
        req = urllib.request.Request(
            server.url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert r.read().decode().endswith("# EOF\n")


def test_page_needs_no_network() -> None:
    with serve_metrics(CountingSource(), gpu=False) as server:
        page = get(server.dashboard_url)[2]
    for marker in ("<script src", "<link", "@import", "https://", "http://", "url("):
        assert marker not in page, marker


def test_caller_registry_keeps_its_own_metrics_and_is_released_on_stop() -> None:
    registry = CollectorRegistry()
    mine = Counter("app_requests", "requests", registry=registry)
    mine.inc(3)
    server = serve_metrics(CountingSource(), registry=registry, gpu=False)
    text = get(server.url)[2]
    assert "app_requests_total 3.0" in text
    assert "pydotcompute_kernel_messages_processed_total" in text
    server.stop()
    names = {f.name for f in registry.collect()}
    assert "app_requests" in names
    assert not [n for n in names if n.startswith("pydotcompute_")]
    # A second runtime may register into the same registry afterwards.
    serve_metrics(CountingSource(), registry=registry, gpu=False).stop()


def test_stop_joins_threads_and_frees_the_port() -> None:
    before = len(metrics_threads())
    server = serve_metrics(CountingSource(), gpu=False)
    assert len(metrics_threads()) == before + 1
    get(server.url)
    server.stop()
    server.stop()  # idempotent
    assert not server.running
    assert len(metrics_threads()) == before
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)
    # The port can be bound again at once.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(server.address)


def test_two_servers_share_nothing() -> None:
    a, b = CountingSource(), CountingSource()
    a.processed, b.processed = 1, 2
    with serve_metrics(a, gpu=False) as sa, serve_metrics(b, gpu=False) as sb:
        assert sa.address != sb.address
        assert parse_metrics(get(sa.url)[2]).kernels["echo"].messages_processed == 1
        assert parse_metrics(get(sb.url)[2]).kernels["echo"].messages_processed == 2


def test_a_failing_source_is_a_500_with_the_reason(caplog) -> None:
    with serve_metrics(BrokenSource(), gpu=False) as server:
        status, _, body = get(server.url)
    assert status == 500
    assert "counters unreadable" in body
    assert any("error serving /metrics" in r.getMessage() for r in caplog.records)


def test_scrapes_under_concurrent_traffic() -> None:
    source = CountingSource()
    total = 200_000
    go = threading.Event()

    def traffic() -> None:
        go.wait()
        for _ in range(total):
            source.processed += 1

    worker = threading.Thread(target=traffic)
    worker.start()
    seen: list[float] = []
    with serve_metrics(source, gpu=False) as server:
        go.set()
        while worker.is_alive() or len(seen) < 3:
            text = get(server.url)[2]
            seen.append(parse_metrics(text).kernels["echo"].messages_processed)
        worker.join()
        final = parse_metrics(get(server.url)[2]).kernels["echo"].messages_processed
    assert seen == sorted(seen)  # counters never go backwards between scrapes
    assert final == total


def test_dashboard_proxy_reads_another_endpoint() -> None:
    source = CountingSource()
    source.processed = 99
    with serve_metrics(source, gpu=False) as upstream:
        with serve_dashboard_proxy(f"127.0.0.1:{upstream.address[1]}") as proxy:
            status, _, text = get(proxy.url)
            assert status == 200
            families = {f.name for f in text_string_to_metric_families(text)}
            assert "pydotcompute_kernel_messages_processed" in families
            data = json.loads(get(proxy.dashboard_url + "api/scrape")[2])
            assert data["kernels"]["echo"]["messages_processed"] == 99
    with serve_dashboard_proxy(upstream.url) as proxy:  # upstream is gone now
        status, _, body = get(proxy.dashboard_url + "api/scrape")
        assert status == 502 and "unreachable" in body


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with serve_metrics(CountingSource(), addr="::1", gpu=False) as server:
        assert server.url.startswith("http://[::1]:")
        assert get(server.url)[0] == 200


# -- served from an event loop (as a runtime serves its own metrics) -------------------


class ThreadNotingSource(CountingSource):
    """Notes the thread that reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.read_on: set[int] = set()

    def get_all_telemetry(self) -> dict[str, KernelTelemetry]:
        self.read_on.add(threading.get_ident())
        return super().get_all_telemetry()


async def exchange(address: tuple[str, int], request: bytes) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_on_a_loop_the_loop_itself_answers() -> None:
    source = ThreadNotingSource()
    source.processed = 17
    before = metrics_threads()
    server = serve_metrics(source, gpu=False, loop=asyncio.get_running_loop())
    with server:
        assert metrics_threads() == before  # no thread of its own
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        status, ctype, text = await asyncio.to_thread(get, server.url)
        assert status == 200 and ctype.startswith("text/plain")
        assert (
            'pydotcompute_kernel_messages_processed_total{backend="host",kernel="echo"} 17.0'
            in text
        )
        req = urllib.request.Request(
            server.url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with await asyncio.to_thread(urllib.request.urlopen, req, timeout=5) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert r.read().decode().endswith("# EOF\n")
        status, ctype, page = await asyncio.to_thread(get, server.dashboard_url)
        assert status == 200 and ctype.startswith("text/html")
        assert '<main id="view">' in page
        data = json.loads((await asyncio.to_thread(get, f"http://{host}:{port}/api/scrape"))[2])
        assert data["kernels"]["echo"]["messages_processed"] == 17
        assert (await asyncio.to_thread(get, f"http://{host}:{port}/nope"))[0] == 404
    assert source.read_on == {threading.get_ident()}
    assert not server.running
    with pytest.raises(OSError):
        await asyncio.to_thread(urllib.request.urlopen, server.url, timeout=2)
    with socket.socket() as s:  # the port can be bound again at once
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(server.address)


async def test_on_a_loop_bad_requests_are_refused(caplog) -> None:
    with serve_metrics(CountingSource(), gpu=False, loop=asyncio.get_running_loop()) as server:
        answer = await exchange(server.address, b"PUT /metrics HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 501 ")
        answer = await exchange(server.address, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 405 ")  # only actions take a POST
        assert (await exchange(server.address, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.0 400 ")
        huge = b"GET /metrics HTTP/1.0\r\nX-Pad: " + b"x" * 20_000
        assert (await exchange(server.address, huge)).startswith(b"HTTP/1.0 431 ")
        # Anything after the head is ignored: one request, one answer.
        answer = await exchange(server.address, b"GET /metrics HTTP/1.0\r\n\r\nGET /nope")
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.count(b"HTTP/1.0") == 1
    with serve_metrics(BrokenSource(), gpu=False, loop=asyncio.get_running_loop()) as server:
        answer = await exchange(server.address, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 500 ") and b"counters unreadable" in answer
    assert any("error serving /metrics" in r.getMessage() for r in caplog.records)


async def test_on_a_loop_a_stalled_client_is_cut_off(monkeypatch) -> None:
    monkeypatch.setattr(server_module, "_CLIENT_TIMEOUT_S", 0.1)
    with serve_metrics(CountingSource(), gpu=False, loop=asyncio.get_running_loop()) as server:
        assert await exchange(server.address, b"GET /metrics HTTP/1.0\r\n") == b""
        # Still serving others afterwards.
        answer = await exchange(server.address, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n")


async def test_on_a_loop_stop_drops_open_connections_and_frees_the_port() -> None:
    loop = asyncio.get_running_loop()
    server = serve_metrics(CountingSource(), gpu=False, loop=loop)
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(b"GET /metrics HTTP/1.0\r\n")  # an unfinished request
    await asyncio.to_thread(get, server.url)  # the loop is serving by now
    server.stop()
    server.stop()  # idempotent
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    # Stopped before the loop ever ran it: the port is released just the same.
    early = serve_metrics(CountingSource(), gpu=False, loop=loop)
    early.stop()
    for stopped in (server, early):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(stopped.address)
    await asyncio.sleep(0)  # the cancelled start leaves nothing behind on the loop


async def test_on_a_loop_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    loop = asyncio.get_running_loop()
    with serve_metrics(CountingSource(), addr="::1", gpu=False, loop=loop) as server:
        assert server.url.startswith("http://[::1]:")
        assert (await asyncio.to_thread(get, server.url))[0] == 200


def test_on_a_loop_it_starts_only_from_that_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(InvalidConfigurationError):
            serve_metrics(CountingSource(), gpu=False, loop=loop)
    finally:
        loop.close()


async def test_on_a_loop_stop_from_another_thread() -> None:
    server = serve_metrics(CountingSource(), gpu=False, loop=asyncio.get_running_loop())
    assert (await asyncio.to_thread(get, server.url))[0] == 200
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(0)  # it stops on the loop's next iteration
    assert not server.running
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(server.address)


def test_on_a_loop_stop_after_the_loop_closed() -> None:
    async def start() -> server_module.MetricsServer:
        server = serve_metrics(CountingSource(), gpu=False, loop=asyncio.get_running_loop())
        assert (await asyncio.to_thread(get, server.url))[0] == 200
        return server

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(start())
    loop.close()
    server.stop()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(server.address)


# -- the default port that serve_metrics, top and dashboard agree on ---------------------


def test_default_ports_without_the_environment(monkeypatch) -> None:
    from pydotcompute.cli.top import default_metrics_url
    from pydotcompute.telemetry.server import default_dashboard_port, default_metrics_port

    monkeypatch.delenv("PYDOTCOMPUTE_METRICS_PORT", raising=False)
    monkeypatch.delenv("PYDOTCOMPUTE_DASHBOARD_PORT", raising=False)
    assert default_metrics_port() == 9464
    assert default_dashboard_port() == 9465
    assert default_metrics_url() == "http://127.0.0.1:9464/metrics"
    monkeypatch.setenv("PYDOTCOMPUTE_METRICS_PORT", "ninety")
    with pytest.raises(InvalidConfigurationError, match="PYDOTCOMPUTE_METRICS_PORT"):
        default_metrics_port()


def test_serve_metrics_and_top_agree_on_the_default(monkeypatch) -> None:
    import argparse
    import io

    from rich.console import Console

    from pydotcompute.cli.top import add_top_arguments, run_top

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    monkeypatch.setenv("PYDOTCOMPUTE_METRICS_PORT", str(free))
    source = CountingSource()
    source.processed = 5
    with serve_metrics(source, gpu=False) as server:  # no port given
        assert server.address[1] == free
        parser = argparse.ArgumentParser()
        add_top_arguments(parser)
        args = parser.parse_args(["--once", "-n", "0.05"])  # no URL given
        out = io.StringIO()
        assert run_top(args, console=Console(file=out, width=160)) == 0
    assert "echo" in out.getvalue() and f":{free}/metrics" in out.getvalue()


def test_a_port_in_use_says_how_to_get_another() -> None:
    with serve_metrics(CountingSource(), port=0, gpu=False) as first:
        with pytest.raises(OSError, match="port=0"):
            serve_metrics(CountingSource(), port=first.address[1], gpu=False)
