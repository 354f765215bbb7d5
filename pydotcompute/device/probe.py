"""Whether a CUDA GPU is usable here, and if not, why not.

Nothing is probed at import. ``probe_cuda()`` runs the checks in order and stops
at the first one that fails, so the reason names the first thing to fix:

1. numba-cuda is not in simulator mode (``NUMBA_ENABLE_CUDASIM=1`` is reported as
   the simulator, never as a GPU);
2. CuPy imports (and which wheel provides it);
3. a CUDA driver is loaded and new enough for CuPy's CUDA runtime;
4. at least one device is visible;
5. a device has compute capability 7.0 or newer (the persistent loops use
   ``nanosleep`` and system-scope atomics);
6. numba-cuda can use the driver, sees the devices and finds libNVVM.

Before the first check that initialises CUDA, ``probe_cuda()`` sets
``CUDA_MODULE_LOADING=EAGER`` unless the variable is already set: with CUDA's default,
lazy loading, the first launch of any other kernel may wait for the device to go
idle, which never happens while a ring kernel is resident (see ``LAZY_LOADING_HAZARD``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import importlib.metadata
import os
import sys
from typing import Any

from pydotcompute.errors import BackendNotAvailableError

__all__ = [
    "LAZY_LOADING_HAZARD",
    "ask_for_eager_module_loading",
    "MIN_COMPUTE_CAPABILITY",
    "CudaAvailability",
    "DeviceInfo",
    "probe_cuda",
    "require_cuda",
]

MIN_COMPUTE_CAPABILITY = (7, 0)
"""Oldest architecture the device loops run on (``nanosleep`` arrived with sm_70)."""

LAZY_LOADING_HAZARD = (
    "CUDA loads modules lazily in this process (CUDA_MODULE_LOADING=LAZY, or CUDA was "
    "initialised before pydotcompute could ask for eager loading): a kernel launched "
    "for the first time while a ring kernel is resident can wait for the device to go "
    "idle, which it never does, and hang. Set CUDA_MODULE_LOADING=EAGER before CUDA "
    "is first used, or run every other kernel once before launching ring kernels."
)
"""Why lazy module loading and resident kernels do not mix."""

_INSTALL_HINT = "pip install pydotcompute[cuda12] or [cuda13]"
_CUPY_WHEELS = ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy")


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """Static properties of one CUDA device."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    """Global memory in bytes (0 for the simulator)."""
    multiprocessor_count: int
    max_threads_per_multiprocessor: int
    can_map_host_memory: bool
    """Whether mapped pinned host memory (where the rings live) is supported."""
    pci_bus_id: int


@dataclasses.dataclass(frozen=True)
class CudaAvailability:
    """The outcome of :func:`probe_cuda`."""

    usable: bool
    """True when a real GPU can run the ``cuda`` backend and CuPy memory."""
    reason: str
    """Why not (empty when usable); for the simulator, says so."""
    simulator: bool = False
    """numba-cuda runs its CPU simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    cupy_distribution: str | None = None
    """The wheel that provides CuPy, e.g. ``"cupy-cuda12x 14.2.0"``."""
    driver_version: int | None = None
    """CUDA driver API version (e.g. 12040), when a driver was found."""
    runtime_version: int | None = None
    """Version of CuPy's CUDA runtime (e.g. 12090)."""
    devices: tuple[DeviceInfo, ...] = ()

    @property
    def device_count(self) -> int:
        return len(self.devices)

    @property
    def device_name(self) -> str | None:
        """Name of device 0, or None when there is none."""
        return self.devices[0].name if self.devices else None

    @property
    def compute_capability(self) -> tuple[int, int] | None:
        """Compute capability of device 0, or None when there is none."""
        return self.devices[0].compute_capability if self.devices else None


def probe_cuda() -> CudaAvailability:
    """Check, now, whether a CUDA GPU is usable. Never raises for a missing GPU."""
    try:
        numba_cuda = importlib.import_module("numba.cuda")
    except ImportError as exc:  # e.g. numba-cuda without its CUDA Python bindings
        return CudaAvailability(False, f"numba-cuda cannot be imported: {exc}")
    if _simulator_enabled():
        return _simulator_availability(numba_cuda)
    ask_for_eager_module_loading()  # CUDA initialises below, at the latest

    try:
        cupy = importlib.import_module("cupy")
    except ImportError as exc:
        if exc.name == "cupy":
            return CudaAvailability(False, f"CuPy is not installed ({_INSTALL_HINT})")
        return CudaAvailability(False, f"CuPy ({_cupy_distribution()}) failed to import: {exc}")
    dist = _cupy_distribution()
    runtime = cupy.cuda.runtime
    facts: dict[str, Any] = {"cupy_distribution": dist}
    try:
        facts["runtime_version"] = int(runtime.runtimeGetVersion())
    except Exception as exc:  # CuPy wraps every runtime failure in its own types
        return CudaAvailability(False, f"CuPy's CUDA runtime failed to load: {exc}", **facts)

    driver_version = int(runtime.driverGetVersion())
    if driver_version == 0:
        # cudaDriverGetVersion reports 0 when libcuda cannot be loaded; ask the
        # loader itself for the precise cause.
        return CudaAvailability(False, f"no CUDA driver found: {_driver_load_error()}", **facts)
    facts["driver_version"] = driver_version

    try:
        count = int(runtime.getDeviceCount())
    except runtime.CUDARuntimeError as exc:
        text = str(exc)
        if "NoDevice" in text:
            return CudaAvailability(False, _no_device_reason(), **facts)
        if "InsufficientDriver" in text:
            return CudaAvailability(
                False,
                f"the CUDA driver ({_version(driver_version)}) is older than CuPy's CUDA "
                f"runtime ({_version(facts['runtime_version'])}, {dist}): update the "
                "driver or install the CuPy wheel that matches it",
                **facts,
            )
        return CudaAvailability(False, f"CUDA could not list devices: {exc}", **facts)
    if count == 0:
        return CudaAvailability(False, _no_device_reason(), **facts)

    devices = tuple(_device_info(i, runtime.getDeviceProperties(i)) for i in range(count))
    facts["devices"] = devices
    if all(d.compute_capability < MIN_COMPUTE_CAPABILITY for d in devices):
        listed = ", ".join(
            f"{d.index}: {d.name} (sm_{d.compute_capability[0]}{d.compute_capability[1]})"
            for d in devices
        )
        need = "{}.{}".format(*MIN_COMPUTE_CAPABILITY)
        return CudaAvailability(
            False, f"no device has compute capability {need} or newer ({listed})", **facts
        )

    numba_error = numba_cuda.cuda_error()
    if numba_error is not None:
        return CudaAvailability(
            False, f"numba-cuda cannot use the CUDA driver: {numba_error}", **facts
        )
    if len(numba_cuda.gpus) == 0:
        return CudaAvailability(False, "numba-cuda sees no CUDA device", **facts)
    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():
        return CudaAvailability(
            False,
            f"numba-cuda cannot find libNVVM to compile device code ({_INSTALL_HINT})",
            **facts,
        )
    return CudaAvailability(True, "", **facts)


def ask_for_eager_module_loading() -> None:
    """Set ``CUDA_MODULE_LOADING=EAGER`` unless the user set the variable.

    The driver reads it once, when CUDA initialises in the process, so every entry
    point that may be the first to touch CUDA (the probe, CuPy's import, the CLI, the
    benchmarks) calls this first. See ``LAZY_LOADING_HAZARD`` for why."""
    os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")


def require_cuda(*, allow_simulator: bool = False) -> CudaAvailability:
    """Return the probe when CUDA is usable; raise ``BackendNotAvailableError`` otherwise.

    With ``allow_simulator=True`` the numba-cuda simulator counts as usable.
    """
    found = probe_cuda()
    if found.usable or (allow_simulator and found.simulator):
        return found
    raise BackendNotAvailableError(f"CUDA is not usable: {found.reason}")


def _simulator_enabled() -> bool:
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


def _simulator_availability(numba_cuda: Any) -> CudaAvailability:
    fake = numba_cuda.get_current_device()
    device = DeviceInfo(
        index=0,
        name="numba-cuda simulator",
        compute_capability=tuple(fake.compute_capability),
        total_memory=0,
        multiprocessor_count=1,
        max_threads_per_multiprocessor=0,
        can_map_host_memory=True,
        pci_bus_id=0,
    )
    return CudaAvailability(
        usable=False,
        reason="numba-cuda runs the CUDA simulator (NUMBA_ENABLE_CUDASIM=1), not a GPU",
        simulator=True,
        devices=(device,),
    )


def _cupy_distribution() -> str:
    # Asking for the known wheel names is ~100x cheaper than indexing every
    # installed distribution; more than one found is itself worth reporting.
    found = []
    for name in _CUPY_WHEELS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found) if found else "cupy from an unknown distribution"


def _driver_load_error() -> str:
    library = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(library)
    except OSError as exc:
        return f"{library} cannot be loaded ({exc})"
    return f"{library} loads but reports no driver version"


def _no_device_reason() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return f"no CUDA device visible (CUDA_VISIBLE_DEVICES={visible!r})"
    return "no CUDA device visible"


def _version(encoded: int) -> str:
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def _device_info(index: int, props: dict[str, Any]) -> DeviceInfo:
    name = props["name"]
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return DeviceInfo(
        index=index,
        name=str(name),
        compute_capability=(int(props["major"]), int(props["minor"])),
        total_memory=int(props["totalGlobalMem"]),
        multiprocessor_count=int(props["multiProcessorCount"]),
        max_threads_per_multiprocessor=int(props["maxThreadsPerMultiProcessor"]),
        can_map_host_memory=bool(props["canMapHostMemory"]),
        pci_bus_id=int(props["pciBusID"]),
    )
