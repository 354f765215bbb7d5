"""The ``cuda`` backend on a real GPU (skipped where none is usable).

These check what the simulator cannot: one launch for the kernel's whole life,
concurrency of the persistent kernel with host traffic and with other GPU work,
occupancy sizing, stream-level faults and a clean terminate.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

REC = np.dtype([("x", "<f8"), ("seq", "<i8")])
ODD = np.dtype([("id", "<u4"), ("x", "<f4"), ("y", "<f4")])  # 12 bytes: padded slots


def affine(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = 2.0 * msg.x + 1.0
    out.seq = msg.seq
    return True


def keep_even(msg, out, state):  # type: ignore[no-untyped-def]
    if msg.seq % 2:
        return False
    out.x = msg.x
    out.seq = msg.seq
    return True


def odd_sum(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x + msg.y
    out.seq = msg.id
    return True


def count_into_state(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x
    out.seq = msg.seq
    state[0] += 1.0
    return True


def records(n: int, start: int = 0) -> np.ndarray:
    r = np.zeros(n, REC)
    r["x"] = np.arange(start, start + n)
    r["seq"] = np.arange(start, start + n)
    return r


async def collect(rt, kid: str, n: int, timeout: float = 20.0) -> np.ndarray:  # type: ignore[no-untyped-def]
    got: list[np.ndarray] = []
    deadline = time.monotonic() + timeout
    while sum(len(g) for g in got) < n:
        assert time.monotonic() < deadline, "outputs did not arrive"
        got.append(await rt.receive_batch(kid, n, timeout=timeout))
    return np.concatenate(got)


async def test_one_launch_serves_many_batches_in_fifo_order() -> None:
    from pydotcompute.runtime.runtime import RingKernelRuntime

    async with RingKernelRuntime(backend="cuda") as rt:
        await rt.launch("aff", affine, backend="cuda", input_type=REC, output_type=REC,
                        queue_size=1 << 14)  # fmt: skip
        loop = rt._kernels["aff"].kernel_backend
        await rt.activate("aff")
        total = 0
        outs = []
        for b in range(20):
            n = 1 + (997 * b) % 5000  # many claims of many blocks per batch
            await rt.send_batch("aff", records(n, total), timeout=20)
            outs.append(await collect(rt, "aff", n))
            total += n
        out = np.concatenate(outs)
        assert np.array_equal(out["seq"], np.arange(total))  # FIFO across blocks
        assert np.array_equal(out["x"], 2.0 * np.arange(total) + 1.0)
        deadline = time.monotonic() + 5  # counters are mirrored about every millisecond
        while rt.get_telemetry("aff").messages_processed < total:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        tele = rt.get_telemetry("aff")
        assert tele.messages_processed == total and tele.messages_sent == total
        assert loop._done_event.query() is False  # still the same, running launch
        await rt.terminate("aff")
        assert loop._done_event.query() is True


async def test_filtering_handler_and_padded_records() -> None:
    from pydotcompute.runtime.runtime import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        await rt.launch("even", keep_even, backend="cuda", input_type=REC, output_type=REC)
        await rt.launch("odd", odd_sum, backend="cuda", input_type=ODD, output_type=REC)
        await rt.activate("even")
        await rt.activate("odd")
        await rt.send_batch("even", records(1000), timeout=10)
        src = np.zeros(300, ODD)
        src["id"] = np.arange(300)
        src["x"] = 0.5
        src["y"] = np.arange(300)
        await rt.send_batch("odd", src, timeout=10)
        even = await collect(rt, "even", 500)
        odd = await collect(rt, "odd", 300)
        assert np.array_equal(even["seq"], np.arange(0, 1000, 2))
        assert np.array_equal(odd["seq"], np.arange(300))
        assert np.allclose(odd["x"], np.arange(300) + 0.5)


async def test_state_is_read_while_the_kernel_runs() -> None:
    from pydotcompute.runtime.runtime import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        await rt.launch("cnt", count_into_state, backend="cuda", input_type=REC,
                        output_type=REC, state=np.zeros(1), extra={"threads": 1, "blocks": 1,
                        "items_per_thread": 1})  # fmt: skip
        await rt.activate("cnt")
        await rt.send_batch("cnt", records(100), timeout=10)
        await collect(rt, "cnt", 100)
        deadline = time.monotonic() + 10
        while rt.read_state("cnt")[0] != 100.0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert rt.get_state("cnt").name == "ACTIVE"


async def test_deactivate_pauses_and_reactivate_resumes_in_order() -> None:
    from pydotcompute.runtime.runtime import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        await rt.launch("p", affine, backend="cuda", input_type=REC, output_type=REC)
        await rt.activate("p")
        await rt.deactivate("p")
        await rt.send_batch("p", records(64), timeout=10)
        await asyncio.sleep(0.2)
        assert rt.get_telemetry("p").messages_processed == 0
        await rt.reactivate("p")
        out = await collect(rt, "p", 64)
        assert np.array_equal(out["seq"], np.arange(64))


async def test_grid_is_sized_from_occupancy() -> None:
    from numba import cuda

    from pydotcompute.runtime.runtime import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        await rt.launch("g", affine, backend="cuda", input_type=REC, output_type=REC)
        loop = rt._kernels["g"].kernel_backend
        compiled = next(iter(loop.kernel.overloads.values()))
        fits = compiled.max_cooperative_grid_blocks(loop.threads)
        sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
        assert loop.blocks == 1  # by default one small block
        await rt.launch("wide", affine, backend="cuda", input_type=REC, output_type=REC,
                        extra={"blocks": 1 << 20})  # fmt: skip
        assert rt._kernels["wide"].kernel_backend.blocks == min(fits, sms)


async def test_second_kernel_launches_and_runs_while_the_first_runs() -> None:
    from pydotcompute.runtime.runtime import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        opts = dict(backend="cuda", input_type=REC, output_type=REC, extra={"blocks": 2})
        await rt.launch("a", affine, **opts)
        await rt.activate("a")
        await asyncio.wait_for(rt.launch("b", affine, **opts), 60)
        await rt.activate("b")
        await rt.send_batch("b", records(10), timeout=10)
        assert len(await collect(rt, "b", 10)) == 10
        await asyncio.wait_for(rt.terminate("a"), 30)  # frees a's memory while b runs
        await rt.send_batch("b", records(10, 10), timeout=10)
        assert len(await collect(rt, "b", 10)) == 10


async def test_linked_kernels_pass_records_through_device_memory_in_order() -> None:
    # Two resident kernels of several blocks each, linked: every record reaches the
    # second through the ring in device memory, once and in order; a small link ring
    # fills and holds the first back; unlinking hands the second its own input again.
    from pydotcompute.runtime.runtime import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        opts = dict(backend="cuda", input_type=REC, output_type=REC, extra={"blocks": 2})
        await rt.launch("a", affine, queue_size=1 << 12, **opts)
        await rt.launch("b", affine, queue_size=256, **opts)
        for kid in ("a", "b"):
            await rt.activate(kid)
        await asyncio.wait_for(rt.link("a", "b"), 60)
        b = rt._kernels["b"].kernel_backend
        assert rt._kernels["a"].kernel_backend._out_words is b._in_words
        total = 0
        outs = []
        for n in (1, 7, 300, 4000, 1):
            await rt.send_batch("a", records(n, total), timeout=20)
            outs.append(await collect(rt, "b", n))
            total += n
        out = np.concatenate(outs)
        assert np.array_equal(out["seq"], np.arange(total))
        assert np.array_equal(out["x"], 4.0 * np.arange(total) + 3.0)
        await asyncio.wait_for(rt.unlink("a", "b"), 60)
        await rt.send_batch("b", records(5, 100), timeout=10)
        assert np.array_equal((await collect(rt, "b", 5))["seq"], np.arange(100, 105))
        await rt.send_batch("a", records(5, 200), timeout=10)
        assert np.array_equal((await collect(rt, "a", 5))["seq"], np.arange(200, 205))
        for kid in ("a", "b"):
            assert rt.get_telemetry(kid).messages_dropped == 0


async def test_kernels_on_two_gpus_link_and_say_how() -> None:
    from numba import cuda

    from pydotcompute.backends.options import CudaOptions
    from pydotcompute.runtime.runtime import RingKernelRuntime

    if len(cuda.gpus) < 2:
        pytest.skip("needs two GPUs")
    async with RingKernelRuntime() as rt:
        for kid, dev in (("a", 0), ("b", 1)):
            await rt.launch(kid, affine, backend="cuda", input_type=REC, output_type=REC,
                            options=CudaOptions(device=dev))  # fmt: skip
            await rt.activate(kid)
        path = await asyncio.wait_for(rt.link("a", "b"), 60)
        assert path.startswith(("peer memory", "pinned host memory")), path
        await rt.send_batch("a", records(1000), timeout=20)
        out = await collect(rt, "b", 1000)
        assert np.array_equal(out["seq"], np.arange(1000))
        assert np.array_equal(out["x"], 4.0 * np.arange(1000) + 3.0)


def test_a_corrupted_ring_sets_the_error_code_and_the_loop_exits() -> None:
    from numba import cuda

    from pydotcompute.backends.cuda import MappedControl, MappedRing
    from pydotcompute.backends.cuda_loop import ERROR_TEXT, ControlWords, SideWords, compile_loop
    from pydotcompute.rings.backpressure import BackpressureStrategy as B
    from pydotcompute.rings.layout import RingSide

    inp = MappedRing(64, REC, B.BLOCK, RingSide.HOST, RingSide.DEVICE)
    out = MappedRing(64, REC, B.BLOCK, RingSide.DEVICE, RingSide.HOST)
    ctl = MappedControl()
    inp.host.buffer[0] ^= 0xFF
    kernel = compile_loop(affine, REC, REC, np.zeros(1), 32, 1, 1000)
    side = cuda.to_device(np.zeros(SideWords.NWORDS, np.int64))
    kernel[1, 32](inp.words, out.words, ctl.device, side, cuda.to_device(np.zeros(1)), 0)
    cuda.synchronize()  # returns: the loop refused the ring and exited (unbounded run)
    code = ctl[ControlWords.ERROR_CODE]
    assert code == ControlWords.ERR_INPUT_RING + 1 and "input ring" in ERROR_TEXT[code]


_FAULT_SCRIPT = """
import asyncio, numpy as np
from pydotcompute.runtime.runtime import RingKernelRuntime
REC = np.dtype([("x", "<f8"), ("seq", "<i8")])
def wild(msg, out, state):
    state[1 << 40] = 1.0  # far outside the array: an illegal address on the GPU
    return True
async def main():
    async with RingKernelRuntime() as rt:
        await rt.launch("w", wild, backend="cuda", input_type=REC, output_type=REC)
        await rt.activate("w")
        await rt.send_batch("w", np.zeros(1, REC), timeout=5)
        for _ in range(1000):
            if rt.get_state("w").name == "FAILED":
                break
            await asyncio.sleep(0.01)
        print("STATE", rt.get_state("w").name)
        print("ERROR", repr(rt.get_error("w")))
asyncio.run(main())
"""


def test_a_fault_on_the_stream_fails_the_kernel_and_nothing_hangs() -> None:
    # An illegal address poisons the CUDA context, so it happens in a child process.
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", _FAULT_SCRIPT], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert "STATE FAILED" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "ERROR" in proc.stdout and "None" not in proc.stdout.split("ERROR", 1)[1]


async def test_terminate_returns_with_the_stream_idle_even_when_outputs_are_not_read() -> None:
    from pydotcompute.runtime.runtime import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        await rt.launch("full", affine, backend="cuda", input_type=REC, output_type=REC,
                        queue_size=1024, output_queue_size=16)  # fmt: skip
        loop = rt._kernels["full"].kernel_backend
        await rt.activate("full")
        await rt.send_batch("full", records(1000), timeout=10)
        await asyncio.sleep(0.2)  # output ring full: the kernel waits for room
        t0 = time.monotonic()
        await rt.terminate("full", timeout=10)
        assert time.monotonic() - t0 < 10
        assert loop._done_event.query() is True
        assert rt.get_telemetry("full").messages_dropped > 0


def stream_stats(msg, out, state):  # type: ignore[no-untyped-def]
    """Running statistics of float64 values, in CUDA C++ (kernels/stream_stats.cu)."""
    return False


async def test_cuda_cxx_stream_stats_kernel_through_the_runtime() -> None:
    pytest.importorskip("cupy")
    from pydotcompute.runtime.runtime import RingKernelRuntime

    values = np.random.default_rng(1).normal(3.0, 2.0, 10000)
    extra = {"cuda_source": "stream_stats.cu", "cuda_function": "pdc_stream_stats",
             "threads": 128}  # fmt: skip
    async with RingKernelRuntime() as rt:
        await rt.launch("stats", stream_stats, backend="cuda",
                        input_type=np.dtype(np.float64), queue_size=4096, extra=extra)  # fmt: skip
        await rt.activate("stats")
        assert await rt.send_batch("stats", values, timeout=20) == len(values)
        deadline = time.monotonic() + 20
        while rt.get_telemetry("stats").messages_processed < len(values):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        words = rt.read_state("stats")
        mean, m2, lo, hi = words[1:5].view(np.float64)
        assert int(words[0]) == len(values)
        assert np.isclose(mean, values.mean()) and np.isclose(m2 / len(values), values.var())
        assert lo == values.min() and hi == values.max()
        await rt.terminate("stats")
        assert rt.get_state("stats").name == "TERMINATED"


def does_not_type(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x + "one"
    return True


async def test_a_handler_that_does_not_compile_fails_the_launch_and_shuts_down() -> None:
    from pydotcompute.errors import KernelFailedError
    from pydotcompute.runtime.runtime import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        with pytest.raises(KernelFailedError, match="does not compile"):
            await rt.launch("bad", does_not_type, backend="cuda", input_type=REC,
                            output_type=REC)  # fmt: skip
        assert rt.get_state("bad").name == "FAILED"
    # leaving the runtime terminated the failed kernel without waiting on a launch


_FREES_SCRIPT = """
import asyncio, gc, numpy as np
from numba import cuda
from pydotcompute.runtime.runtime import RingKernelRuntime
REC = np.dtype([("x", "<f8"), ("seq", "<i8")])
def only_x(msg, out, state):
    out.x = msg.x  # seq stays as the zeroed output record has it
    return True
async def main():
    async with RingKernelRuntime() as rt:
        await rt.launch("x", only_x, backend="cuda", input_type=REC, output_type=REC)
        await rt.activate("x")
        pending = cuda.current_context().deallocations
        # Device and pinned memory dropped beside the resident kernel, and numba told
        # to free it: cuMemFree/cuMemFreeHost could wait for the device to go idle.
        for _ in range(8):
            junk = [cuda.to_device(np.full(1 << 16, -1, np.int64)) for _ in range(32)]
            pinned = [cuda.pinned_array(1 << 16, np.uint8) for _ in range(4)]
            del junk, pinned
            gc.collect()
            pending.clear()
        print("HELD", len(pending) > 0)
        import cupy as cp
        for _ in range(8):
            a = cp.arange(1 << 20, dtype=cp.float64)
            del a  # back to CuPy's pool: nothing is freed
        # the kernel's own buffers are intact: outputs are right
        recs = np.zeros(256, REC)
        recs["x"] = np.arange(256.0)
        recs["seq"] = 7
        await rt.send_batch("x", recs, timeout=10)
        got = []
        while sum(len(g) for g in got) < 256:
            got.append(await rt.receive_batch("x", 256, timeout=10))
        out = np.concatenate(got)
        print("OUT", bool(np.all(out["seq"] == 0) and np.array_equal(out["x"], np.arange(256.0))))
        await rt.terminate("x")
        print("FREED AFTER EXIT", len(pending) == 0)
asyncio.run(main())
"""


def test_frees_beside_a_resident_kernel_neither_hang_nor_corrupt() -> None:
    import subprocess
    import sys
    from pathlib import Path

    try:
        proc = subprocess.run([sys.executable, "-c", _FREES_SCRIPT], capture_output=True,
                              text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"a free hung beside a resident ring kernel: {exc.stdout!r} {exc.stderr!r}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "HELD True" in proc.stdout and "OUT True" in proc.stdout
    assert "FREED AFTER EXIT True" in proc.stdout


_BESIDE_SCRIPT = """
import asyncio, warnings, numpy as np
from numba import cuda
from pydotcompute.runtime.runtime import RingKernelRuntime
REC = np.dtype([("x", "<f8"), ("seq", "<i8")])
def affine(msg, out, state):
    out.x = 2.0 * msg.x + 1.0
    out.seq = msg.seq
    return True
async def main():
    async with RingKernelRuntime() as rt:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            await rt.launch("r", affine, backend="cuda", input_type=REC, output_type=REC)
        print("LAZY WARNINGS", sum("lazily" in str(w.message) for w in seen))
        await rt.activate("r")
        if {other}:
            @cuda.jit
            def bump(a):  # compiled and loaded only now, beside the resident kernel
                i = cuda.grid(1)
                if i < a.size:
                    a[i] += 1.0
            stream = cuda.stream()
            a = cuda.to_device(np.zeros(1 << 16), stream=stream)
            bump[(1 << 16) // 256, 256, stream](a)
            stream.synchronize()
            import cupy as cp
            s = float((cp.arange(1 << 16, dtype=cp.float64) * 2).sum())  # default stream
            print("OTHER WORK DONE", a.copy_to_host().sum(), s)
        await rt.send_batch("r", np.zeros(4, REC), timeout=10)
        print("ECHO", len(await rt.receive_batch("r", 4, timeout=10)))
asyncio.run(main())
"""


def _run_beside(other: bool, **env: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    child_env = {k: v for k, v in os.environ.items() if k != "CUDA_MODULE_LOADING"}
    child_env.update(env)
    try:
        proc = subprocess.run([sys.executable, "-c", _BESIDE_SCRIPT.format(other=other)],
                              capture_output=True, text=True, timeout=90, env=child_env,
                              cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung beside a resident ring kernel: {exc.stdout!r} {exc.stderr!r}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


def test_new_kernels_run_beside_a_resident_ring_kernel() -> None:
    # A kernel loaded for the first time while a ring kernel is resident: with CUDA's
    # lazy module loading its first launch waits for the device to go idle, forever.
    out = _run_beside(True)
    assert "LAZY WARNINGS 0" in out
    assert f"OTHER WORK DONE {float(1 << 16)} {float((1 << 16) * ((1 << 16) - 1))}" in out
    assert "ECHO 4" in out


def test_lazy_module_loading_is_warned_at_launch() -> None:
    out = _run_beside(False, CUDA_MODULE_LOADING="LAZY")
    assert "LAZY WARNINGS 1" in out and "ECHO 4" in out


async def test_a_device_wide_synchronize_is_refused_beside_a_ring_kernel() -> None:
    from pydotcompute.errors import KernelStateError
    from pydotcompute.memory import Accelerator
    from pydotcompute.runtime.runtime import RingKernelRuntime

    acc = Accelerator()
    async with RingKernelRuntime() as rt:
        await rt.launch("r", affine, backend="cuda", input_type=REC, output_type=REC)
        with pytest.raises(KernelStateError, match="'r'"):
            acc.synchronize(0)  # cudaDeviceSynchronize would never return
        await rt.terminate("r")
        acc.synchronize(0)
