"""The ``pydotcompute`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="pydotcompute", description="GPU actor runtime: ring kernels on CUDA, CPU and asyncio."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from pydotcompute.cli import dashboard, demo, doctor, top

    demo.register(sub)
    doctor.register(sub)
    top.register(sub)
    dashboard.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pydotcompute`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
