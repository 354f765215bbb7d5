"""The ``pydotcompute`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="pydotcompute", description="GPU actor runtime: ring kernels on CUDA, CPU and asyncio."
    )
    parser.add_argument("--version", action="version", version=f"pydotcompute {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from pydotcompute.cli import dashboard, demo, doctor, journal, top

    demo.register(sub)
    doctor.register(sub)
    top.register(sub)
    dashboard.register(sub)
    journal.register(sub)
    return parser


def _version() -> str:
    from pydotcompute import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pydotcompute`` console script."""
    from pydotcompute.device.probe import ask_for_eager_module_loading

    # Before any command can initialise CUDA: kernels must load eagerly to run
    # beside a resident ring kernel (probe.LAZY_LOADING_HAZARD).
    ask_for_eager_module_loading()
    args = build_parser().parse_args(argv)
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`pydotcompute doctor | head`): not an error of ours.
        # Point stdout at devnull so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
