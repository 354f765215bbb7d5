"""Shared test configuration."""

from __future__ import annotations

import pytest


def _cuda_usable() -> bool:
    try:
        from numba import cuda

        return (
            bool(cuda.is_available())
            and not getattr(cuda, "simulator", None)
            and (__import__("os").environ.get("NUMBA_ENABLE_CUDASIM") != "1")
        )
    except Exception:  # no numba-cuda driver bindings at all: no GPU
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("gpu") for item in items) and not _cuda_usable():
        skip = pytest.mark.skip(reason="needs a usable CUDA GPU; none is present here")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)
