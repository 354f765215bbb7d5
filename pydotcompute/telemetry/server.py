"""The opt-in metrics server: ``/metrics``, the dashboard page and its JSON feeds.

Started only by ``serve_metrics`` (or ``serve_dashboard_proxy``), stopped by
``MetricsServer.stop()``. Besides ``/metrics`` and the page it answers
``/api/scrape`` (the metrics as JSON), ``/api/history`` (the samples the server keeps,
see ``MetricsHistory``), and, when the layers above give it ``DashboardViews``, the
drill-down pages' ``/api/view/...`` and their actions, ``POST /api/action/...``.

Actions change state, so they are refused unless the server was started with
``actions=True``, and each must carry the server's token (made per process, handed to
the page by ``/api/info``) in an ``X-PyDotCompute-Token`` header: another site's page
cannot send that header without the browser asking first, which this server never
allows. On a loopback address every request for the token, a view or an action must also
name a loopback host (``Host:``), so a page that rebinds its own name to 127.0.0.1
cannot read them.

It answers from one of two places:

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
import concurrent.futures
import dataclasses
import errno
import hmac
import importlib.resources
import inspect
import json
import logging
import math
import os
import secrets
import socket
import threading
import urllib.error
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from pydotcompute.errors import InvalidConfigurationError, PyDotComputeError
from pydotcompute.telemetry.collector import TelemetryCollector, TelemetrySource
from pydotcompute.telemetry.exposition import text_format
from pydotcompute.telemetry.gpu import GpuMonitor
from pydotcompute.telemetry.history import HISTORY_INTERVAL_S, HISTORY_SIZE, MetricsHistory
from pydotcompute.telemetry.scrape import (
    Scrape,
    fetch_metrics,
    normalize_metrics_url,
    parse_metrics,
    scrape_source,
)

__all__ = [
    "DEFAULT_DASHBOARD_PORT",
    "DEFAULT_METRICS_PORT",
    "DashboardViews",
    "MetricsServer",
    "dashboard_html",
    "default_dashboard_port",
    "default_metrics_port",
    "serve_dashboard_proxy",
    "serve_metrics",
]

DEFAULT_METRICS_PORT = 9464
"""Where ``serve_metrics`` listens, and ``top`` and ``dashboard`` look, by default."""
DEFAULT_DASHBOARD_PORT = 9465
"""Where ``pydotcompute dashboard`` serves its page by default (it watches 9464)."""
METRICS_PORT_ENV = "PYDOTCOMPUTE_METRICS_PORT"
DASHBOARD_PORT_ENV = "PYDOTCOMPUTE_DASHBOARD_PORT"


def _port_from(env: str, default: int) -> int:
    value = os.environ.get(env)
    if value is None or not value.strip():
        return default
    try:
        port = int(value)
    except ValueError:
        raise InvalidConfigurationError(f"{env} must be a port number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise InvalidConfigurationError(f"{env} must be a port number, got {value!r}")
    return port


def default_metrics_port() -> int:
    """The metrics port everything agrees on: ``PYDOTCOMPUTE_METRICS_PORT`` when set
    (0: any free port), else 9464."""
    return _port_from(METRICS_PORT_ENV, DEFAULT_METRICS_PORT)


def default_dashboard_port() -> int:
    """The dashboard command's page port: ``PYDOTCOMPUTE_DASHBOARD_PORT``, else 9465."""
    return _port_from(DASHBOARD_PORT_ENV, DEFAULT_DASHBOARD_PORT)


class DashboardViews(Protocol):
    """The drill-down pages' data and actions, given to the server by the layers above
    telemetry (a runtime's kernels, flows and workflows; a journal's).

    ``get(what, query)`` answers ``GET /api/view/<what>?...`` and ``act(what, form)``
    answers ``POST /api/action/<what>`` (``form``: the JSON body). Each returns a
    JSON-ready value, or an awaitable of one that runs on ``loop`` (on any loop when
    ``loop`` is None). ``LookupError`` answers 404; ``ValueError`` and pydotcompute's
    errors 400, with their text.
    """

    loop: asyncio.AbstractEventLoop | None

    def info(self) -> dict[str, Any]: ...

    def get(self, what: str, query: Mapping[str, str]) -> Any: ...

    def act(self, what: str, form: Mapping[str, Any]) -> Any: ...


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
_MAX_BODY = 65536
_ACTION_TIMEOUT_S = 60.0  # a view or action the runtime's loop does not answer in time
_TOKEN_HEADER = "x-pydotcompute-token"
_LOOPBACK_NAMES = frozenset(("127.0.0.1", "localhost", "::1"))
_JSON = "application/json"
Response = tuple[int, bytes, str]


@dataclasses.dataclass
class _Request:
    method: str
    target: str
    headers: dict[str, str]  # names in lower case
    body: bytes = b""

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.target).query))


def _json(status: int, value: Any) -> Response:
    return status, json.dumps(_json_safe(value)).encode(), _JSON


def _error(status: int, text: str) -> Response:
    return _json(status, {"error": text})


def _is_loopback(addr: str) -> bool:
    return addr in _LOOPBACK_NAMES or addr.startswith("127.")


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Routes:
    """What a request gets, whichever transport carries it.

    ``gpu``, when given, is a monitor whose stale readings a server on an event loop
    refreshes on a worker thread before answering a request that reads the metrics.
    """

    __slots__ = ("render", "page", "gpu", "history", "views", "actions", "token", "loopback")

    def __init__(
        self,
        render: MetricsRenderer,
        gpu: GpuMonitor | None = None,
        *,
        history: MetricsHistory | None = None,
        views: DashboardViews | None = None,
        actions: bool = False,
        loopback: bool = True,
    ) -> None:
        self.render = render
        self.page = dashboard_html()
        self.gpu = gpu
        self.history = history
        self.views = views
        self.actions = actions
        self.token = secrets.token_urlsafe(24)
        self.loopback = loopback

    def scrape(self) -> Scrape:
        """The metrics as a ``Scrape``, read now."""
        text, _ = self.render("text/plain")
        return parse_metrics(text.decode())

    def respond(self, req: _Request) -> Response | Awaitable[Response]:
        """The answer to ``req``, or an awaitable of it (a view or an action that runs
        on the views' loop)."""
        path = req.path
        try:
            if req.method == "POST":
                if not path.startswith("/api/action/"):
                    return 405, b"only GET here\n", "text/plain; charset=utf-8"
                return self._act(req, path[len("/api/action/") :])
            if path == "/metrics":
                body, ctype = self.render(req.headers.get("accept", ""))
                return 200, body, ctype
            if path in ("/", "/dashboard"):
                return 200, self.page, "text/html; charset=utf-8"
            if path == "/api/scrape":
                return _json(200, dataclasses.asdict(self.scrape()))
            if path == "/api/history":
                if self.history is None:
                    return _error(404, "this server keeps no history")
                since = req.query.get("since")
                return _json(200, self.history.as_json(float(since) if since else None))
            if path == "/api/info":
                refused = self._check_host(req)
                if refused is not None:
                    return refused
                return _json(200, self._info())
            if path.startswith("/api/view/"):
                refused = self._check_host(req)
                if refused is not None:
                    return refused
                if self.views is None:
                    return _error(404, "this server has no runtime or journal to show")
                return self._answer_of(lambda: self.views.get(path[10:], req.query))  # type: ignore[union-attr]
            return 404, b"not found\n", "text/plain; charset=utf-8"
        except (urllib.error.URLError, OSError) as exc:
            # Proxy mode: the runtime being watched is not reachable right now.
            return 502, f"metrics source unreachable: {exc}\n".encode(), "text/plain"
        except ValueError as exc:  # a malformed query (since=abc)
            return _error(400, str(exc))
        except Exception as exc:  # reported to the client and logged, never hidden
            logger.exception("error serving %s", path)
            return 500, f"{type(exc).__name__}: {exc}\n".encode(), "text/plain"

    def _info(self) -> dict[str, Any]:
        return {
            "actions": self.actions,
            "token": self.token if self.actions else None,
            "history": None
            if self.history is None
            else {"interval": self.history.interval, "size": self.history.size},
            "views": None if self.views is None else self.views.info(),
        }

    def _check_host(self, req: _Request) -> Response | None:
        if not self.loopback:
            return None  # bound beyond loopback on purpose: the token still guards actions
        host = _host_name(req.headers.get("host", ""))
        if host not in _LOOPBACK_NAMES and not host.startswith("127."):
            return _error(403, f"refused: this server answers loopback names, not {host!r}")
        origin = req.headers.get("origin")
        if origin is not None and origin != "null":
            if _host_name(urllib.parse.urlsplit(origin).netloc) != host:
                return _error(403, "refused: the request comes from another site's page")
        return None

    def _act(self, req: _Request, what: str) -> Response | Awaitable[Response]:
        refused = self._check_host(req)
        if refused is not None:
            return refused
        if not self.actions:
            return _error(
                403,
                "actions are off: start the dashboard with actions enabled "
                "(pydotcompute dashboard --actions, or serve_metrics(..., actions=True))",
            )
        if not hmac.compare_digest(req.headers.get(_TOKEN_HEADER, ""), self.token):
            return _error(403, "refused: the request does not carry this server's token")
        if self.views is None:
            return _error(404, "this server has no runtime or journal to act on")
        try:
            form = json.loads(req.body or b"{}")
        except ValueError:
            return _error(400, "the body must be JSON")
        if not isinstance(form, dict):
            return _error(400, "the body must be a JSON object")
        views = self.views
        return self._answer_of(lambda: views.act(what, form))

    def _answer_of(self, call: Callable[[], Any]) -> Response | Awaitable[Response]:
        try:
            result = call()
        except Exception as exc:
            return _view_error(exc)
        if not inspect.isawaitable(result):
            return _json(200, result)

        async def finish() -> Response:
            try:
                return _json(200, await result)
            except Exception as exc:
                return _view_error(exc)

        return finish()

    def run(self, answer: Awaitable[Response]) -> Response:
        """Wait for an awaitable answer from a thread: on the views' loop, else on a
        loop of its own."""
        loop = self.views.loop if self.views is not None else None
        if loop is not None and loop.is_running():
            future: concurrent.futures.Future[Response] = asyncio.run_coroutine_threadsafe(
                answer,  # type: ignore[arg-type]
                loop,
            )
            try:
                return future.result(timeout=_ACTION_TIMEOUT_S)
            except concurrent.futures.TimeoutError:
                future.cancel()
                return _error(504, f"no answer from the runtime within {_ACTION_TIMEOUT_S:g} s")
        return asyncio.run(answer)  # type: ignore[arg-type]


def _view_error(exc: BaseException) -> Response:
    if isinstance(exc, LookupError):
        return _error(404, str(exc.args[0]) if exc.args else repr(exc))
    if isinstance(exc, (ValueError, TypeError, PyDotComputeError)):
        return _error(400, str(exc))
    logger.error("dashboard view failed", exc_info=exc)
    return _error(500, f"{type(exc).__name__}: {exc}")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _CLIENT_TIMEOUT_S

    def _serve(self, method: str) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = b""
        if method == "POST":
            length = int(headers.get("content-length") or 0)
            if length > _MAX_BODY:
                self._send(*_error(413, f"at most {_MAX_BODY} bytes"))
                return
            body = self.rfile.read(length)
        routes = self.server.routes
        answer = routes.respond(_Request(method, self.path, headers, body))
        if not isinstance(answer, tuple):
            answer = routes.run(answer)
        self._send(*answer)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self._serve("POST")

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
            return
        if parts[0] not in ("GET", "POST"):
            self._answer(501, f"unsupported method {parts[0]!r}\n".encode(), "text/plain")
            return
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        if parts[0] == "POST":
            try:
                length = int(headers.get("content-length") or 0)
            except ValueError:
                self._answer(400, b"bad Content-Length\n", "text/plain")
                return
            if length > _MAX_BODY:
                self._answer(*_error(413, f"at most {_MAX_BODY} bytes"))
                return
            body = bytes(head[end + 4 : end + 4 + length])
            if len(body) < length:
                return  # the rest of the body is still on its way
        req = _Request(parts[0], parts[1], headers, body)
        gpu = self._routes.gpu
        if gpu is not None and gpu.needs_refresh and req.path in _READS_METRICS:
            self._head = None  # answered once the readings are fresh
            self._preparing = asyncio.get_running_loop().create_task(
                self._answer_refreshed(gpu, req)
            )
            return
        answer = self._routes.respond(req)
        if isinstance(answer, tuple):
            self._answer(*answer)
        else:
            self._head = None
            self._preparing = asyncio.get_running_loop().create_task(self._answer_later(answer))

    async def _answer_later(self, answer: Awaitable[Response]) -> None:
        self._answer(*(await answer))

    async def _answer_refreshed(self, gpu: GpuMonitor, req: _Request) -> None:
        try:
            await asyncio.to_thread(gpu.read)
        except Exception as exc:  # reported to the client and logged, never hidden
            logger.exception("error serving %s", req.path)
            self._answer(500, f"{type(exc).__name__}: {exc}\n".encode(), "text/plain")
        else:
            answer = self._routes.respond(req)
            self._answer(*(answer if isinstance(answer, tuple) else await answer))

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
    refreshes on a worker thread when a scrape finds its readings stale. ``history``:
    samples taken every ``history.interval`` seconds (on the loop, or on a thread of the
    server's own) for ``/api/history``. ``views`` and ``actions``: see
    ``DashboardViews``.
    """

    def __init__(
        self,
        render: MetricsRenderer,
        port: int = 0,
        addr: str = "127.0.0.1",
        on_stop: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        gpu: GpuMonitor | None = None,
        *,
        history: MetricsHistory | None = None,
        sample: Callable[[], Scrape] | None = None,
        views: DashboardViews | None = None,
        actions: bool = False,
    ) -> None:
        self._on_stop = on_stop
        self._stopped = False
        self._loop = loop
        self.history = history
        self._routes = routes = _Routes(
            render, gpu, history=history, views=views, actions=actions, loopback=_is_loopback(addr)
        )
        self._sample = sample or routes.scrape
        self._sampler: threading.Thread | None = None
        self._sampling: asyncio.Task[None] | None = None
        self._stop_sampling = threading.Event()
        try:
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
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(
                    errno.EADDRINUSE,
                    f"port {port} on {addr} is in use (another runtime serving its "
                    "metrics?): pass port=0 for any free port, or choose another",
                ) from exc
            raise
        self._address = (str(host), int(bound_port))
        if history is not None:
            self._start_history(history, gpu)

    def _start_history(self, history: MetricsHistory, gpu: GpuMonitor | None) -> None:
        if self._loop is None:
            self._sampler = threading.Thread(
                target=self._sample_on_thread,
                args=(history,),
                name=f"pydotcompute-history-{self._address[1]}",
                daemon=True,
            )
            self._sampler.start()
        else:
            self._sampling = self._loop.create_task(
                self._sample_on_loop(history, gpu),
                name=f"pydotcompute-history-{self._address[1]}",
            )

    def _take_sample(self, history: MetricsHistory, failing: list[bool]) -> None:
        try:
            history.add(self._sample())
        except Exception as exc:  # the source (or the watched endpoint) is down: a gap
            if not failing[0]:
                logger.warning("metrics history: cannot read the metrics (%r); retrying", exc)
            failing[0] = True
        else:
            failing[0] = False

    def _sample_on_thread(self, history: MetricsHistory) -> None:
        failing = [False]
        self._take_sample(history, failing)
        while not self._stop_sampling.wait(history.interval):
            self._take_sample(history, failing)

    async def _sample_on_loop(self, history: MetricsHistory, gpu: GpuMonitor | None) -> None:
        failing = [False]
        while True:
            if gpu is not None and gpu.needs_refresh:
                await asyncio.to_thread(gpu.read)  # NVML waits 20 ms per PCIe reading
            self._take_sample(history, failing)
            await asyncio.sleep(history.interval)

    @property
    def token(self) -> str:
        """The token a request for an action must carry (``X-PyDotCompute-Token``)."""
        return self._routes.token

    @property
    def actions(self) -> bool:
        """Whether this server takes actions (``POST /api/action/...``)."""
        return self._routes.actions

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        acts = ", actions on" if self.actions else ""
        return f"<MetricsServer {self.dashboard_url} {state}{acts}>"

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
        """Stop serving and release the port (joining the server's threads, if it has
        any). Called from another thread than its running event loop's, a server on
        that loop stops on the loop's next iteration. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._stop_sampling.set()
            if self._sampler is not None:
                self._sampler.join()
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
        if self._sampling is not None and not self._sampling.get_loop().is_closed():
            self._sampling.cancel()
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


def _history(interval: float | None, size: int) -> MetricsHistory | None:
    return None if interval is None else MetricsHistory(size=size, interval=interval)


def serve_metrics(
    source: TelemetrySource,
    port: int | None = None,
    addr: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    *,
    gpu: bool = True,
    loop: asyncio.AbstractEventLoop | None = None,
    history_interval: float | None = HISTORY_INTERVAL_S,
    history_size: int = HISTORY_SIZE,
    views: DashboardViews | None = None,
    actions: bool = False,
) -> MetricsServer:
    """Serve ``source``'s telemetry on ``/metrics`` and the dashboard on ``/``.

    ``port``: by default 9464 (``PYDOTCOMPUTE_METRICS_PORT`` overrides), where ``top``
    and ``dashboard`` look; 0 picks a free port: read it from ``.address``. ``addr``:
    loopback unless you choose otherwise. The collector is registered in ``registry``
    (a fresh one when None, so two runtimes never share metrics) and unregistered on
    ``stop()``; ``/metrics`` serves the whole registry, so a caller's own metrics
    appear beside ours. ``gpu`` adds NVML readings where available. ``loop`` answers
    requests on that event loop (call this from its thread), as a runtime does with its
    own, and opens NVML right away; None answers them on a thread of the server's own.

    The server keeps ``history_size`` samples, one every ``history_interval`` seconds
    (an hour at 1 s by default; None keeps none), which the dashboard charts. ``views``
    add the drill-down pages; ``actions=True`` lets their buttons change state (see
    ``DashboardViews``).
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

    def sample() -> Scrape:
        # Straight from the snapshots: parsing the text back would cost about 30x more
        # (benchmarks/dashboard_history.py). On a loop, the server refreshes NVML's
        # readings on a worker thread before sampling; on a thread, it is done here.
        if monitor is not None and not on_loop:
            monitor.read()
        return scrape_source(source, monitor)

    try:
        return MetricsServer(
            render,
            default_metrics_port() if port is None else port,
            addr,
            on_stop=release,
            loop=loop,
            gpu=monitor if on_loop else None,
            history=_history(history_interval, history_size),
            sample=sample,
            views=views,
            actions=actions,
        )
    except BaseException:
        release()
        raise


def serve_dashboard_proxy(
    metrics_url: str,
    port: int | None = None,
    addr: str = "127.0.0.1",
    timeout: float = 5.0,
    *,
    history_interval: float | None = HISTORY_INTERVAL_S,
    history_size: int = HISTORY_SIZE,
    views: DashboardViews | None = None,
    actions: bool = False,
) -> MetricsServer:
    """Serve the dashboard for another process' ``/metrics`` (read on each request, and
    every ``history_interval`` seconds for the history). ``port``: by default 9465
    (``PYDOTCOMPUTE_DASHBOARD_PORT`` overrides; 0: any free port). ``views``: e.g. a
    journal's, for the flow, workflow and task pages."""
    url = normalize_metrics_url(metrics_url)

    def render(accept: str) -> tuple[bytes, str]:
        return fetch_metrics(url, timeout).encode(), _PLAIN

    return MetricsServer(
        render,
        default_dashboard_port() if port is None else port,
        addr,
        history=_history(history_interval, history_size),
        views=views,
        actions=actions,
    )
