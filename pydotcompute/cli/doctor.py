"""``pydotcompute doctor``: what this machine can run, and why not."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("doctor", help="report versions and which backends can run here")
    p.set_defaults(run=run)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    dists = ("pydotcompute", "numpy", "numba", "numba-cuda", "msgpack", "prometheus-client")
    w = max(map(len, dists)) + 2
    print(f"{'python':<{w}}{platform.python_version()} ({platform.machine()})")
    for dist in dists:
        print(f"{dist:<{w}}{_version(dist)}")
    cupy = next(
        (
            f"{d} {_version(d)}"
            for d in ("cupy-cuda13x", "cupy-cuda12x", "cupy")
            if _version(d) != "not installed"
        ),
        "not installed",
    )
    print(f"{'cupy':<{w}}{cupy}")
    print("backends:")
    print("  host          usable (asyncio)")
    print("  cpu           usable (numba)")
    from pydotcompute.backends.select import cuda_status

    usable, reason = cuda_status()
    print(f"  cuda          {'usable' if usable else 'not usable'}: {reason}")
    return 0
