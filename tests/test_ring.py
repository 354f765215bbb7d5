"""HostRing and the ring layout: single-threaded behaviour, against a model queue."""

from __future__ import annotations

import collections
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydotcompute.errors import InvalidConfigurationError, QueueFullError
from pydotcompute.rings import BackpressureStrategy, HostRing, RingSide
from pydotcompute.rings import layout as L
from pydotcompute.rings.host_ops import ring_pop

REC = np.dtype([("id", "<u4"), ("x", "<f8")])  # 12 bytes, packed: slot of 16
WORD = np.dtype([("v", "<u8"), ("w", "<u8")])  # 16 bytes: slot == record


def recs(ids, dtype=REC):
    a = np.zeros(len(ids), dtype)
    a[dtype.names[0]] = ids
    return a


def words(ring: HostRing, off: int) -> int:
    return int(ring.buffer[off : off + 8].view("<u8")[0])


def test_header_fields_at_documented_offsets():
    ring = HostRing(8, REC, backpressure="drop_oldest")
    b = ring.buffer
    assert b[:8].tobytes() == b"PDCRING1"
    assert words(ring, 8) == 2
    assert words(ring, 16) == 1024
    assert words(ring, 24) == 8
    assert words(ring, 32) == 16
    assert words(ring, 40) == 12
    assert words(ring, 48) == int(BackpressureStrategy.DROP_OLDEST) == 2
    assert words(ring, 56) == 0 and words(ring, 64) == 0 and words(ring, 72) == 0
    assert b.nbytes == 1024 + 8 * 16
    assert b.ctypes.data % 128 == 0


def test_a_crossing_ring_has_tagged_slots():
    ring = HostRing(8, REC, backpressure="drop_oldest", consumer_side=RingSide.DEVICE)
    assert words(ring, 56) == 0 and words(ring, 64) == 1
    assert words(ring, 72) == 8  # record_offset: the tag comes first
    assert words(ring, 32) == 24  # tag + 12 bytes rounded to 16
    assert ring.buffer.nbytes == 1024 + 8 * 24 and ring.crossing


def _seal(p: int, b: bytes) -> int:
    """seal() of protocol 4.4, written from the document in plain Python."""
    mask = (1 << 64) - 1
    b = b + bytes(-len(b) % 8)
    h = ((p + 1) * 0x9E3779B97F4A7C15) & mask
    for (x,) in struct.iter_unpack("<Q", b):
        h = ((h ^ x) * 0xBF58476D1CE4E5B9) & mask
        h ^= h >> 32
    h = ((h ^ (h >> 29)) * 0x94D049BB133111EB) & mask
    return h ^ (h >> 32)


def test_tags_of_the_documented_example():
    ring = HostRing(4, REC, consumer_side=RingSide.DEVICE)
    a = recs([7])
    a["x"] = 1.5
    ring.push(a)
    b = ring.buffer
    assert b[1024:1032].tobytes().hex(" ") == "56 72 c6 4d dd d9 ff 3b"
    assert b[1032:1044].tobytes() == bytes([7, 0, 0, 0]) + np.float64(1.5).tobytes()
    assert _seal(0, b[1032:1044].tobytes()) == 0x3BFFD9DD4DC67256
    assert _seal(4, b[1032:1044].tobytes()) == 0x59DBD5A66F5A3EF3


@given(
    rs=st.integers(1, 64), pos=st.integers(0, (1 << 62)), data=st.binary(min_size=64, max_size=64)
)
@settings(max_examples=200, deadline=None)
def test_the_compiled_seal_is_the_documented_one(rs, pos, data):
    from pydotcompute.rings.host_ops import ring_seal

    buf = L.aligned_buffer(80)
    buf[8:72] = np.frombuffer(data, np.uint8)
    assert int(ring_seal(buf, 8, rs, pos)) & ((1 << 64) - 1) == _seal(pos, data[:rs])


def test_a_pop_takes_only_sealed_slots():
    """A consumer on a crossing ring finds records by their tags: a record whose tag
    does not match (still being written, or torn) is not there yet; an old occupant
    of the slot is not taken for a newer position."""
    ring = HostRing(4, WORD, consumer_side=RingSide.DEVICE)
    ring.push_batch(recs([1, 2], WORD))
    b = ring.buffer
    slot1 = 1024 + 24
    b[slot1 + 8] ^= 1  # the record of position 1 changes after its tag was written
    out = np.zeros(4, WORD)
    assert ring_pop(b, out, 0, 4) == 1 and out["v"][0] == 1
    assert ring_pop(b, out, 0, 4) == 0  # position 1 is not sealed
    b[slot1 + 8] ^= 1
    assert ring_pop(b, out, 0, 4) == 1 and out["v"][0] == 2
    # Published (an index the consumer of a crossing ring does not need) says 2;
    # position 4 would use slot 0, which holds position 0: not sealed for 4.
    ring.push_batch(recs([3, 4], WORD))
    assert ring_pop(b, out, 0, 4) == 2 and list(out["v"][:2]) == [3, 4]
    assert ring_pop(b, out, 0, 4) == 0


def test_a_producer_reads_the_consumers_index_only_when_short_of_room():
    ring = HostRing(8, WORD)
    ring.push_batch(recs(range(6), WORD))
    assert words(ring, 264) == 0  # released_seen: not needed yet
    ring.pop_batch(6)
    ring.push_batch(recs(range(2), WORD))  # 8 - (6 - 0) = 2: fits by the cached 0
    assert words(ring, 264) == 0
    ring.push_batch(recs(range(3), WORD))  # short by the cache: reads released (6)
    assert words(ring, 264) == 6
    c = ring.counters()
    assert c.published == 11 and c.high_water == 8 - 0  # vouched by the cached reading


def test_worked_example_of_the_protocol_document():
    ring = HostRing(4, REC, backpressure="drop_newest")
    assert ring.push_batch(recs([ord(c) for c in "ABC"])) == 3
    assert (words(ring, 256), words(ring, 128)) == (3, 3)
    assert [chr(r["id"]) for r in ring.pop_batch(2)] == ["A", "B"]
    assert (words(ring, 512), words(ring, 384)) == (2, 2)
    assert ring.push_batch(recs([ord(c) for c in "DEFG"])) == 3
    # D in slot 3, E wrapped to slot 0, F in slot 1
    b = ring.buffer
    assert [int(b[off : off + 4].view("<u4")[0]) for off in (1072, 1024, 1040)] == [
        ord("D"),
        ord("E"),
        ord("F"),
    ]
    c = ring.counters()
    assert (c.enqueued, c.high_water, c.dropped_newest) == (6, 4, 1)
    assert [chr(r["id"]) for r in ring.pop_batch(8)] == list("CDEF")
    c = ring.counters()
    assert (c.published, c.released, c.dequeued) == (6, 6, 6)


def test_record_bytes_in_slot():
    ring = HostRing(4, REC)
    a = np.zeros(1, REC)
    a["id"], a["x"] = 7, 1.5
    ring.push(a)
    assert ring.buffer[1024:1036].tobytes() == bytes([7, 0, 0, 0]) + np.float64(1.5).tobytes()


@pytest.mark.parametrize("capacity", [0, 1, 3, 6])
def test_capacity_must_be_power_of_two(capacity):
    with pytest.raises(InvalidConfigurationError, match="power of two"):
        HostRing(capacity, REC)


def test_attach_validates_the_header():
    ring = HostRing(4, REC)
    twin = HostRing.attach(ring.buffer, REC)
    ring.push_batch(recs([1, 2]))
    assert list(twin.pop_batch(4)["id"]) == [1, 2]
    bad = ring.buffer.copy()
    bad[0] ^= 1
    with pytest.raises(InvalidConfigurationError, match="magic"):
        HostRing.attach(bad)
    with pytest.raises(InvalidConfigurationError, match="record size"):
        HostRing.attach(ring.buffer, WORD)
    with pytest.raises(InvalidConfigurationError, match="shorter"):
        HostRing.attach(ring.buffer[:1030])


def test_caller_buffer_is_used_in_place():
    backing = np.zeros(L.ring_nbytes(4, WORD.itemsize) + 64, np.uint8)
    ring = HostRing(4, WORD, buffer=backing[8 : 8 + L.ring_nbytes(4, WORD.itemsize)])
    ring.push_batch(recs([42], WORD))
    assert int(backing[8 + 1024 : 8 + 1032].view("<u8")[0]) == 42
    with pytest.raises(InvalidConfigurationError, match="too small"):
        HostRing(4, WORD, buffer=np.zeros(1024, np.uint8))
    with pytest.raises(InvalidConfigurationError, match="aligned"):
        HostRing(4, WORD, buffer=backing[1 : 1 + L.ring_nbytes(4, 16)])


def test_wrong_dtype_names_both():
    ring = HostRing(4, REC)
    with pytest.raises(TypeError) as e:
        ring.push_batch(np.zeros(2, WORD))
    assert str(REC) in str(e.value) and str(WORD) in str(e.value)
    untyped = HostRing(4, record_size=12)
    with pytest.raises(TypeError, match="12-byte"):
        untyped.push_batch(np.zeros(2, WORD))
    assert untyped.push_batch(np.zeros(2, REC)) == 2
    assert untyped.pop_batch(4).dtype.itemsize == 12


def test_block_batch_timeout_raises_with_count():
    ring = HostRing(2, WORD)
    with pytest.raises(QueueFullError, match="2 of 3"):
        ring.push_batch(recs([1, 2, 3], WORD), timeout=0.01)
    c = ring.counters()
    assert (c.enqueued, c.rejected) == (2, 1)
    with pytest.raises(QueueFullError):
        ring.push(recs([4], WORD), timeout=0)
    assert ring.counters().rejected == 2
    assert list(ring.pop_batch(4)["v"]) == [1, 2]


def test_reject_and_drop_newest_single_push():
    rej = HostRing(2, WORD, backpressure="reject")
    rej.push_batch(recs([1, 2], WORD))
    with pytest.raises(QueueFullError, match="rejected"):
        rej.push(recs([3], WORD))
    assert rej.counters().rejected == 1
    assert rej.push_batch(recs([3, 4], WORD)) == 0
    assert rej.counters().rejected == 3

    dn = HostRing(2, WORD, backpressure="drop_newest")
    assert dn.push_batch(recs([1, 2], WORD)) == 2
    assert dn.push(recs([3], WORD)) is False
    assert dn.counters().dropped_newest == 1
    assert list(dn.pop_batch(4)["v"]) == [1, 2]


def test_drop_oldest_same_side_keeps_newest():
    ring = HostRing(4, WORD, backpressure="drop_oldest")
    ring.push_batch(recs(range(3), WORD))
    assert ring.push_batch(recs(range(3, 9), WORD)) == 4  # larger than the ring
    c = ring.counters()
    assert c.dropped_oldest == 5  # 2 skipped in the batch, 3 evicted from the ring
    assert list(ring.pop_batch(8)["v"]) == [5, 6, 7, 8]
    assert ring.counters().dequeued == 4


def test_pop_timeout_returns_empty():
    ring = HostRing(2, WORD)
    assert len(ring.pop_batch(4, timeout=0.005)) == 0
    assert ring.pop(timeout=0) is None


def test_pop_into_requires_contiguous_out():
    ring = HostRing(4, WORD)
    ring.push_batch(recs([1, 2, 3], WORD))
    out = np.zeros(4, WORD)
    with pytest.raises(ValueError, match="contiguous"):
        ring.try_pop_into(out[::2])
    assert ring.try_pop_into(out) == 3
    assert list(out["v"][:3]) == [1, 2, 3]


def test_device_sides_cannot_be_driven_from_the_host():
    ring = HostRing(4, WORD, producer_side=RingSide.DEVICE)
    with pytest.raises(InvalidConfigurationError, match="producer side is the device"):
        ring.push_batch(recs([1], WORD))
    ring2 = HostRing(4, WORD, consumer_side=RingSide.DEVICE)
    with pytest.raises(InvalidConfigurationError, match="consumer side is the device"):
        ring2.pop_batch(1)


# -- the ring against a model queue ------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(1, 9)),
        st.tuples(st.just("pop"), st.integers(1, 9)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.sampled_from([2, 4, 8]),
    strategy=st.sampled_from(list(BackpressureStrategy)),
    program=ops,
)
def test_ring_matches_model_queue(capacity, strategy, program):
    ring = HostRing(capacity, WORD, backpressure=strategy)
    model: collections.deque[int] = collections.deque()
    nxt = 0
    enq = deq = rej = dnew = dold = 0
    for op, k in program:
        if op == "push":
            batch = recs(range(nxt, nxt + k), WORD)
            nxt += k
            room = capacity - len(model)
            if strategy is BackpressureStrategy.BLOCK:
                if k > room:
                    with pytest.raises(QueueFullError):
                        ring.push_batch(batch, timeout=0)
                else:
                    assert ring.push_batch(batch, timeout=0) == k
                fit = min(k, room)
                rej += k - fit
            elif strategy is BackpressureStrategy.DROP_OLDEST:
                vals = list(batch["v"])
                keep = vals[-capacity:]
                dold += len(vals) - len(keep)
                evict = max(0, len(model) + len(keep) - capacity)
                for _ in range(evict):
                    model.popleft()
                dold += evict
                assert ring.push_batch(batch) == len(keep)
                model.extend(keep)
                enq += len(keep)
                continue
            else:
                fit = min(k, room)
                assert ring.push_batch(batch) == fit
                if strategy is BackpressureStrategy.REJECT:
                    rej += k - fit
                else:
                    dnew += k - fit
            model.extend(batch["v"][:fit])
            enq += fit
        else:
            got = list(ring.pop_batch(k, timeout=0)["v"])
            want = [model.popleft() for _ in range(min(k, len(model)))]
            assert got == want
            deq += len(want)
        c = ring.counters()
        assert (c.enqueued, c.dequeued, c.rejected) == (enq, deq, rej)
        assert (c.dropped_newest, c.dropped_oldest) == (dnew, dold)
        assert c.depth == len(model)
        released, claim, published, reserve = ring._indices()
        assert released == claim <= published == reserve <= released + capacity
        assert c.high_water <= capacity


@pytest.mark.parametrize("dtype", ["V12", "<f8", [("s", "S5"), ("x", "<f4")]])
def test_any_fixed_size_dtype_round_trips(dtype):
    ring = HostRing(4, np.dtype(dtype))
    src = np.frombuffer(bytes(range(3 * ring.record_size)), np.dtype(dtype)).copy()
    assert ring.push_batch(src) == 3
    out = ring.pop_batch(4)
    assert out.dtype == src.dtype and out.tobytes() == src.tobytes()
