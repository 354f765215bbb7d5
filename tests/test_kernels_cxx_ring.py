"""kernels/ring.cuh built for the CPU, driven against the Numba host ring on one buffer.

The C++ side is ``kernels/ring_host.cpp`` compiled with the system C++20 compiler
into a shared library and called through ctypes (which releases the GIL, so a C++
thread and a Numba caller really run at the same time).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pydotcompute.backends.cuda_source import SourceControl
from pydotcompute.backends.kernel_sources import kernels_dir
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.rings.control import ControlBlock
from pydotcompute.rings.host_ring import HostRing
from pydotcompute.rings.layout import (
    HEADER_SIZE,
    OFF_CLAIM,
    OFF_DROP_BEFORE,
    OFF_PUBLISHED,
    OFF_RELEASED,
    OFF_RESERVE,
    RingSide,
    init_ring,
    ring_nbytes,
)

HOST, DEVICE = int(RingSide.HOST), int(RingSide.DEVICE)
BLOCK, REJECT, DROP_OLDEST, DROP_NEWEST = (int(s) for s in BackpressureStrategy)
NOT_THIS_ROLE = -100

# A record with padding inside the slot (12 bytes in a 16-byte slot), as in the
# protocol's worked example.
RECORD = np.dtype([("id", "<u4"), ("x", "<f8")])
# The streaming helpers put a u64 sequence number first.
SEQ_RECORD = np.dtype([("seq", "<u8"), ("payload", "<u4")])

_CXX20_PROBE = """
#include <atomic>
int main() { unsigned long long v = 0; std::atomic_ref<unsigned long long> r(v);
             r.store(1, std::memory_order_release); return int(r.load()) - 1; }
"""


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler found (g++, clang++ or $CXX); C++20 is needed")
    work = tmp_path_factory.mktemp("ring_cxx")
    probe = work / "probe.cpp"
    probe.write_text(_CXX20_PROBE)
    check = subprocess.run(
        [cxx, "-std=c++20", str(probe), "-o", str(work / "probe")],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        pytest.skip(f"{cxx} cannot build C++20 std::atomic_ref: {check.stderr.strip()[:300]}")
    target = work / "libpdcring.so"
    build = subprocess.run(
        [cxx, "-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
         str(kernels_dir() / "ring_host.cpp"), "-o", str(target)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    return _bind(ctypes.CDLL(str(target)))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    u64, ptr, i64 = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_longlong
    lib.pdc_ring_init.argtypes = [ptr, u64, u64, u64, u64, u64, u64]
    lib.pdc_ring_init.restype = ctypes.c_int
    lib.pdc_ring_check.argtypes = [ptr, u64]
    lib.pdc_ring_check.restype = ctypes.c_int
    lib.pdc_ring_init_side_counters.argtypes = [ptr, u64, u64, ptr]
    lib.pdc_ring_init_side_counters.restype = None
    lib.pdc_ring_side_counters_words.argtypes = []
    lib.pdc_ring_side_counters_words.restype = u64
    lib.pdc_ring_seal.argtypes = [u64, ptr, u64]
    lib.pdc_ring_seal.restype = u64
    lib.pdc_ring_mirror_counters.argtypes = [ptr, u64, u64, ptr]
    lib.pdc_ring_mirror_counters.restype = i64
    lib.pdc_ring_discard_stale.argtypes = [ptr, u64, u64, ptr]
    lib.pdc_ring_discard_stale.restype = i64
    lib.pdc_ring_try_push.argtypes = [ptr, u64, u64, ptr, ptr, u64]
    lib.pdc_ring_try_push.restype = i64
    lib.pdc_ring_push.argtypes = [ptr, u64, u64, ptr, ptr, u64, u64]
    lib.pdc_ring_push.restype = i64
    lib.pdc_ring_pop.argtypes = [ptr, u64, u64, ptr, ptr, u64]
    lib.pdc_ring_pop.restype = i64
    lib.pdc_ring_depth.argtypes = [ptr, u64]
    lib.pdc_ring_depth.restype = i64
    lib.pdc_ring_produce_sequence.argtypes = [ptr, u64, u64, ptr, u64, u64, u64]
    lib.pdc_ring_produce_sequence.restype = i64
    lib.pdc_ring_consume_sequence.argtypes = [ptr, u64, u64, ptr, u64, u64]
    lib.pdc_ring_consume_sequence.restype = i64
    return lib


class CxxParty:
    """One party (host or device side) driving a ring buffer through ring.cuh."""

    def __init__(self, lib: ctypes.CDLL, buf: np.ndarray, dtype: np.dtype, side: int = HOST):
        self.lib, self.buf, self.dtype, self.side = lib, buf, np.dtype(dtype), side
        # A device party's own words: reserve/claim, its reading of released, its
        # counters (device memory on a GPU).
        self.side_counters = np.zeros(lib.pdc_ring_side_counters_words(), dtype=np.uint64)
        counters = self.side_counters.ctypes.data if side == DEVICE else None
        self.args = (buf.ctypes.data, buf.nbytes, side, counters)
        if side == DEVICE:
            lib.pdc_ring_init_side_counters(*self.args)

    def try_push(self, records: np.ndarray) -> int:
        records = np.ascontiguousarray(records, dtype=self.dtype)
        return self.lib.pdc_ring_try_push(*self.args, records.ctypes.data, records.size)

    def push(self, records: np.ndarray, max_polls: int = 0) -> int:
        records = np.ascontiguousarray(records, dtype=self.dtype)
        return self.lib.pdc_ring_push(*self.args, records.ctypes.data, records.size, max_polls)

    def pop(self, max_n: int) -> np.ndarray:
        out = np.zeros(max_n, dtype=self.dtype)
        got = self.lib.pdc_ring_pop(*self.args, out.ctypes.data, max_n)
        assert got >= 0, f"pop failed with {got}"
        return out[:got]

    def mirror(self) -> None:
        """Publish a device party's counters into the header now (a device does it
        about once a millisecond)."""
        assert self.lib.pdc_ring_mirror_counters(*self.args) == 0


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.zeros(nbytes + 128, dtype=np.uint8)
    start = -raw.ctypes.data % 128
    return raw[start : start + nbytes]


def _words(buf: np.ndarray) -> np.ndarray:
    return buf[:HEADER_SIZE].view("<u8")


def _records(ids: list[int] | range) -> np.ndarray:
    out = np.zeros(len(ids), dtype=RECORD)
    out["id"] = list(ids)
    out["x"] = [i + 0.5 for i in ids]
    return out


def _cxx_ring(lib: ctypes.CDLL, capacity: int, dtype: np.dtype, strategy: int,
              producer: int = HOST, consumer: int = HOST) -> np.ndarray:  # fmt: skip
    buf = _aligned(ring_nbytes(capacity, np.dtype(dtype).itemsize, producer != consumer))
    status = lib.pdc_ring_init(buf.ctypes.data, buf.nbytes, capacity, np.dtype(dtype).itemsize,
                               strategy, producer, consumer)  # fmt: skip
    assert status == 0
    return buf


# --- layout ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(BackpressureStrategy))
@pytest.mark.parametrize("sides", [(HOST, HOST), (HOST, DEVICE), (DEVICE, HOST)])
def test_cxx_and_python_write_the_same_header(lib, strategy, sides) -> None:
    cxx = _cxx_ring(lib, 8, RECORD, int(strategy), *sides)
    py = _aligned(ring_nbytes(8, RECORD.itemsize, sides[0] != sides[1]))
    py[:] = 0xFF  # init must clear the tags of a crossing ring
    init_ring(py, 8, RECORD.itemsize, strategy, RingSide(sides[0]), RingSide(sides[1]))
    assert bytes(cxx) == bytes(py[: cxx.nbytes]) or sides[0] == sides[1]
    assert bytes(cxx[:HEADER_SIZE]) == bytes(py[:HEADER_SIZE])
    assert bytes(cxx[:8]) == b"PDCRING1"
    assert lib.pdc_ring_check(py.ctypes.data, py.nbytes) == 0
    HostRing.attach(cxx, RECORD)  # the Python side accepts the C++ header


def test_cxx_rejects_bad_headers(lib) -> None:
    good = _cxx_ring(lib, 4, RECORD, BLOCK)
    assert lib.pdc_ring_check(good.ctypes.data, good.nbytes - 1) == 6  # too short

    def broken(offset: int, value: int) -> int:
        buf = good.copy()
        _words(buf)[offset // 8] = value
        return lib.pdc_ring_check(buf.ctypes.data, buf.nbytes)

    assert broken(0, 0) == 1  # magic
    assert broken(8, 1) == 2  # version 1
    assert broken(72, 8) == 10  # record offset of a crossing ring on a one-sided one
    assert broken(16, 512) == 3  # header size
    assert broken(24, 3) == 4  # capacity not a power of two
    assert broken(32, 12) == 5  # slot size not a multiple of 8
    assert broken(48, 4) == 7  # backpressure out of range
    assert lib.pdc_ring_init(good.ctypes.data, good.nbytes, 6, 12, 0, 0, 0) == 4
    assert lib.pdc_ring_init(good.ctypes.data + 4, good.nbytes - 4, 4, 12, 0, 0, 0) == 9
    exact = ring_nbytes(4, RECORD.itemsize)
    assert lib.pdc_ring_init(good.ctypes.data, exact - 1, 4, 12, 0, 0, 0) == 6
    assert lib.pdc_ring_init(good.ctypes.data, exact, 4, 12, 0, 0, 0) == 0


def test_roles_are_enforced(lib) -> None:
    buf = _cxx_ring(lib, 4, RECORD, BLOCK, HOST, DEVICE)
    host, device = CxxParty(lib, buf, RECORD, HOST), CxxParty(lib, buf, RECORD, DEVICE)
    assert host.try_push(_records([1])) == 1
    assert device.try_push(_records([2])) == NOT_THIS_ROLE
    assert lib.pdc_ring_pop(*host.args, host.side_counters.ctypes.data, 1) == NOT_THIS_ROLE
    no_counters = (buf.ctypes.data, buf.nbytes, DEVICE, None)
    assert lib.pdc_ring_pop(*no_counters, host.side_counters.ctypes.data, 1) == -8
    assert device.pop(4)["id"].tolist() == [1]


# --- the worked example of the protocol document, both ways --------------------------


def _indices(buf: np.ndarray) -> tuple[int, int, int, int]:
    w = _words(buf)
    return tuple(int(w[o // 8]) for o in (OFF_RESERVE, OFF_PUBLISHED, OFF_CLAIM, OFF_RELEASED))


def test_worked_example_cxx_produces_numba_consumes(lib) -> None:
    buf = _cxx_ring(lib, 4, RECORD, DROP_NEWEST)
    cxx, numba_ring = CxxParty(lib, buf, RECORD), HostRing.attach(buf, RECORD)
    assert cxx.push(_records([1, 2, 3])) == 3  # A B C
    assert _indices(buf) == (3, 3, 0, 0)
    assert numba_ring.pop_batch(2)["id"].tolist() == [1, 2]
    assert _indices(buf) == (3, 3, 2, 2)
    assert cxx.push(_records([4, 5, 6, 7])) == 3  # D E F fit, G is dropped
    assert _indices(buf) == (6, 6, 2, 2)
    got = numba_ring.pop_batch(8)  # C D E F: wraps from slot 3 to slot 0
    assert got["id"].tolist() == [3, 4, 5, 6] and got["x"].tolist() == [3.5, 4.5, 5.5, 6.5]
    c = numba_ring.counters()
    assert (c.enqueued, c.dequeued, c.dropped_newest, c.high_water) == (6, 6, 1, 4)
    assert _indices(buf) == (6, 6, 6, 6)


def test_worked_example_numba_produces_cxx_consumes(lib) -> None:
    numba_ring = HostRing(4, RECORD, backpressure=BackpressureStrategy.DROP_NEWEST)
    buf = numba_ring.buffer
    cxx = CxxParty(lib, buf, RECORD)
    assert numba_ring.try_push_batch(_records([1, 2, 3])) == 3
    assert cxx.pop(2)["id"].tolist() == [1, 2]
    assert numba_ring.try_push_batch(_records([4, 5, 6, 7])) == 3
    assert _indices(buf) == (6, 6, 2, 2)
    assert cxx.pop(8)["id"].tolist() == [3, 4, 5, 6]
    c = numba_ring.counters()
    assert (c.enqueued, c.dequeued, c.dropped_newest, c.high_water) == (6, 6, 1, 4)


# --- full ring, wrap-around, alternating implementations ----------------------------


def test_full_ring_both_ways_on_one_buffer(lib) -> None:
    buf = _cxx_ring(lib, 8, RECORD, REJECT)
    cxx, numba_ring = CxxParty(lib, buf, RECORD), HostRing.attach(buf, RECORD)
    assert cxx.push(_records(range(8))) == 8
    assert lib.pdc_ring_depth(buf.ctypes.data, buf.nbytes) == 8
    assert cxx.push(_records([100])) == 0  # full: REJECT counts it
    assert numba_ring.try_push_batch(_records([101, 102])) == 0  # full for Numba too
    assert numba_ring.counters().rejected == 3
    assert numba_ring.pop_batch(8)["id"].tolist() == list(range(8))
    # The other direction on the same buffer, continuing the positions.
    assert numba_ring.try_push_batch(_records(range(10, 18))) == 8
    assert cxx.try_push(_records([99])) == 0
    assert cxx.pop(16)["id"].tolist() == list(range(10, 18))
    c = numba_ring.counters()
    assert (c.published, c.released, c.enqueued, c.dequeued, c.high_water) == (16, 16, 16, 16, 8)


@pytest.mark.parametrize("direction", ["cxx->numba", "numba->cxx"])
def test_random_batches_wrap_many_times(lib, direction: str) -> None:
    rng = np.random.default_rng(7)
    buf = _cxx_ring(lib, 16, RECORD, REJECT)
    cxx, numba_ring = CxxParty(lib, buf, RECORD), HostRing.attach(buf, RECORD)
    if direction == "cxx->numba":
        push, pop = cxx.try_push, lambda n: numba_ring.pop_batch(n)
    else:
        push, pop = numba_ring.try_push_batch, cxx.pop
    sent: list[int] = []
    received: list[int] = []
    next_id = 0
    for _ in range(400):
        n = int(rng.integers(1, 24))
        placed = push(_records(range(next_id, next_id + n)))
        assert 0 <= placed <= n
        sent.extend(range(next_id, next_id + placed))
        next_id += placed
        received.extend(pop(int(rng.integers(1, 24)))["id"].tolist())
    received.extend(pop(16)["id"].tolist())
    assert received == sent and len(sent) > 16 * 50  # dozens of wrap-arounds
    c = numba_ring.counters()
    assert c.enqueued == c.dequeued == len(sent) and c.depth == 0


def test_producers_of_both_implementations_share_a_ring(lib) -> None:
    buf = _cxx_ring(lib, 8, RECORD, BLOCK)
    cxx, numba_ring = CxxParty(lib, buf, RECORD), HostRing.attach(buf, RECORD)
    for i in range(0, 60, 3):
        assert cxx.try_push(_records([i])) == 1
        assert numba_ring.try_push_batch(_records([i + 1])) == 1
        assert cxx.try_push(_records([i + 2])) == 1
        half = cxx.pop(2)["id"].tolist() + numba_ring.pop_batch(1)["id"].tolist()
        assert half == [i, i + 1, i + 2]


# --- backpressure across implementations -------------------------------------------


def test_drop_oldest_same_side_cxx_evicts(lib) -> None:
    buf = _cxx_ring(lib, 4, RECORD, DROP_OLDEST)
    cxx, numba_ring = CxxParty(lib, buf, RECORD), HostRing.attach(buf, RECORD)
    assert numba_ring.try_push_batch(_records([1, 2, 3, 4])) == 4
    assert cxx.push(_records([5, 6])) == 2  # evicts 1 and 2
    assert cxx.push(_records(range(10, 16))) == 4  # larger than the ring: keeps the last 4
    assert numba_ring.pop_batch(8)["id"].tolist() == [12, 13, 14, 15]
    c = numba_ring.counters()
    assert c.dropped_oldest == 2 + 4 + 2 and c.enqueued == 10 and c.dequeued == 4


def test_block_gives_up_after_max_polls_and_counts(lib) -> None:
    buf = _cxx_ring(lib, 4, RECORD, BLOCK)
    cxx, numba_ring = CxxParty(lib, buf, RECORD), HostRing.attach(buf, RECORD)
    assert cxx.push(_records(range(6)), max_polls=50) == 4
    c = numba_ring.counters()
    assert c.rejected == 2 and c.enqueued == 4


def test_drop_oldest_across_sides_watermark(lib) -> None:
    """Host producer (Numba) raises drop_before; the device-side consumer (C++, with
    its claim counter apart from the header) discards the stale records."""
    numba_ring = HostRing(
        4,
        RECORD,
        backpressure=BackpressureStrategy.DROP_OLDEST,
        consumer_side=RingSide.DEVICE,
    )
    buf = numba_ring.buffer
    device = CxxParty(lib, buf, RECORD, DEVICE)
    assert numba_ring.try_push_batch(_records([1, 2, 3])) == 3
    assert device.pop(2)["id"].tolist() == [1, 2]
    assert numba_ring.try_push_batch(_records([4, 5, 6, 7])) == 3  # G waits
    assert int(_words(buf)[OFF_DROP_BEFORE // 8]) == 3  # 6 + 1 - 4, as in the example
    # Claims position 2 (C), finds it stale, skips it and goes on to deliver D.
    assert device.pop(1)["id"].tolist() == [4]
    assert numba_ring.counters().dropped_oldest == 0  # kept in device memory until
    device.mirror()  # the device mirrors its counters
    assert numba_ring.counters().dropped_oldest == 1
    assert numba_ring.try_push_batch(_records([7])) == 1
    assert device.pop(8)["id"].tolist() == [5, 6, 7]
    assert int(_words(buf)[OFF_CLAIM // 8]) == 0, "a device consumer never writes line 4"
    assert int(device.side_counters[1]) == int(_words(buf)[OFF_RELEASED // 8]) == 7


def test_drop_oldest_across_sides_cxx_producer_degrades_to_drop_newest(lib) -> None:
    """With nobody consuming, a cross-side DROP_OLDEST producer gives up after its
    polls and counts the records it could not place as dropped_newest."""
    buf = _cxx_ring(lib, 4, RECORD, DROP_OLDEST, HOST, DEVICE)
    cxx = CxxParty(lib, buf, RECORD)
    assert cxx.push(_records(range(6)), max_polls=20) == 4
    numba_view = HostRing.attach(buf, RECORD)
    c = numba_view.counters()
    assert c.dropped_newest == 2 and c.drop_before == 2  # reserve 4 + 2 - 4
    device = CxxParty(lib, buf, RECORD, DEVICE)
    assert device.pop(8)["id"].tolist() == [2, 3]
    device.mirror()
    assert numba_view.counters().dropped_oldest == 2


# --- tags on crossing rings (protocol 4.4) ------------------------------------------


def test_cxx_seal_is_the_compiled_one(lib) -> None:
    from pydotcompute.rings.host_ops import ring_seal

    rng = np.random.default_rng(11)
    for rs in (1, 5, 8, 12, 16, 23, 64):
        for pos in (0, 1, 7, 1 << 33):
            data = _aligned(72)
            data[:] = rng.integers(0, 256, 72)
            expected = int(ring_seal(data, 8, rs, pos)) & ((1 << 64) - 1)
            assert lib.pdc_ring_seal(pos, data.ctypes.data + 8, rs) == expected
            # at any address: the C++ seal reads bytes where words are misaligned
            assert lib.pdc_ring_seal(pos, data.ctypes.data + 3, rs) == int(
                ring_seal(np.concatenate([data[3:], np.zeros(8, np.uint8)]), 0, rs, pos)
            ) & ((1 << 64) - 1)


@pytest.mark.parametrize("direction", ["host->device", "device->host"])
def test_tagged_slots_across_implementations(lib, direction: str) -> None:
    """The side on the host is Numba, the device's side C++ (its counters in 'device
    memory'), on one crossing ring, many wrap-arounds: every record arrives in order
    and the device's counters reach the header when it mirrors them."""
    rng = np.random.default_rng(5)
    producer, consumer = (HOST, DEVICE) if direction == "host->device" else (DEVICE, HOST)
    numba_ring = HostRing(8, RECORD, backpressure=BackpressureStrategy.REJECT,
                          producer_side=RingSide(producer), consumer_side=RingSide(consumer))  # fmt: skip
    device = CxxParty(lib, numba_ring.buffer, RECORD, DEVICE)
    if direction == "host->device":
        push, pop = numba_ring.try_push_batch, device.pop
    else:
        push, pop = device.try_push, lambda n: numba_ring.pop_batch(n)
    sent: list[int] = []
    received: list[int] = []
    for _ in range(300):
        n = int(rng.integers(1, 12))
        placed = push(_records(range(len(sent), len(sent) + n)))
        sent.extend(range(len(sent), len(sent) + placed))
        received.extend(pop(int(rng.integers(1, 12)))["id"].tolist())
    received.extend(pop(16)["id"].tolist())
    assert received == sent and len(sent) > 8 * 40
    device.mirror()
    c = numba_ring.counters()
    assert c.enqueued == c.dequeued == len(sent) and c.released == len(sent)
    if direction == "device->host":
        assert c.published == len(sent)  # mirrored, not kept in order by the device
        assert int(_words(numba_ring.buffer)[OFF_RESERVE // 8]) == 0  # reserve lives apart


def test_cxx_consumer_takes_only_sealed_slots(lib) -> None:
    numba_ring = HostRing(4, RECORD, consumer_side=RingSide.DEVICE)
    device = CxxParty(lib, numba_ring.buffer, RECORD, DEVICE)
    numba_ring.try_push_batch(_records([1, 2]))
    slot1 = HEADER_SIZE + 24
    numba_ring.buffer[slot1 + 12] ^= 0x40  # the record changes after its tag
    assert device.pop(4)["id"].tolist() == [1]
    assert device.pop(4).size == 0  # position 1 is not sealed: not there yet
    numba_ring.buffer[slot1 + 12] ^= 0x40
    assert device.pop(4)["id"].tolist() == [2]


def test_cxx_device_producer_reads_released_only_when_short(lib) -> None:
    numba_ring = HostRing(8, RECORD, producer_side=RingSide.DEVICE)
    device = CxxParty(lib, numba_ring.buffer, RECORD, DEVICE)
    assert device.try_push(_records(range(6))) == 6
    assert numba_ring.pop_batch(6)["id"].tolist() == list(range(6))
    assert device.try_push(_records([6, 7])) == 2  # room by its own reading: 8 - 6
    assert int(device.side_counters[2]) == 0  # released_seen: never re-read
    assert device.try_push(_records([8])) == 1  # short: reads released (6) once
    assert int(device.side_counters[2]) == 6
    assert numba_ring.pop_batch(8)["id"].tolist() == [6, 7, 8]


# --- both implementations running at the same time ---------------------------------


def _run_thread(target, *args) -> tuple[threading.Thread, list[int]]:  # type: ignore[no-untyped-def]
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(target(*args)), daemon=True)
    thread.start()
    return thread, result


def test_concurrent_cxx_producer_numba_consumer(lib) -> None:
    count = 50_000
    numba_ring = HostRing(16, SEQ_RECORD)
    buf = numba_ring.buffer
    thread, result = _run_thread(
        lib.pdc_ring_produce_sequence, buf.ctypes.data, buf.nbytes, HOST, None, 0, count, 5
    )
    received = np.empty(count, dtype=np.uint64)
    got = 0
    while got < count:
        batch = numba_ring.pop_batch(64, timeout=10.0)
        assert batch.size, "the C++ producer stalled"
        received[got : got + batch.size] = batch["seq"]
        got += batch.size
    thread.join(10)
    assert result == [count]
    np.testing.assert_array_equal(received, np.arange(count, dtype=np.uint64))
    assert numba_ring.counters().enqueued == count


def test_concurrent_numba_producer_cxx_consumer(lib) -> None:
    count = 50_000
    numba_ring = HostRing(16, SEQ_RECORD)
    buf = numba_ring.buffer
    thread, result = _run_thread(
        lib.pdc_ring_consume_sequence, buf.ctypes.data, buf.nbytes, HOST, None, 0, count
    )
    records = np.zeros(count, dtype=SEQ_RECORD)
    records["seq"] = np.arange(count)
    sent = 0
    while sent < count:
        sent += numba_ring.push_batch(records[sent : sent + 7], timeout=10.0)
    thread.join(10)
    assert not thread.is_alive()
    assert result == [0], f"{result} records arrived out of order"
    c = numba_ring.counters()
    assert c.dequeued == count and c.high_water <= 16


def test_concurrent_producers_of_both_implementations(lib) -> None:
    """Two C++ producer threads and a Numba producer thread feed one small ring at
    once; every record arrives exactly once and each producer's in its order."""
    count = 20_000
    starts = (0, 1 << 40, 2 << 40)
    numba_ring = HostRing(8, SEQ_RECORD)
    buf = numba_ring.buffer
    threads = [
        _run_thread(
            lib.pdc_ring_produce_sequence, buf.ctypes.data, buf.nbytes, HOST, None, s, count, 3
        )
        for s in starts[:2]
    ]
    records = np.zeros(count, dtype=SEQ_RECORD)
    records["seq"] = np.arange(count) + starts[2]

    def numba_producer() -> int:
        sent = 0
        while sent < count:
            sent += numba_ring.push_batch(records[sent : sent + 5], timeout=10.0)
        return sent

    threads.append(_run_thread(numba_producer))
    received = []
    got = 0
    while got < 3 * count:
        batch = numba_ring.pop_batch(64, timeout=10.0)
        assert batch.size, "a producer stalled"
        received.append(batch["seq"].copy())
        got += batch.size
    for thread, result in threads:
        thread.join(10)
        assert result == [count]
    seq = np.concatenate(received)
    for start in starts:
        mine = seq[(seq >= start) & (seq < start + count)]
        np.testing.assert_array_equal(mine, np.arange(count, dtype=np.uint64) + start)
    c = numba_ring.counters()
    assert c.enqueued == c.dequeued == 3 * count and c.high_water <= 8


# --- stream_stats.cu run on the CPU: one emulated thread block ------------------------

# Just enough of CUDA's execution model to run a single-block kernel on CPU threads:
# `__shared__` becomes a function-local static (one copy, shared by all threads, as
# in a block), `threadIdx` is per thread, `__syncthreads` is a barrier. The kernel
# source is compiled unchanged; ring.cuh takes its host (std::atomic_ref) path.
_BLOCK_EMULATION = """
#include <barrier>
#include <bit>
#include <cmath>
#include <thread>
#include <vector>
struct EmulatedDim3 { unsigned x, y, z; };
inline thread_local EmulatedDim3 threadIdx{0, 0, 0};
inline EmulatedDim3 blockDim{1, 1, 1};
inline std::barrier<>* emulated_block_barrier = nullptr;
#define __global__
#define __device__
#define __shared__ static
inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }
using std::fmax;
using std::fmin;
#include "stream_stats.cu"
extern "C" void run_block(unsigned threads, unsigned char* input, unsigned long long nbytes,
                          unsigned long long* control, void* side_counters) {
  blockDim.x = threads;
  std::barrier<> barrier(threads);
  emulated_block_barrier = &barrier;
  std::vector<std::thread> block;
  for (unsigned t = 0; t < threads; ++t)
    block.emplace_back([=] {
      threadIdx.x = t;
      pdc_stream_stats(input, nbytes, control,
                       static_cast<pdc::ring::SideCounters*>(side_counters));
    });
  for (auto& thread : block) thread.join();
}
"""


@pytest.fixture(scope="module")
def block(lib, tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    # `lib` first: it skips where no C++20 compiler exists.
    work = tmp_path_factory.mktemp("stream_stats_cpu")
    source = work / "stream_stats_cpu.cpp"
    source.write_text(_BLOCK_EMULATION)
    target = work / "libstreamstats.so"
    build = subprocess.run(
        [_compiler(), "-std=c++20", "-O2", "-shared", "-fPIC", f"-I{kernels_dir()}",
         str(source), "-o", str(target), "-pthread"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    emulated = ctypes.CDLL(str(target))
    u64, ptr = ctypes.c_uint64, ctypes.c_void_p
    emulated.run_block.argtypes = [ctypes.c_uint, ptr, u64, ptr, ptr]
    emulated.run_block.restype = None
    return emulated


class StreamStats:
    """The host side of a stream_stats launch (``ControlBlock``'s layout; the result
    words: top of the .cu)."""

    def __init__(self, block: ctypes.CDLL, ring_buffer: np.ndarray, threads: int = 32):
        self.control = np.zeros(SourceControl.NWORDS, dtype=np.uint64)
        self.side_counters = np.zeros(16, dtype=np.uint64)  # pdc::ring::SideCounters
        self.thread, _ = _run_thread(
            block.run_block,
            threads,
            ring_buffer.ctypes.data,
            ring_buffer.nbytes,
            self.control.ctypes.data,
            self.side_counters.ctypes.data,
        )

    def command(self, value: int) -> None:
        self.control[SourceControl.COMMAND] = value

    def status(self) -> tuple[int, int]:
        return int(self.control[SourceControl.STATUS]), int(self.control[SourceControl.ERROR])

    def counters(self) -> tuple[int, int, int]:
        c = self.control
        batches = ControlBlock.BATCHES // 8
        return int(c[SourceControl.PROCESSED]), int(c[SourceControl.IDLE_POLLS]), int(c[batches])

    def snapshot(self) -> tuple[int, float, float, float, float]:
        while True:
            seq = int(self.control[SourceControl.SEQ])
            fields = self.control[SourceControl.RESULTS : SourceControl.RESULTS + 5].copy()
            if seq % 2 == 0 and int(self.control[SourceControl.SEQ]) == seq:
                mean, m2, lo, hi = fields[1:].view(np.float64).tolist()
                return int(fields[0]), mean, m2, lo, hi

    def wait(self, predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "the kernel did not get there in time"
            time.sleep(0.001)

    def terminate(self) -> None:
        self.command(2)
        self.thread.join(20)
        assert not self.thread.is_alive(), "the kernel did not exit on terminate"


@pytest.fixture
def launch(block):  # type: ignore[no-untyped-def]
    """Start emulated kernels; whatever a test does, they are told to exit after it."""
    started: list[StreamStats] = []

    def start(ring_buffer: np.ndarray, threads: int = 32) -> StreamStats:
        started.append(StreamStats(block, ring_buffer, threads))
        return started[-1]

    yield start
    for kernel in started:
        kernel.terminate()


def test_stream_stats_kernel_on_cpu(launch) -> None:
    ring = HostRing(64, np.float64, consumer_side=RingSide.DEVICE)
    kernel = launch(ring.buffer)
    kernel.wait(lambda: kernel.status() == (1, 0))
    assert kernel.snapshot() == (0, 0.0, 0.0, float("inf"), float("-inf"))
    values = np.random.default_rng(5).normal(3.0, 1.5, 3000)
    values[17] = -40.0
    values[2500] = 55.5
    kernel.command(1)
    sent = 0
    while sent < values.size:
        sent += ring.push_batch(values[sent : sent + 50], timeout=10.0)
    kernel.wait(lambda: kernel.snapshot()[0] == values.size)
    count, mean, m2, lo, hi = kernel.snapshot()
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert m2 / count == pytest.approx(values.var(), rel=1e-10)
    assert (lo, hi) == (-40.0, 55.5)
    # Once the stream ends the kernel polls an empty ring. Before that it may never
    # have: a producer that stays ahead keeps every poll busy.
    kernel.wait(lambda: kernel.counters()[1] > 0)
    processed, idle_polls, batches = kernel.counters()
    assert processed == values.size and 1 <= batches <= values.size and idle_polls > 0
    # The heartbeat beats on every poll.
    assert int(kernel.control[SourceControl.HEARTBEAT]) > batches
    kernel.terminate()
    assert kernel.status() == (2, 0)  # exited cleanly
    c = ring.counters()
    assert c.dequeued == values.size and c.released == values.size
    assert int(kernel.side_counters[1]) == values.size  # the claim counter: device side
    assert int(_words(ring.buffer)[OFF_CLAIM // 8]) == 0


def test_stream_stats_paused_kernel_still_skips_stale_records(launch) -> None:
    ring = HostRing(
        8, np.float64, backpressure=BackpressureStrategy.DROP_OLDEST, consumer_side=RingSide.DEVICE
    )
    kernel = launch(ring.buffer)  # starts paused (command 0)
    kernel.wait(lambda: kernel.status()[0] == 1)
    assert ring.try_push_batch(np.arange(8.0)) == 8
    assert ring.try_push_batch(np.array([100.0, 101.0])) == 0  # raises drop_before to 2
    kernel.wait(lambda: ring.counters().dropped_oldest == 2)
    assert ring.try_push_batch(np.array([100.0, 101.0])) == 2
    assert kernel.snapshot()[0] == 0, "a paused kernel must not consume"
    kernel.command(1)
    kernel.wait(lambda: kernel.snapshot()[0] == 8)
    count, mean, _, lo, hi = kernel.snapshot()
    assert (lo, hi) == (2.0, 101.0) and mean == pytest.approx(np.mean([*range(2, 8), 100, 101]))
    kernel.terminate()


@pytest.mark.parametrize(
    "threads, record, sides, error",
    [
        (48, np.float64, (HOST, DEVICE), 101),  # not a power of two
        (32, np.float32, (HOST, DEVICE), 100),  # 4-byte records
        (32, np.float64, (HOST, HOST), 100),  # the kernel is not the consumer side
    ],
)
def test_stream_stats_refuses_what_it_cannot_run(launch, threads, record, sides, error) -> None:
    ring = HostRing(8, record, producer_side=RingSide(sides[0]), consumer_side=RingSide(sides[1]))
    kernel = launch(ring.buffer, threads)
    kernel.thread.join(20)
    assert kernel.status() == (3, error)


def test_stream_stats_refuses_a_buffer_that_is_not_a_ring(launch) -> None:
    kernel = launch(_aligned(2048))
    kernel.thread.join(20)
    assert kernel.status() == (3, 1)  # ring.cuh kBadMagic


# --- ring.cuh alone, under ThreadSanitizer ------------------------------------------

# Two host producers and two "device side" consumers (claim counter apart from the
# header) on a ring of 8. Every record must arrive once, each producer's in order,
# and ThreadSanitizer must see no data race on the slots: that is what the
# release/acquire pairs on `published` and `released` are for.
_MPMC_STRESS = """
#include "ring.cuh"
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>
using namespace pdc::ring;
int main() {
  const u64 cap = 8, rs = 16, n = 100000, producers = 2, consumers = 2;
  const u64 nbytes = ring_nbytes(cap, rs, true);  // host to device: a crossing ring
  std::vector<u64> memory(nbytes / 8);
  unsigned char* buf = reinterpret_cast<unsigned char*>(memory.data());
  if (ring_init(buf, nbytes, cap, rs, kBlock, kSideHost, kSideDevice) != kOk) return 2;
  SideCounters device{};
  Ring producer_view, consumer_view;
  if (ring_attach(&producer_view, buf, nbytes, kSideHost, nullptr) != kOk) return 3;
  if (ring_attach(&consumer_view, buf, nbytes, kSideDevice, &device) != kOk) return 4;
  ring_init_side_counters(consumer_view, &device);
  std::atomic<u64> sum{0}, received{0};
  std::vector<std::thread> threads;
  for (u64 p = 0; p < producers; ++p)
    threads.emplace_back([&, p] {
      for (u64 i = 0; i < n; ++i) {
        const u64 record[2] = {p, i};
        Backoff wait;
        while (ring_try_push(producer_view, record, 1) == 0) wait.pause();
      }
    });
  for (u64 c = 0; c < consumers; ++c)
    threads.emplace_back([&] {
      u64 last[2] = {~0ULL, ~0ULL};
      u64 records[2 * 4];
      while (received.load() < producers * n) {
        const u64 k = ring_pop(consumer_view, records, 4);
        for (u64 j = 0; j < k; ++j) {
          const u64 p = records[2 * j], i = records[2 * j + 1];
          if (last[p] != ~0ULL && i <= last[p]) std::abort();  // out of order
          last[p] = i;
          sum += i;
        }
        received += k;
        if (k == 0) std::this_thread::yield();
      }
    });
  for (auto& t : threads) t.join();
  ring_mirror_counters(consumer_view, true);  // the device side's counters, into the header
  const bool ok = sum.load() == producers * (n * (n - 1) / 2) &&
                  *ring_field(producer_view, kOffEnqueued) == producers * n &&
                  *ring_field(producer_view, kOffDequeued) == producers * n &&
                  *ring_field(producer_view, kOffHighWater) <= cap &&
                  ring_depth(producer_view) == 0;
  std::printf("%s high_water=%llu\\n", ok ? "ok" : "wrong",
              *ring_field(producer_view, kOffHighWater));
  return ok ? 0 : 1;
}
"""


def test_cxx_mpmc_under_thread_sanitizer(lib, tmp_path: Path) -> None:
    source = tmp_path / "mpmc.cpp"
    source.write_text(_MPMC_STRESS)
    exe = tmp_path / "mpmc"
    build = subprocess.run(
        [_compiler(), "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread",
         f"-I{kernels_dir()}", str(source), "-o", str(exe)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if build.returncode != 0 and "tsan" in build.stderr.lower():
        pytest.skip(f"no ThreadSanitizer runtime: {build.stderr.strip()[:200]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert "ThreadSanitizer" not in run.stderr, run.stderr[:4000]
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout + run.stderr[:2000]


# --- team-cooperative operations, with a team of CPU threads -------------------------

# On a GPU a team is a warp; here `lanes` threads play one, with a barrier for
# __syncwarp and a shared word for __shfl_sync/__ballot_sync. Every lane calls the
# operation; lane 0 claims, reserves, publishes and releases, all lanes copy words.
_TEAM_TU = """
#include "ring.cuh"
#include <barrier>
#include <thread>
#include <vector>
using namespace pdc::ring;
struct TeamShared {
  explicit TeamShared(unsigned n) : bar(n) {}
  std::barrier<> bar;
  u64 word = 0;
  bool flags[64] = {};
};
struct EmulatedTeam {
  TeamShared* s;
  unsigned r, n;
  unsigned rank() const { return r; }
  unsigned size() const { return n; }
  void sync() const { s->bar.arrive_and_wait(); }
  u64 broadcast(u64 v) const {
    if (r == 0) s->word = v;
    sync();
    const u64 x = s->word;
    sync();
    return x;
  }
  unsigned leading(bool pred) const {
    s->flags[r] = pred;
    sync();
    unsigned k = 0;
    while (k < n && s->flags[k]) ++k;
    sync();
    return k;
  }
};
template <class Op>
long long run_team(unsigned lanes, Op op) {
  TeamShared shared(lanes);
  std::vector<long long> got(lanes);
  std::vector<std::thread> threads;
  for (unsigned r = 0; r < lanes; ++r)
    threads.emplace_back([&, r] { got[r] = op(EmulatedTeam{&shared, r, lanes}); });
  for (auto& t : threads) t.join();
  for (unsigned r = 1; r < lanes; ++r)
    if (got[r] != got[0]) return -1000;  // every lane must agree on the result
  return got[0];
}
extern "C" long long team_pop(void* buf, u64 nbytes, u64 side, void* counters, void* out,
                              u64 max_n, unsigned lanes) {
  Ring r;
  if (ring_attach(&r, buf, nbytes, side, static_cast<SideCounters*>(counters)) != kOk) return -1;
  return run_team(lanes, [&](const EmulatedTeam& t) {
    return static_cast<long long>(ring_pop(t, r, out, max_n));
  });
}
extern "C" long long team_push(void* buf, u64 nbytes, u64 side, void* counters,
                               const void* records, u64 n, unsigned lanes) {
  Ring r;
  if (ring_attach(&r, buf, nbytes, side, static_cast<SideCounters*>(counters)) != kOk) return -1;
  return run_team(lanes, [&](const EmulatedTeam& t) {
    return static_cast<long long>(ring_push(t, r, records, n, 0));
  });
}
"""


@pytest.fixture(scope="module")
def team_lib(lib, tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    work = tmp_path_factory.mktemp("ring_team")
    source = work / "team.cpp"
    source.write_text(_TEAM_TU)
    target = work / "libteam.so"
    build = subprocess.run(
        [_compiler(), "-std=c++20", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-pthread",
         f"-I{kernels_dir()}", str(source), "-o", str(target)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    team = ctypes.CDLL(str(target))
    u64, ptr = ctypes.c_uint64, ctypes.c_void_p
    team.team_pop.argtypes = [ptr, u64, u64, ptr, ptr, u64, ctypes.c_uint]
    team.team_pop.restype = ctypes.c_longlong
    team.team_push.argtypes = [ptr, u64, u64, ptr, ptr, u64, ctypes.c_uint]
    team.team_push.restype = ctypes.c_longlong
    return team


@pytest.mark.parametrize("dtype", [RECORD, SEQ_RECORD, np.dtype([("v", "<u8", (5,))])])
def test_a_team_of_lanes_moves_batches_both_ways(lib, team_lib, dtype) -> None:
    """Records of 12, 16 and 40 bytes: words split across lanes, records across words."""
    rng = np.random.default_rng(9)

    def batch(start: int, n: int) -> np.ndarray:
        out = np.zeros(n, dtype)
        raw = out.view(np.uint8).reshape(n, -1)
        raw[:] = rng.integers(0, 256, raw.shape)
        return out

    # host -> device: Numba produces, a 4-lane "warp" consumes
    down = HostRing(16, dtype, backpressure=BackpressureStrategy.REJECT,
                    consumer_side=RingSide.DEVICE)  # fmt: skip
    device = CxxParty(lib, down.buffer, dtype, DEVICE)
    # device -> host: a 4-lane "warp" produces, Numba consumes
    up = HostRing(
        16, dtype, producer_side=RingSide.DEVICE, backpressure=BackpressureStrategy.REJECT
    )
    producer = CxxParty(lib, up.buffer, dtype, DEVICE)
    sent_down, got_down, sent_up, got_up = [], [], [], []
    for _ in range(60):
        recs = batch(0, int(rng.integers(1, 12)))
        placed = down.try_push_batch(recs)
        sent_down.append(recs[:placed])
        out = np.zeros(16, dtype)
        k = team_lib.team_pop(*device.args, out.ctypes.data, int(rng.integers(1, 16)), 4)
        assert k >= 0
        got_down.append(out[:k])
        recs = batch(0, int(rng.integers(1, 12)))
        placed = team_lib.team_push(*producer.args, recs.ctypes.data, len(recs), 4)
        assert placed >= 0
        sent_up.append(recs[:placed])
        got_up.append(up.pop_batch(int(rng.integers(1, 16))))
    out = np.zeros(16, dtype)
    got_down.append(out[: team_lib.team_pop(*device.args, out.ctypes.data, 16, 4)])
    got_up.append(up.pop_batch(16))
    for sent, got in ((sent_down, got_down), (sent_up, got_up)):
        assert np.concatenate(sent).tobytes() == np.concatenate(got).tobytes()
    device.mirror()
    producer.mirror()
    assert down.counters().dequeued == sum(len(b) for b in sent_down)
    assert up.counters().enqueued == sum(len(b) for b in sent_up)
