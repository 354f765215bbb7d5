"""The CUDA probe: the real environment, and each failure faked at the import boundary."""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import warnings

import numba.cuda
import pytest
from numba.cuda.cudadrv import nvvm

from pydotcompute.device.probe import (
    MIN_COMPUTE_CAPABILITY,
    CudaAvailability,
    probe_cuda,
    require_cuda,
)
from pydotcompute.errors import BackendNotAvailableError
from tests import fake_cupy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = probe_cuda()


def _libcuda_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _run_python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- the real environment -------------------------------------------------------------


def test_real_probe_is_consistent() -> None:
    assert isinstance(REAL, CudaAvailability)
    if REAL.usable:
        assert REAL.reason == "" and REAL.device_count >= 1
        assert REAL.compute_capability is not None
        assert REAL.compute_capability >= MIN_COMPUTE_CAPABILITY
        assert require_cuda() == REAL
    else:
        assert REAL.reason
        with pytest.raises(BackendNotAvailableError, match="CUDA is not usable"):
            require_cuda()


@pytest.mark.skipif(
    importlib.util.find_spec("cupy") is not None or REAL.simulator,
    reason="CuPy is installed, or the simulator is on",
)
def test_real_probe_without_cupy() -> None:
    assert not REAL.usable
    assert REAL.reason == "CuPy is not installed (pip install pydotcompute[cuda12] or [cuda13])"


@pytest.mark.skipif(
    importlib.util.find_spec("cupy") is None or _libcuda_loads() or REAL.simulator,
    reason="needs CuPy installed on a machine without a CUDA driver, simulator off",
)
def test_real_probe_with_cupy_but_no_driver() -> None:
    assert not REAL.usable
    assert REAL.reason.startswith("no CUDA driver found: libcuda.so.1 cannot be loaded")
    assert REAL.cupy_distribution and REAL.cupy_distribution.startswith("cupy")
    assert REAL.runtime_version and REAL.driver_version is None and REAL.devices == ()


def test_import_probes_nothing() -> None:
    out = _run_python(
        "import sys, pydotcompute.device.probe, pydotcompute.memory;"
        "print('cupy' in sys.modules, 'numba.cuda' in sys.modules)"
    )
    assert out.split() == ["False", "False"]


def test_simulator_is_reported_as_simulator() -> None:
    out = _run_python(
        "from pydotcompute.device.probe import probe_cuda, require_cuda\n"
        "from pydotcompute.errors import BackendNotAvailableError\n"
        "p = probe_cuda()\n"
        "print(p.usable, p.simulator, p.device_count, p.device_name)\n"
        "print(p.reason)\n"
        "print(require_cuda(allow_simulator=True) == p)\n"
        "try:\n"
        "    require_cuda()\n"
        "except BackendNotAvailableError as e:\n"
        "    print('raised', e)\n",
        NUMBA_ENABLE_CUDASIM="1",
    )
    lines = out.splitlines()
    assert lines[0] == "False True 1 numba-cuda simulator"
    assert "simulator" in lines[1] and "NUMBA_ENABLE_CUDASIM=1" in lines[1]
    assert lines[2] == "True"
    assert lines[3].startswith("raised CUDA is not usable: numba-cuda runs the CUDA simulator")


_LOADING_CODE = (
    "import os\n"
    "os.environ.pop('NUMBA_ENABLE_CUDASIM', None)\n"
    "{setup}\n"
    "from pydotcompute.device.probe import probe_cuda\n"
    "probe_cuda()\n"
    "print(os.environ.get('CUDA_MODULE_LOADING'))\n"
)


def test_the_probe_asks_cuda_for_eager_module_loading() -> None:
    # Lazy loading can hang a kernel launched beside a resident ring kernel.
    setup = "os.environ.pop('CUDA_MODULE_LOADING', None)"
    assert _run_python(_LOADING_CODE.format(setup=setup)).strip() == "EAGER"


def test_the_probe_keeps_the_users_module_loading_setting() -> None:
    setup = "os.environ['CUDA_MODULE_LOADING'] = 'LAZY'"
    assert _run_python(_LOADING_CODE.format(setup=setup)).strip() == "LAZY"


def test_gpu_marked_tests_run_where_the_probe_finds_a_gpu() -> None:
    from tests.conftest import _cuda_usable

    assert _cuda_usable() == REAL.usable


def test_lazy_loading_is_warned_at_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydotcompute.device import resident

    monkeypatch.setattr(resident, "_lazy_loading", lambda: True)
    with pytest.warns(RuntimeWarning, match="kernel 'k'.*lazily.*CUDA_MODULE_LOADING=EAGER"):
        resident.warn_if_lazy_loading("k")
    monkeypatch.setattr(resident, "_lazy_loading", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resident.warn_if_lazy_loading("k")


# --- faked at the import boundary -----------------------------------------------------


def test_cupy_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cupy.no_simulator(monkeypatch)
    monkeypatch.setitem(sys.modules, "cupy", None)
    found = probe_cuda()
    assert not found.usable and not found.simulator
    assert found.reason == "CuPy is not installed (pip install pydotcompute[cuda12] or [cuda13])"
    with pytest.raises(BackendNotAvailableError, match=r"CuPy is not installed \(pip install"):
        require_cuda()


class _BrokenCupyFinder(importlib.abc.MetaPathFinder):
    """CuPy is present but its native part fails to load (e.g. a missing libcudart)."""

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name == "cupy":
            raise ImportError(
                "libcudart.so.12: cannot open shared object file", name="cupy_backends.cuda"
            )
        return None


def test_cupy_fails_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cupy.no_simulator(monkeypatch)
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenCupyFinder(), *sys.meta_path])
    found = probe_cuda()
    assert not found.usable
    assert "failed to import: libcudart.so.12: cannot open shared object file" in found.reason


def test_no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = fake_cupy.install(monkeypatch)
    gpu.driver_version = 0

    def no_library(name: str, *args: object, **kwargs: object) -> None:
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    found = probe_cuda()
    assert not found.usable
    assert found.reason == (
        "no CUDA driver found: libcuda.so.1 cannot be loaded (libcuda.so.1: cannot open "
        "shared object file: No such file or directory)"
    )
    assert found.runtime_version == 12090 and found.driver_version is None


def test_driver_older_than_cupy_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = fake_cupy.install(monkeypatch)
    gpu.driver_version = 11080
    gpu.device_count_error = (
        "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"
    )
    found = probe_cuda()
    assert not found.usable and found.driver_version == 11080
    assert found.reason.startswith("the CUDA driver (11.8) is older than CuPy's CUDA runtime (12.9")


@pytest.mark.parametrize("how", ["error", "zero"])
def test_no_device(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    gpu = fake_cupy.install(monkeypatch)
    if how == "error":
        gpu.device_count_error = "cudaErrorNoDevice: no CUDA-capable device is detected"
    else:
        gpu.devices = []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert probe_cuda().reason == "no CUDA device visible"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert probe_cuda().reason == "no CUDA device visible (CUDA_VISIBLE_DEVICES='')"


def test_other_device_listing_error(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = fake_cupy.install(monkeypatch)
    gpu.device_count_error = "cudaErrorSystemNotReady: system not yet initialized"
    assert probe_cuda().reason == (
        "CUDA could not list devices: cudaErrorSystemNotReady: system not yet initialized"
    )


def test_devices_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = fake_cupy.install(monkeypatch)
    gpu.devices = [fake_cupy.device_props("Old GPU", 6, 1)]
    found = probe_cuda()
    assert not found.usable and found.device_count == 1
    assert found.reason == "no device has compute capability 7.0 or newer (0: Old GPU (sm_61))"


def test_numba_cannot_use_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cupy.install(monkeypatch)
    monkeypatch.setattr(numba.cuda, "cuda_error", lambda: "Error at driver init: boom")
    assert (
        probe_cuda().reason == "numba-cuda cannot use the CUDA driver: Error at driver init: boom"
    )


def test_numba_sees_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cupy.install(monkeypatch)
    monkeypatch.setattr(numba.cuda, "gpus", [])
    assert probe_cuda().reason == "numba-cuda sees no CUDA device"


def test_numba_without_nvvm(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cupy.install(monkeypatch)
    monkeypatch.setattr(nvvm, "is_available", lambda: False)
    assert probe_cuda().reason.startswith("numba-cuda cannot find libNVVM")


def test_usable_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = fake_cupy.install(monkeypatch)
    gpu.devices = [fake_cupy.device_props("Old GPU", 6, 1), fake_cupy.device_props("New GPU")]
    found = require_cuda()
    assert found.usable and found.reason == "" and not found.simulator
    assert found.device_count == 2 and found.driver_version == 12040
    assert found.device_name == "Old GPU" and found.compute_capability == (6, 1)
    new = found.devices[1]
    assert (new.index, new.name, new.compute_capability) == (1, "New GPU", (9, 0))
    assert new.total_memory == 80 << 30 and new.multiprocessor_count == 132
    assert new.can_map_host_memory and new.max_threads_per_multiprocessor == 2048


def test_reports_every_cupy_wheel_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cupy.install(monkeypatch)
    wheels = {"cupy-cuda12x": "14.2.0", "cupy-cuda13x": "13.6.0"}

    def version(name: str) -> str:
        if name not in wheels:
            raise importlib.metadata.PackageNotFoundError(name)
        return wheels[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert probe_cuda().cupy_distribution == "cupy-cuda13x 13.6.0, cupy-cuda12x 14.2.0"
    wheels.clear()
    assert probe_cuda().cupy_distribution == "cupy from an unknown distribution"


def test_numba_cuda_not_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numba.cuda", None)
    found = probe_cuda()
    assert not found.usable and not found.simulator
    assert found.reason.startswith("numba-cuda cannot be imported: ")
