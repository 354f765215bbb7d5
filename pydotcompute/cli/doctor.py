"""``pydotcompute doctor``: what this machine can run, and why not."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "doctor", help="report versions, which backends can run here and the optional pieces"
    )
    p.set_defaults(run=run)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _optional(dist: str, what: str, extra: str) -> str:
    version = _version(dist)
    if version == "not installed":
        return f'not installed: {what} needs it (pip install "pydotcompute[{extra}]")'
    return f"{version} ({what})"


def _nvml() -> str:
    from pydotcompute.telemetry.gpu import GpuMonitor

    monitor = GpuMonitor()
    try:
        if not monitor.available:
            return f"not usable: {monitor.unavailable_reason} (no GPU readings in telemetry)"
        gpus = monitor.read()
        return f"usable, {len(gpus)} GPU(s) (GPU readings in telemetry and the dashboard)"
    finally:
        monitor.close()


def _chromium() -> str:
    path = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    if path is None:
        return "not found (only the dashboard's browser tests need it: apt-get install chromium)"
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=20, check=False
        )
        version = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else path
    except (OSError, subprocess.TimeoutExpired) as exc:
        version = f"{path} (does not start: {exc})"
    return f"{version} (the dashboard's browser tests)"


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
    print("optional:")
    print(f"  {'ray':<12}{_optional('ray', 'kernels on a Ray cluster', 'ray')}")
    print(f"  {'psycopg':<12}{_optional('psycopg', 'PostgreSQL journals', 'postgres')}")
    print(f"  {'NVML':<12}{_nvml()}")
    print(f"  {'chromium':<12}{_chromium()}")
    print("backends:")
    print("  host          usable (asyncio)")
    print("  cpu           usable (numba)")
    from pydotcompute.backends.registry import cuda_status
    from pydotcompute.device.probe import LAZY_LOADING_HAZARD

    asked = os.environ.get("CUDA_MODULE_LOADING")
    usable, reason = cuda_status()
    print(f"  cuda          {'usable' if usable else 'not usable'}: {reason}")
    mode = os.environ.get("CUDA_MODULE_LOADING")
    if asked is not None:
        loading = f"{asked} (set in the environment)"
    elif mode is not None:
        loading = f"{mode} (asked for by pydotcompute before CUDA starts)"
    else:
        loading = "CUDA's default (not set; CUDA is not used here)"
    print(f"CUDA module loading: {loading}")
    if (mode or "").upper() == "LAZY":
        print(f"  warning: {LAZY_LOADING_HAZARD}")
    return 0
