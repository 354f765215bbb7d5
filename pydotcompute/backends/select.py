"""Which backend a compiled kernel runs on: ``auto`` means cuda when usable, else cpu."""

from __future__ import annotations

__all__ = ["cuda_status", "resolve_backend"]


def cuda_status() -> tuple[bool, str]:
    """Whether the cuda backend can run here, and why (not). Probes lazily."""
    try:
        from pydotcompute.backends.probe import probe_cuda
    except ImportError as exc:  # pragma: no cover - the probe ships with the package
        return False, f"the CUDA probe is unavailable: {exc}"
    status = probe_cuda()
    return bool(status.usable), status.reason


def resolve_backend(backend: str) -> str:
    """``auto`` → ``cuda`` when a GPU is usable, else ``cpu``; others unchanged."""
    if backend != "auto":
        return backend
    usable, _ = cuda_status()
    return "cuda" if usable else "cpu"
