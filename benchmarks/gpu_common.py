"""Shared pieces of the ``gpu_*`` benchmarks: the record, the handler, the baselines.

Every script takes ``--simulator``: run the same code at tiny sizes under numba-cuda's
simulator (``NUMBA_ENABLE_CUDASIM=1``) as a smoke test. Simulator numbers measure
Python, not a GPU: they are printed but mean nothing. Every script also takes
``--json PATH`` (its results, machine-readable, for ``gpu_suite.py``) and
``--stall-after S`` (dump every thread's stack to stderr and exit if it runs longer).

The launch baseline is a CuPy ``RawKernel`` when CuPy is usable; otherwise (and under
the simulator) the same kernel written with numba-cuda, and the output says which.
Both baselines read their input from and write their output to mapped pinned host
memory, as the persistent kernel does, so they do the same work: the difference is
one launch plus one synchronize per call.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from typing import Any

import numpy as np


def _use_simulator_if_asked() -> bool:
    """Switch numba-cuda to its simulator when ``--simulator`` is on the command line
    (it must happen before numba-cuda is first imported, so at this import)."""
    if "--simulator" in sys.argv:
        if "numba.cuda" in sys.modules and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            raise RuntimeError("numba.cuda was imported before --simulator was applied")
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        return True
    return False


SIMULATOR = _use_simulator_if_asked()

from pydotcompute.device.probe import ask_for_eager_module_loading  # noqa: E402

# Before anything here touches CUDA (device_name() would initialise it): kernels must
# load eagerly to launch beside a resident ring kernel.
ask_for_eager_module_loading()

from numba import cuda  # noqa: E402  (after the simulator switch)

REC = np.dtype([("x", "<f8"), ("seq", "<i8")])  # 16 bytes


def affine(msg, out, state):  # type: ignore[no-untyped-def]
    """The work of every benchmark: y = 2x + 1, sequence number carried over."""
    out.x = 2.0 * msg.x + 1.0
    out.seq = msg.seq
    return True


def records(n: int, start: int = 0) -> np.ndarray:
    r = np.zeros(n, REC)
    r["x"] = np.arange(start, start + n, dtype=np.float64)
    r["seq"] = np.arange(start, start + n)
    return r


def device_name() -> str:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "numba-cuda simulator (numbers are not GPU numbers)"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def mapped(n: int, dtype: Any) -> tuple[Any, np.ndarray]:
    """A mapped pinned array: (the device-usable array, a plain host view of it)."""
    arr = cuda.mapped_array(n, dtype=dtype)
    host = arr._ary if SIMULATOR else np.ndarray.view(arr, type=np.ndarray)
    host[:] = 0
    return arr, host


def cupy_or_none() -> Any:
    """CuPy when it can run kernels here, else None."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return None
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        return cupy
    except Exception:  # CuPy missing or without a driver: the numba baseline is used
        return None


_AFFINE_CU = r"""
struct Rec { double x; long long seq; };
extern "C" __global__ void affine(unsigned long long src, unsigned long long dst, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const Rec* in = (const Rec*)src;
        Rec* out = (Rec*)dst;
        out[i].x = 2.0 * in[i].x + 1.0;
        out[i].seq = in[i].seq;
    }
}
"""


class LaunchBaseline:
    """One kernel launch plus one synchronize per call, on records in mapped pinned
    memory: ``host_in``/``host_out`` are numpy views of it."""

    def __init__(self, capacity: int) -> None:
        self.cupy = cupy_or_none()
        if self.cupy is not None:
            cp = self.cupy
            self.kind = "CuPy RawKernel launch + synchronize"
            nbytes = capacity * REC.itemsize
            self._mem_in = cp.cuda.alloc_pinned_memory(nbytes)
            self._mem_out = cp.cuda.alloc_pinned_memory(nbytes)
            self.host_in = np.frombuffer(self._mem_in, REC, capacity)
            self.host_out = np.frombuffer(self._mem_out, REC, capacity)
            self._kernel = cp.RawKernel(_AFFINE_CU, "affine")
            self._stream = cp.cuda.Stream(non_blocking=True)
            self._src = np.uint64(self._mem_in.ptr)  # UVA: the host address is valid
            self._dst = np.uint64(self._mem_out.ptr)
            self.run = self._run_cupy
        else:
            self.kind = "numba-cuda kernel launch + synchronize (CuPy not usable)"
            self._in = cuda.mapped_array(capacity, REC)
            self._out = cuda.mapped_array(capacity, REC)
            sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
            self.host_in = self._in._ary if sim else self._in
            self.host_out = self._out._ary if sim else self._out
            self._kernel = _numba_affine
            self._stream = cuda.stream()
            self.run = self._run_numba

    def _run_cupy(self, n: int) -> None:
        threads = 256
        blocks = (n + threads - 1) // threads
        with self._stream:
            self._kernel((blocks,), (threads,), (self._src, self._dst, np.int64(n)))
        self._stream.synchronize()

    def _run_numba(self, n: int) -> None:
        threads = 256 if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" else 4
        blocks = (n + threads - 1) // threads
        self._kernel[blocks, threads, self._stream](self._in, self._out, n)
        self._stream.synchronize()


@cuda.jit
def _numba_affine(src, dst, n):  # type: ignore[no-untyped-def]
    i = cuda.grid(1)
    if i < n:
        dst[i].x = 2.0 * src[i].x + 1.0
        dst[i].seq = src[i].seq


def percentiles_us(samples_ns: Any) -> tuple[float, float]:
    s = sorted(int(x) for x in samples_ns)
    return s[len(s) // 2] / 1000.0, s[min(len(s) - 1, int(len(s) * 0.99))] / 1000.0


def add_standard_args(ap: argparse.ArgumentParser) -> None:
    """``--simulator``, ``--json PATH`` and ``--stall-after S``, for every script."""
    ap.add_argument("--simulator", action="store_true", help="tiny run on the simulator")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--stall-after", type=float, metavar="S",
                    help="dump all stacks to stderr and exit when running longer")  # fmt: skip


def start(args: argparse.Namespace) -> None:
    """Arm the stall dump (a stalled GPU run says where it stood, then ends)."""
    if args.stall_after:
        faulthandler.dump_traceback_later(args.stall_after, exit=True)


def finish(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Write ``results`` (plus the device) where ``--json`` says, and disarm."""
    faulthandler.cancel_dump_traceback_later()
    if args.json:
        data = _plain({"device": device_name(), "simulator": SIMULATOR, **results})
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars as Python numbers, NaN (nothing measured) as null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def sm_count() -> int:
    """Multiprocessors of the GPU (1 under the simulator, which runs one block)."""
    if SIMULATOR:
        return 1
    return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


async def launch_persistent(queue_size: int, **extra: Any) -> Any:
    """A started, activated ``cuda`` kernel loop running ``affine`` (no runtime around
    it, so the benchmark can drive its mapped rings directly)."""
    from pydotcompute.backends.config import RingKernelConfig
    from pydotcompute.backends.cuda import CudaKernelBackend

    def failed(exc: BaseException) -> None:
        raise SystemExit(f"the persistent kernel failed: {exc!r}")

    config = RingKernelConfig(queue_size=queue_size, backend="cuda", extra=extra)
    loop = CudaKernelBackend("bench", affine, config, REC, REC, failed)
    t0 = time.perf_counter()
    await loop.start()
    loop.compile_s = time.perf_counter() - t0  # type: ignore[attr-defined]
    loop.set_active(True)
    return loop
