"""``pydotcompute dashboard [URL]``: the web dashboard for any runtime's ``/metrics``.

Serves the dashboard page locally and reads the given ``/metrics`` URL on each of the
page's requests, so the watched runtime needs nothing but its metrics endpoint.
"""

from __future__ import annotations

import argparse
import sys
import threading
import webbrowser
from typing import Any

from rich.console import Console

from pydotcompute.cli.top import DEFAULT_METRICS_URL
from pydotcompute.telemetry.scrape import normalize_metrics_url
from pydotcompute.telemetry.server import serve_dashboard_proxy

__all__ = ["register", "add_dashboard_arguments", "run_dashboard"]


def register(sub: Any) -> None:
    """Add the ``dashboard`` subcommand to the ``pydotcompute`` command's subparsers."""
    p = sub.add_parser("dashboard", help="web dashboard for a runtime's /metrics")
    add_dashboard_arguments(p)
    p.set_defaults(run=run_dashboard)


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``dashboard``'s arguments to a (sub)parser."""
    parser.add_argument(
        "url",
        nargs="?",
        default=DEFAULT_METRICS_URL,
        help=f"the runtime's /metrics URL, or host:port (default {DEFAULT_METRICS_URL})",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port to serve the page on (default: any free one)"
    )
    parser.add_argument(
        "--addr", default="127.0.0.1", help="address to serve the page on (default 127.0.0.1)"
    )
    parser.add_argument("--open", action="store_true", help="open the page in a web browser")


def run_dashboard(
    args: argparse.Namespace,
    *,
    console: Console | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serve the dashboard until Ctrl-C (or until ``stop`` is set); returns the exit status."""
    console = console or Console()
    url = normalize_metrics_url(args.url)
    try:
        server = serve_dashboard_proxy(url, port=args.port, addr=args.addr)
    except OSError as exc:
        console.print(f"[red]cannot serve on {args.addr}:{args.port}: {exc}[/red]")
        return 1
    stop = stop or threading.Event()
    try:  # Ctrl-C at any moment from here on is the normal way out
        with server:
            console.print(
                f"dashboard for {url} at [bold]{server.dashboard_url}[/bold] (Ctrl-C stops)"
            )
            if args.open:
                webbrowser.open(server.dashboard_url)
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``dashboard`` as its own program (``python -m pydotcompute.cli.dashboard``)."""
    parser = argparse.ArgumentParser(prog="pydotcompute dashboard", description=__doc__)
    add_dashboard_arguments(parser)
    return run_dashboard(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
