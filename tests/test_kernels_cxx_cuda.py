"""The CUDA C++ sources: found in a checkout and in an installed layout, compiled to PTX
with nvcc and NVRTC where those exist, and run through CuPy on a GPU."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pydotcompute.backends.cuda_source import SourceControl
from pydotcompute.backends.kernel_sources import (
    kernel_files,
    kernels_dir,
    nvrtc_options,
    read_kernel_source,
)
from pydotcompute.device.probe import probe_cuda
from pydotcompute.errors import InvalidConfigurationError
from pydotcompute.rings.control import ControlBlock

ROOT = Path(__file__).resolve().parent.parent
ARCH = "sm_75"  # the oldest architecture CUDA 13 still targets; nanosleep needs sm_70+


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None
    )


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")

# Every ring operation, instantiated in a kernel so that nvcc compiles all of ring.cuh.
RING_TU = """
#include "ring.cuh"
extern "C" __global__ void all_ring_ops(unsigned char* buf, unsigned long long nbytes,
                                        pdc::ring::SideCounters* counters,
                                        unsigned char* records, unsigned long long* out) {
  pdc::ring::Ring r;
  out[0] = pdc::ring::ring_init(buf, nbytes, 8, 16, pdc::ring::kDropOldest, 1, 0);
  out[1] = pdc::ring::ring_attach(&r, buf, nbytes, pdc::ring::kSideDevice, counters);
  pdc::ring::ring_init_side_counters(r, counters);
  const pdc::ring::Warp warp;  // the whole warp moves each batch
  out[2] = pdc::ring::ring_try_push(warp, r, records, 2);
  out[3] = pdc::ring::ring_push(warp, r, records, 4, 100);
  out[4] = pdc::ring::ring_pop(warp, r, records, 4);
  out[5] = pdc::ring::ring_evict(warp, r, 1);
  out[6] = pdc::ring::ring_discard_stale(warp, r);
  out[7] = pdc::ring::ring_depth(r);
  out[8] = pdc::ring::ring_pop(r, records, 4);  // one thread alone
  pdc::ring::ring_mirror_counters(r, true);
}
"""


# --- finding and reading the sources ------------------------------------------------


def test_checkout_kernels_dir() -> None:
    assert kernels_dir() == ROOT / "kernels"
    assert {"ring.cuh", "stream_stats.cu"} <= set(kernel_files())


def test_installed_layout_is_found_first(tmp_path: Path) -> None:
    """A wheel puts the sources in pydotcompute/kernels; the loader must use them."""
    site = tmp_path / "site"
    shutil.copytree(
        ROOT / "pydotcompute",
        site / "pydotcompute",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(ROOT / "kernels", site / "pydotcompute" / "kernels")
    code = (
        "from pydotcompute.backends.kernel_sources import kernels_dir, read_kernel_source\n"
        "print(kernels_dir()); print(len(read_kernel_source('stream_stats.cu')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    where, size = out.stdout.split()
    assert Path(where) == site / "pydotcompute" / "kernels" and int(size) > 1000


def test_read_inlines_our_headers_once() -> None:
    raw = read_kernel_source("stream_stats.cu", inline_includes=False)
    assert '#include "ring.cuh"' in raw
    full = read_kernel_source("stream_stats.cu")
    assert '#include "ring.cuh"' not in full and "#pragma once" not in full
    assert full.count("inline u64 ring_pop(") == 1
    assert "#include <cuda/atomic>" in full  # system headers stay
    assert nvrtc_options() == (f"-I{kernels_dir()}",)


@pytest.mark.parametrize("name", ["nope.cu", "../pyproject.toml", "kernels/ring.cuh"])
def test_unknown_source_is_refused(name: str) -> None:
    with pytest.raises(InvalidConfigurationError, match="no kernel source"):
        read_kernel_source(name)


# --- compiling: nvcc -----------------------------------------------------------------


def _nvcc_ptx(source: Path, tmp_path: Path) -> str:
    ptx = tmp_path / (source.stem + ".ptx")
    result = subprocess.run(
        [NVCC, "-std=c++17", f"-arch={ARCH}", "--ptx", f"-I{kernels_dir()}", str(source),
         "-o", str(ptx)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    return ptx.read_text()


@needs_nvcc
@pytest.mark.parametrize("name", [n for n in kernel_files() if n.endswith(".cu")])
def test_nvcc_compiles_each_kernel_to_ptx(name: str, tmp_path: Path) -> None:
    ptx = _nvcc_ptx(kernels_dir() / name, tmp_path)
    assert re.search(r"\.entry\s+pdc_\w+", ptx), 'no extern "C" kernel entry'
    if name == "stream_stats.cu":
        assert ".entry pdc_stream_stats" in ptx
        assert "ld.acquire.sys" in ptx and "nanosleep" in ptx  # polls politely


@needs_nvcc
def test_nvcc_compiles_ring_header_with_the_hardware_rules(tmp_path: Path) -> None:
    source = tmp_path / "all_ring_ops.cu"
    source.write_text(RING_TU)
    ptx = _nvcc_ptx(source, tmp_path)
    assert ".entry all_ring_ops" in ptx
    assert "ld.acquire.sys" in ptx  # polling the other side's index
    assert "st.release.sys" in ptx  # publish / release: one release store per batch
    assert "membar.sys" not in ptx and "fence.sc.sys" not in ptx  # no full system fence
    assert "ld.relaxed.sys.b64" in ptx and "st.relaxed.sys.b64" in ptx  # whole words
    assert "shfl.sync" in ptx and "vote.sync.ballot" in ptx  # the warp decides together
    assert "atom.cas.acq_rel.gpu" in ptx  # claim/reserve: device scope, device memory
    assert "globaltimer" in ptx  # counters mirrored on a period
    assert "nanosleep" in ptx  # idle back-off


@needs_nvcc
def test_nvcc_builds_ring_header_for_host_and_device(tmp_path: Path) -> None:
    """Under nvcc the functions are __host__ __device__: the host half must build too."""
    source = tmp_path / "all_ring_ops.cu"
    source.write_text(RING_TU)
    result = subprocess.run(
        [NVCC, "-std=c++17", f"-arch={ARCH}", "-c", f"-I{kernels_dir()}", str(source),
         "-o", str(tmp_path / "all_ring_ops.o")],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


# --- compiling: NVRTC, as CuPy's RawModule does ---------------------------------------


def _nvrtc():  # type: ignore[no-untyped-def]
    if importlib.util.find_spec("cupy_backends") is None:
        return None
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception:  # CuPy raises its own types when libnvrtc cannot be loaded
        return None
    return nvrtc


def _cccl_include() -> str:
    spec = importlib.util.find_spec("cupy")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    return str(root / "_core" / "include" / "cupy" / "_cccl" / "libcudacxx")


@pytest.mark.skipif(_nvrtc() is None, reason="CuPy with a loadable NVRTC is not installed")
def test_nvrtc_compiles_stream_stats_as_rawmodule_would() -> None:
    nvrtc = _nvrtc()
    source = read_kernel_source("stream_stats.cu")
    program = nvrtc.createProgram(source, "stream_stats.cu", [], [])
    options = [f"-I{_cccl_include()}", "-arch=compute_75"]  # NVRTC's default C++17
    try:
        nvrtc.compileProgram(program, options)
    except Exception as exc:
        pytest.fail(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(program)}")
    ptx = nvrtc.getPTX(program)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert ".entry pdc_stream_stats" in ptx


# --- running, on a GPU -----------------------------------------------------------------

REAL = probe_cuda()


class StatsControl:
    """Host view of the stream_stats control block (``ControlBlock``'s layout; the
    result words: top of stream_stats.cu)."""

    def __init__(self, words: np.ndarray) -> None:
        self.w = words

    def command(self, value: int) -> None:
        self.w[SourceControl.COMMAND] = value

    @property
    def status(self) -> int:
        return int(self.w[SourceControl.STATUS])

    def snapshot(self) -> tuple[int, float, float, float, float]:
        while True:
            seq = int(self.w[SourceControl.SEQ])
            fields = self.w[SourceControl.RESULTS : SourceControl.RESULTS + 5].copy()
            if seq % 2 == 0 and int(self.w[SourceControl.SEQ]) == seq:
                count = int(fields[0])
                mean, m2, lo, hi = fields[1:].view(np.float64).tolist()
                return count, mean, m2, lo, hi


@pytest.mark.gpu
@pytest.mark.skipif(not REAL.usable, reason=f"no usable GPU: {REAL.reason}")
def test_gpu_stream_stats_through_rawmodule() -> None:
    import cupy

    from pydotcompute.rings.host_ring import HostRing
    from pydotcompute.rings.layout import RingSide, ring_nbytes

    def mapped(nbytes: int) -> np.ndarray:
        mem = cupy.cuda.alloc_pinned_memory(nbytes)
        return np.frombuffer(mem, dtype=np.uint8, count=nbytes)

    ring = HostRing(1024, np.float64, buffer=mapped(ring_nbytes(1024, 8, crossing=True)),
                    consumer_side=RingSide.DEVICE)  # fmt: skip
    control = StatsControl(mapped(ControlBlock.NBYTES).view(np.uint64))
    control.w[:] = 0
    side_counters = cupy.zeros(16, dtype=np.uint64)  # pdc::ring::SideCounters
    module = cupy.RawModule(code=read_kernel_source("stream_stats.cu"))
    kernel = module.get_function("pdc_stream_stats")
    stream = cupy.cuda.Stream(non_blocking=True)
    control.command(1)
    with stream:
        kernel(
            (1,),
            (256,),
            (
                np.uint64(ring.buffer.ctypes.data),
                np.uint64(ring.buffer.nbytes),
                np.uint64(control.w.ctypes.data),
                side_counters,
            ),
        )
    values = np.random.default_rng(3).normal(5.0, 2.0, 100_000)
    sent = 0
    while sent < values.size:
        sent += ring.push_batch(values[sent : sent + 4096], timeout=10.0)
    deadline = time.monotonic() + 10
    while control.snapshot()[0] < values.size and time.monotonic() < deadline:
        time.sleep(0.001)
    count, mean, m2, lo, hi = control.snapshot()
    control.command(2)
    stream.synchronize()
    assert control.status == 2
    assert count == values.size
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert m2 / count == pytest.approx(values.var(), rel=1e-9)
    assert (lo, hi) == (values.min(), values.max())
