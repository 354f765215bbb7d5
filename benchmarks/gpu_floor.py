"""The floor of this machine: what moving a few bytes between a CPU and a GPU costs.

Measured with numba-cuda (and CuPy where it is installed, for its launch and its CUDA
graphs), no nvcc, in one run:

* ``ping-pong, one word``: one CPU thread and one GPU thread hand an 8-byte counter
  back and forth through mapped pinned host memory — the GPU thread polls a word the
  CPU writes and answers in another. The best any design that polls mapped memory can
  do: ring round trips are judged against it.
* ``ping-pong, flag then record``: the same, but the flag announces a 16-byte record
  that is read after it, and the answer is a record then a flag: what a protocol that
  orders reads after an index costs (two reads across PCIe).
* launch + synchronize of an empty kernel: numba-cuda; CuPy ``RawKernel``; a CUDA graph
  of that kernel (CuPy stream capture);
* an 8-byte copy + synchronize, each way;
* zero-copy bandwidth: every SM reading (host to device) or writing (device to host)
  mapped pinned memory in 8-byte words.

    python benchmarks/gpu_floor.py [--round-trips N] [--mbytes M] [--simulator] [--json P]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from typing import Any

import gpu_common as gc
import numpy as np
from gpu_common import cuda
from numba import njit

from pydotcompute.rings.atomics import cpu_pause, load_acquire, monotonic_ns, store_release
from pydotcompute.rings.device import (
    load_acquire_sys,
    load_relaxed_sys,
    store_relaxed_sys,
    store_release_sys,
)


@cuda.jit
def _echo_word(to_device, to_host, n):  # type: ignore[no-untyped-def]
    """One GPU thread: for i = 1..n, wait for word i, answer i."""
    if cuda.threadIdx.x == 0 and cuda.blockIdx.x == 0:
        for i in range(1, n + 1):
            while load_acquire_sys(to_device, 0) != i:
                pass
            store_relaxed_sys(to_host, 0, i)


@cuda.jit
def _echo_record(to_device, to_host, n):  # type: ignore[no-untyped-def]
    """The same with a flag (word 0) announcing a record (words 1, 2) read after it."""
    if cuda.threadIdx.x == 0 and cuda.blockIdx.x == 0:
        for i in range(1, n + 1):
            while load_acquire_sys(to_device, 0) != i:
                pass
            a = load_relaxed_sys(to_device, 1)
            b = load_relaxed_sys(to_device, 2)
            store_relaxed_sys(to_host, 1, a + 1)
            store_relaxed_sys(to_host, 2, b + 1)
            store_release_sys(to_host, 0, i)


@njit(nogil=True)
def _host_side(to_device, to_host, n, with_record, samples):  # type: ignore[no-untyped-def]
    """The CPU thread: write i (after the record), wait for i back; time each."""
    for i in range(1, n + 1):
        t0 = monotonic_ns()
        if with_record:
            store_release(to_device, 8, i)
            store_release(to_device, 16, -i)
        store_release(to_device, 0, i)
        while load_acquire(to_host, 0) != i:
            cpu_pause()
        samples[i - 1] = monotonic_ns() - t0
    return 0


def ping_pong(n: int, with_record: bool) -> list[int]:
    d_in, h_in = gc.mapped(4, np.int64)
    d_out, h_out = gc.mapped(4, np.int64)
    kernel = _echo_record if with_record else _echo_word
    samples = np.zeros(n, np.int64)
    if gc.SIMULATOR:
        # The simulator launches synchronously: the GPU thread runs on a host thread.
        t = threading.Thread(target=lambda: kernel[1, 1](d_in, d_out, n))
        t.start()
        _host_side(h_in, h_out, n, with_record, samples)
        t.join()
    else:
        stream = cuda.stream()
        kernel[1, 1, stream](d_in, d_out, n)
        _host_side(h_in, h_out, n, with_record, samples)
        stream.synchronize()
    if with_record:
        assert int(h_out[1]) == n + 1 and int(h_out[2]) == -n + 1
    return samples.tolist()


@cuda.jit
def _empty(x):  # type: ignore[no-untyped-def]
    pass


def _time(fn: Callable[[], Any], n: int) -> list[int]:
    fn()  # load and compile
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return out


def launches(n: int) -> dict[str, Any]:
    found: dict[str, Any] = {}
    stream = cuda.stream()
    arg = cuda.device_array(1, np.int64)

    def numba_launch() -> None:
        _empty[1, 1, stream](arg)
        stream.synchronize()

    found["launch_sync_numba_us"] = gc.percentiles_us(_time(numba_launch, n))
    cp = gc.cupy_or_none()
    if cp is None:
        why = "simulator" if gc.SIMULATOR else "CuPy is not usable"
        found["launch_sync_cupy_us"] = found["graph_launch_sync_us"] = f"n/a ({why})"
        return found
    kern = cp.RawKernel(r'extern "C" __global__ void empty(long long* x) {}', "empty")
    cstream = cp.cuda.Stream(non_blocking=True)
    x = cp.zeros(1, cp.int64)

    def cupy_launch() -> None:
        kern((1,), (1,), (x,), stream=cstream)
        cstream.synchronize()

    found["launch_sync_cupy_us"] = gc.percentiles_us(_time(cupy_launch, n))
    try:
        cstream.begin_capture()
        kern((1,), (1,), (x,), stream=cstream)
        graph = cstream.end_capture()

        def graph_launch() -> None:
            graph.launch(cstream)
            cstream.synchronize()

        found["graph_launch_sync_us"] = gc.percentiles_us(_time(graph_launch, n))
    except Exception as exc:  # an old CuPy or driver: reported, the rest still runs
        found["graph_launch_sync_us"] = f"n/a ({type(exc).__name__}: {exc})"
    return found


def copies(n: int) -> dict[str, Any]:
    stream = cuda.stream()
    dev = cuda.device_array(1, np.int64)
    host = cuda.pinned_array(1, np.int64)

    def h2d() -> None:
        dev.copy_to_device(host, stream=stream)
        stream.synchronize()

    def d2h() -> None:
        dev.copy_to_host(host, stream=stream)
        stream.synchronize()

    return {
        "memcpy_h2d_8B_us": gc.percentiles_us(_time(h2d, n)),
        "memcpy_d2h_8B_us": gc.percentiles_us(_time(d2h, n)),
    }


@cuda.jit
def _read_mapped(src, sums):  # type: ignore[no-untyped-def]
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    acc = 0
    while i < src.shape[0]:
        acc += src[i]
        i += step
    sums[cuda.grid(1)] = acc  # keeps the loads


@cuda.jit
def _write_mapped(dst):  # type: ignore[no-untyped-def]
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < dst.shape[0]:
        dst[i] = i
        i += step


def bandwidth(nbytes: int) -> dict[str, float]:
    words = nbytes // 8
    d_buf, h_buf = gc.mapped(words, np.int64)
    threads = 4 if gc.SIMULATOR else 256
    blocks = 1 if gc.SIMULATOR else gc.sm_count() * 4
    sums = cuda.device_array(blocks * threads, np.int64)
    stream = cuda.stream()
    out = {}
    for name, run in (
        ("zero_copy_h2d_GBps", lambda: _read_mapped[blocks, threads, stream](d_buf, sums)),
        ("zero_copy_d2h_GBps", lambda: _write_mapped[blocks, threads, stream](d_buf)),
    ):
        run()
        stream.synchronize()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            run()
            stream.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[name] = nbytes / best / 1e9
    assert int(h_buf[words - 1]) == words - 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--round-trips", type=int, default=None)
    ap.add_argument("--mbytes", type=int, default=None, help="zero-copy buffer size")
    gc.add_standard_args(ap)
    args = ap.parse_args()
    gc.start(args)
    sim = gc.SIMULATOR
    n = args.round_trips or (20 if sim else 20000)
    mbytes = args.mbytes or (1 if sim else 256)
    results: dict[str, Any] = {}
    results["pingpong_word_us"] = gc.percentiles_us(ping_pong(n, False))
    results["pingpong_flag_record_us"] = gc.percentiles_us(ping_pong(n, True))
    results.update(launches(5 if sim else 5000))
    results.update(copies(5 if sim else 5000))
    results.update(bandwidth((64 << 10) if sim else mbytes << 20))
    print(f"device: {gc.device_name()}")
    print(f"{'floor':<44}{'p50':>10}{'p99':>10}")
    for key, label in (
        ("pingpong_word_us", "CPU<->GPU ping-pong, one word (us)"),
        ("pingpong_flag_record_us", "CPU<->GPU ping-pong, flag then record (us)"),
        ("launch_sync_numba_us", "launch + sync, numba-cuda (us)"),
        ("launch_sync_cupy_us", "launch + sync, CuPy RawKernel (us)"),
        ("graph_launch_sync_us", "CUDA graph launch + sync, CuPy (us)"),
        ("memcpy_h2d_8B_us", "8-byte copy H->D + sync (us)"),
        ("memcpy_d2h_8B_us", "8-byte copy D->H + sync (us)"),
    ):
        v = results[key]
        if isinstance(v, str):
            print(f"{label:<44}{v:>20}")
        else:
            print(f"{label:<44}{v[0]:>10.2f}{v[1]:>10.2f}")
    for key, label in (
        ("zero_copy_h2d_GBps", "zero-copy read of host memory (GB/s)"),
        ("zero_copy_d2h_GBps", "zero-copy write of host memory (GB/s)"),
    ):
        print(f"{label:<44}{results[key]:>10.2f}")
    gc.finish(args, results)


if __name__ == "__main__":
    main()
