"""``pydotcompute dashboard [URL]``: the web dashboard for any runtime's ``/metrics``.

Serves the dashboard page locally and reads the given ``/metrics`` URL on each of the
page's requests (and once a second for its history), so the watched runtime needs
nothing but its metrics endpoint. With ``--journal`` it also shows that journal's flows,
dead letters, workflows and pending tasks; with ``--actions`` its retry buttons and
answer forms work.
"""

from __future__ import annotations

import argparse
import sys
import threading
import webbrowser
from typing import Any

from rich.console import Console

from pydotcompute.cli.top import default_metrics_url
from pydotcompute.errors import PyDotComputeError
from pydotcompute.telemetry.scrape import normalize_metrics_url
from pydotcompute.telemetry.server import default_dashboard_port, serve_dashboard_proxy

__all__ = ["register", "add_dashboard_arguments", "run_dashboard"]


def register(sub: Any) -> None:
    """Add the ``dashboard`` subcommand to the ``pydotcompute`` command's subparsers."""
    p = sub.add_parser(
        "dashboard",
        help="web dashboard for a runtime's /metrics (and a journal's flows and workflows)",
        epilog="example:\n  pydotcompute dashboard 127.0.0.1:9464 --journal app.db --actions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dashboard_arguments(p)
    p.set_defaults(run=run_dashboard)


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``dashboard``'s arguments to a (sub)parser."""
    url = default_metrics_url()
    parser.add_argument(
        "url",
        nargs="?",
        default=url,
        help=f"the runtime's /metrics URL, or host:port (default {url})",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"port to serve the page on (default {default_dashboard_port()}; 0: any free one)",
    )
    parser.add_argument(
        "--addr", default="127.0.0.1", help="address to serve the page on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--journal",
        metavar="JOURNAL",
        help="also show this journal's flows, dead letters, workflows and tasks "
        "(an SQLite path or a postgresql:// DSN)",
    )
    parser.add_argument(
        "--actions",
        action="store_true",
        help="let the page retry dead letters and answer tasks (off by default)",
    )
    parser.add_argument(
        "--history-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between the history's samples (default 1; it keeps 3600)",
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
    views = None
    try:
        if args.journal:
            from pydotcompute.cli.dashboard_views import JournalViews

            views = JournalViews(args.journal)
        server = serve_dashboard_proxy(
            url,
            port=args.port,
            addr=args.addr,
            views=views,
            actions=args.actions,
            history_interval=args.history_interval,
        )
    except PyDotComputeError as exc:
        console.print(f"[red]error: {exc}[/red]")
        return 1
    except OSError as exc:
        console.print(f"[red]cannot serve on {args.addr}: {exc}[/red]")
        if views is not None:
            views.close()
        return 1
    stop = stop or threading.Event()
    try:  # Ctrl-C at any moment from here on is the normal way out
        with server:
            extra = f" and journal {views.journal.where}" if views is not None else ""
            acts = "actions on" if args.actions else "read-only"
            console.print(
                f"dashboard for {url}{extra} at [bold]{server.dashboard_url}[/bold] "
                f"({acts}; Ctrl-C stops)"
            )
            if args.open:
                webbrowser.open(server.dashboard_url)
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        if views is not None:
            views.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``dashboard`` as its own program (``python -m pydotcompute.cli.dashboard``)."""
    parser = argparse.ArgumentParser(prog="pydotcompute dashboard", description=__doc__)
    add_dashboard_arguments(parser)
    return run_dashboard(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
