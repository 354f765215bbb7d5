"""The opt-in metrics server: ``/metrics``, the dashboard page and its JSON feed.

One stdlib HTTP server on one daemon thread, started only by ``serve_metrics`` (or
``serve_dashboard_proxy``) and stopped by ``MetricsServer.stop()``, which returns only
when that thread has ended.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import math
import socket
import threading
import urllib.error
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from pydotcompute.telemetry.collector import TelemetryCollector, TelemetrySource
from pydotcompute.telemetry.gpu import GpuMonitor
from pydotcompute.telemetry.scrape import fetch_metrics, normalize_metrics_url, parse_metrics

__all__ = ["MetricsServer", "serve_metrics", "serve_dashboard_proxy", "dashboard_html"]

logger = logging.getLogger("pydotcompute.telemetry")

MetricsRenderer = Callable[[str], tuple[bytes, str]]
"""Given the request's Accept header, the ``/metrics`` body and its content type."""

_PLAIN = "text/plain; version=0.0.4; charset=utf-8"


def dashboard_html() -> bytes:
    """The dashboard page (self-contained: no external scripts, styles or fonts)."""
    return importlib.resources.files(__package__).joinpath("dashboard.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # A client that stalls cannot hold the server (and so ``stop()``) for long.
    timeout = 5.0

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                body, ctype = self.server.render(self.headers.get("Accept", ""))
                self._reply(200, body, ctype)
            elif path in ("/", "/dashboard"):
                self._reply(200, self.server.page, "text/html; charset=utf-8")
            elif path == "/api/scrape":
                text, _ = self.server.render("text/plain")
                scrape = parse_metrics(text.decode())
                body = json.dumps(_json_safe(dataclasses.asdict(scrape))).encode()
                self._reply(200, body, "application/json")
            else:
                self._reply(404, b"not found\n", "text/plain; charset=utf-8")
        except (urllib.error.URLError, OSError) as exc:
            # Proxy mode: the runtime being watched is not reachable right now.
            self._reply(502, f"metrics source unreachable: {exc}\n".encode(), "text/plain")
        except Exception as exc:  # reported to the client and logged, never hidden
            logger.exception("error serving %s", path)
            self._reply(500, f"{type(exc).__name__}: {exc}\n".encode(), "text/plain")

    def _reply(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("metrics server: " + format, *args)


class _Server(HTTPServer):
    # Requests are answered one at a time on the server's own thread. A thread per
    # request would cost more than the answer: a busy event loop holds the GIL, and
    # every hand-over to a newly started thread waits out the interpreter's switch
    # interval (a scrape took ~100 ms that way, against ~4 ms here).
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], render: MetricsRenderer) -> None:
        if ":" in addr[0]:  # an IPv6 address such as "::1"
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)
        self.render = render
        self.page = dashboard_html()


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
    """A running metrics server. ``stop()`` it (or use it as a context manager)."""

    def __init__(
        self,
        render: MetricsRenderer,
        port: int = 0,
        addr: str = "127.0.0.1",
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self._on_stop = on_stop
        self._httpd = _Server((addr, port), render)
        host, bound_port = self._httpd.server_address[:2]
        self._address = (str(host), int(bound_port))
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"pydotcompute-metrics-{bound_port}",
            daemon=True,
        )
        self._thread.start()
        self._stopped = False

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
        """Stop serving, join the server's thread and release the port. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
        finally:
            if self._on_stop is not None:
                self._on_stop()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve_metrics(
    source: TelemetrySource,
    port: int = 0,
    addr: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    *,
    gpu: bool = True,
) -> MetricsServer:
    """Serve ``source``'s telemetry on ``/metrics`` and the dashboard on ``/``.

    The collector is registered in ``registry`` (a fresh one when None, so two
    runtimes never share metrics) and unregistered on ``stop()``; ``/metrics`` serves
    the whole registry, so a caller's own metrics appear beside ours. ``gpu`` adds NVML
    readings where available. ``port=0`` picks a free port: read it from ``.address``.
    """
    monitor = GpuMonitor() if gpu else None
    collector = TelemetryCollector(source, gpu=monitor)
    registry = CollectorRegistry() if registry is None else registry
    registry.register(collector)

    def render(accept: str) -> tuple[bytes, str]:
        encoder, ctype = choose_encoder(accept)
        return encoder(registry), ctype

    def release() -> None:
        registry.unregister(collector)
        if monitor is not None:
            monitor.close()

    try:
        return MetricsServer(render, port, addr, on_stop=release)
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
