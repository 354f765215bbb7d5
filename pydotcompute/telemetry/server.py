"""The opt-in metrics server: ``/metrics``, the dashboard page and its JSON feed.

Started only by ``serve_metrics`` (or ``serve_dashboard_proxy``), stopped by
``MetricsServer.stop()``. It answers from one of two places:

* an asyncio event loop, given as ``loop=`` (what ``RingKernelRuntime.serve_metrics``
  does): each scrape runs between the runtime's own callbacks, so a busy loop answers
  promptly and pays only for building the answer;
* otherwise one stdlib HTTP server on one daemon thread; ``stop()`` returns only when
  that thread has ended. Beside a busy event loop such a thread waits a long time for
  the GIL after each socket call (the loop releases it for a moment on every poll
  and takes it straight back), so runtimes serve from their loop instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.resources
import json
import logging
import math
import socket
import threading
import urllib.error
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from pydotcompute.errors import InvalidConfigurationError
from pydotcompute.telemetry.collector import TelemetryCollector, TelemetrySource
from pydotcompute.telemetry.exposition import text_format
from pydotcompute.telemetry.gpu import GpuMonitor
from pydotcompute.telemetry.scrape import fetch_metrics, normalize_metrics_url, parse_metrics

__all__ = ["MetricsServer", "serve_metrics", "serve_dashboard_proxy", "dashboard_html"]

logger = logging.getLogger("pydotcompute.telemetry")

MetricsRenderer = Callable[[str], tuple[bytes, str]]
"""Given the request's Accept header, the ``/metrics`` body and its content type."""

_PLAIN = "text/plain; version=0.0.4; charset=utf-8"
_CLIENT_TIMEOUT_S = 5.0
"""A client that stalls is cut off after this long, so it cannot hold the server."""


def dashboard_html() -> bytes:
    """The dashboard page (self-contained: no external scripts, styles or fonts)."""
    return importlib.resources.files(__package__).joinpath("dashboard.html").read_bytes()


_READS_METRICS = frozenset(("/metrics", "/api/scrape"))


class _Routes:
    """What a request gets, whichever transport carries it.

    ``gpu``, when given, is a monitor whose stale readings a server on an event loop
    refreshes on a worker thread before answering a request that reads the metrics.
    """

    __slots__ = ("render", "page", "gpu")

    def __init__(self, render: MetricsRenderer, gpu: GpuMonitor | None = None) -> None:
        self.render = render
        self.page = dashboard_html()
        self.gpu = gpu

    def respond(self, target: str, accept: str) -> tuple[int, bytes, str]:
        """``(status, body, content type)`` for a GET of ``target``."""
        path = target.split("?", 1)[0]
        try:
            if path == "/metrics":
                body, ctype = self.render(accept)
                return 200, body, ctype
            if path in ("/", "/dashboard"):
                return 200, self.page, "text/html; charset=utf-8"
            if path == "/api/scrape":
                text, _ = self.render("text/plain")
                scrape = parse_metrics(text.decode())
                body = json.dumps(_json_safe(dataclasses.asdict(scrape))).encode()
                return 200, body, "application/json"
            return 404, b"not found\n", "text/plain; charset=utf-8"
        except (urllib.error.URLError, OSError) as exc:
            # Proxy mode: the runtime being watched is not reachable right now.
            return 502, f"metrics source unreachable: {exc}\n".encode(), "text/plain"
        except Exception as exc:  # reported to the client and logged, never hidden
            logger.exception("error serving %s", path)
            return 500, f"{type(exc).__name__}: {exc}\n".encode(), "text/plain"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _CLIENT_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        status, body, ctype = self.server.routes.respond(self.path, self.headers.get("Accept", ""))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("metrics server: " + format, *args)


class _Server(HTTPServer):
    # Requests are answered one at a time on the server's own thread: a thread per
    # request would wait for the GIL once more for every request.
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], routes: _Routes) -> None:
        if ":" in addr[0]:  # an IPv6 address such as "::1"
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)
        self.routes = routes


_MAX_REQUEST_HEAD = 16384


class _LoopConnection(asyncio.Protocol):
    """One HTTP/1.0 exchange on the event loop: read the request head, answer, close."""

    def __init__(self, routes: _Routes, open_connections: set[_LoopConnection]) -> None:
        self._routes = routes
        self._open = open_connections
        self._head: bytearray | None = bytearray()  # None once answered
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._preparing: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._open.add(self)
        self._deadline = asyncio.get_running_loop().call_later(_CLIENT_TIMEOUT_S, transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._open.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()

    def data_received(self, data: bytes) -> None:
        head = self._head
        if head is None:  # answered already: whatever else the client sends is ignored
            return
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > _MAX_REQUEST_HEAD:
                self._answer(431, b"request head too large\n", "text/plain")
            return
        request_line, *header_lines = head[:end].decode("latin-1").split("\r\n")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._answer(400, b"bad request\n", "text/plain")
        elif parts[0] != "GET":
            self._answer(501, f"unsupported method {parts[0]!r}\n".encode(), "text/plain")
        else:
            accept = ""
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "accept":
                    accept = value.strip()
            target = parts[1]
            gpu = self._routes.gpu
            if gpu is not None and gpu.needs_refresh and target.split("?")[0] in _READS_METRICS:
                self._head = None  # answered once the readings are fresh
                self._preparing = asyncio.get_running_loop().create_task(
                    self._answer_refreshed(gpu, target, accept)
                )
            else:
                self._answer(*self._routes.respond(target, accept))

    async def _answer_refreshed(self, gpu: GpuMonitor, target: str, accept: str) -> None:
        try:
            await asyncio.to_thread(gpu.read)
        except Exception as exc:  # reported to the client and logged, never hidden
            logger.exception("error serving %s", target)
            self._answer(500, f"{type(exc).__name__}: {exc}\n".encode(), "text/plain")
        else:
            self._answer(*self._routes.respond(target, accept))

    def abort(self) -> None:
        if self._preparing is not None:
            self._preparing.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _answer(self, status: int, body: bytes, ctype: str) -> None:
        self._head = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        head = (
            f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        )
        transport.write(head.encode("latin-1") + body)
        transport.close()  # after the buffered answer is written


def _json_safe(value: Any) -> Any:
    # JSON has no Infinity: the +Inf bucket bound travels as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class MetricsServer:
    """A running metrics server. ``stop()`` it (or use it as a context manager).

    With ``loop``, requests are answered by that event loop (create the server from
    the loop's thread); otherwise by a daemon thread of the server's own. ``gpu``: a
    monitor the rendered metrics read without refreshing, which a server on a loop
    refreshes on a worker thread when a scrape finds its readings stale.
    """

    def __init__(
        self,
        render: MetricsRenderer,
        port: int = 0,
        addr: str = "127.0.0.1",
        on_stop: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        gpu: GpuMonitor | None = None,
    ) -> None:
        self._on_stop = on_stop
        self._stopped = False
        self._loop = loop
        routes = _Routes(render, gpu)
        if loop is None:
            self._httpd = _Server((addr, port), routes)
            host, bound_port = self._httpd.server_address[:2]
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"pydotcompute-metrics-{bound_port}",
                daemon=True,
            )
            self._thread.start()
        else:
            if _running_loop() is not loop:
                raise InvalidConfigurationError(
                    "a metrics server on an event loop must be started from that loop"
                )
            # Bound here, so the address is known at once; the loop accepts from the
            # next iteration on, and connections wait in the backlog until then.
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            self._sock = socket.create_server((addr, port), family=family)
            host, bound_port = self._sock.getsockname()[:2]
            self._connections: set[_LoopConnection] = set()
            self._serving = loop.create_task(
                loop.create_server(
                    lambda: _LoopConnection(routes, self._connections), sock=self._sock
                ),
                name=f"pydotcompute-metrics-{bound_port}",
            )
        self._address = (str(host), int(bound_port))

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``."""
        return self._address

    @property
    def url(self) -> str:
        """The ``/metrics`` URL."""
        return f"http://{_url_host(self._address[0])}:{self._address[1]}/metrics"

    @property
    def dashboard_url(self) -> str:
        """The dashboard page's URL."""
        return f"http://{_url_host(self._address[0])}:{self._address[1]}/"

    @property
    def running(self) -> bool:
        """True until ``stop()``."""
        return not self._stopped

    def stop(self) -> None:
        """Stop serving and release the port (joining the server's thread, if it has
        one). Called from another thread than its running event loop's, a server on
        that loop stops on the loop's next iteration. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._loop is None:
                self._httpd.shutdown()
                self._httpd.server_close()
                self._thread.join()
            elif self._loop.is_running() and _running_loop() is not self._loop:
                self._loop.call_soon_threadsafe(self._stop_on_loop)
            else:
                self._stop_on_loop()
        finally:
            if self._on_stop is not None:
                self._on_stop()

    def _stop_on_loop(self) -> None:
        serving = self._serving
        if serving.get_loop().is_closed():
            pass  # the loop took its tasks and transports down with it
        elif serving.done() and not serving.cancelled() and serving.exception() is None:
            serving.result().close()  # closes the listening socket now
        else:
            serving.cancel()  # never started: the socket is still ours alone
        self._sock.close()
        for conn in list(self._connections):
            conn.abort()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve_metrics(
    source: TelemetrySource,
    port: int = 0,
    addr: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    *,
    gpu: bool = True,
    loop: asyncio.AbstractEventLoop | None = None,
) -> MetricsServer:
    """Serve ``source``'s telemetry on ``/metrics`` and the dashboard on ``/``.

    The collector is registered in ``registry`` (a fresh one when None, so two
    runtimes never share metrics) and unregistered on ``stop()``; ``/metrics`` serves
    the whole registry, so a caller's own metrics appear beside ours. ``gpu`` adds NVML
    readings where available. ``port=0`` picks a free port: read it from ``.address``.
    ``loop`` answers requests on that event loop (call this from its thread), as a
    runtime does with its own, and opens NVML right away; None answers them on a thread
    of the server's own.
    """
    monitor = GpuMonitor() if gpu else None
    # On a loop, NVML readings (PCIe throughput is sampled for 20 ms per device and
    # direction) are refreshed on a worker thread when a scrape finds them stale, never
    # on the loop. NVML is opened here, once, so that where it is unavailable no scrape
    # ever hands over to a worker (which, beside a busy loop, waits long for the GIL).
    on_loop = loop is not None and monitor is not None
    if on_loop and monitor is not None:
        monitor.available  # noqa: B018 - opens NVML, or learns why it cannot
    collector = TelemetryCollector(source, gpu=monitor, refresh_gpu=not on_loop)
    own = registry is None  # then it holds our collector alone
    registry = CollectorRegistry() if registry is None else registry
    registry.register(collector)

    def render(accept: str) -> tuple[bytes, str]:
        encoder, ctype = choose_encoder(accept)
        fmt = text_format(encoder) if own else None
        body = collector.write_text(fmt == "openmetrics") if fmt is not None else None
        return (encoder(registry) if body is None else body), ctype

    def release() -> None:
        registry.unregister(collector)
        if monitor is not None:
            monitor.close()

    try:
        return MetricsServer(
            render, port, addr, on_stop=release, loop=loop, gpu=monitor if on_loop else None
        )
    except BaseException:
        release()
        raise


def serve_dashboard_proxy(
    metrics_url: str, port: int = 0, addr: str = "127.0.0.1", timeout: float = 5.0
) -> MetricsServer:
    """Serve the dashboard for another process' ``/metrics`` (read on each request)."""
    url = normalize_metrics_url(metrics_url)

    def render(accept: str) -> tuple[bytes, str]:
        return fetch_metrics(url, timeout).encode(), _PLAIN

    return MetricsServer(render, port, addr)
