"""Record layouts: dtypes, conversions both ways, batches, refusals, and Numba access."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, TypeVar

import numba
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydotcompute.errors import InvalidConfigurationError, MessageSerializationError
from pydotcompute.messages import (
    RingKernelMessage,
    has_record_layout,
    message,
    messages_from_records,
    record_dtype_of,
    records_from_messages,
)


@message
class Tick:
    sensor: int
    value: float
    ok: bool = True


@message
class Rich:
    small: np.float32
    index: np.int32
    flag: np.uint8
    source: uuid.UUID
    vec: Annotated[np.ndarray, (4,), np.float32]
    grid: Annotated[np.ndarray, (2, 3), "i2"]
    z: np.complex64 = np.complex64(0)


@message
class Loose:
    name: str
    count: int = 0


def test_tick_dtype_header_first_and_aligned() -> None:
    dt = Tick.__record_dtype__
    assert dt == record_dtype_of(Tick)
    assert dt.names == ("message_id", "priority", "correlation_id", "sensor", "value", "ok")
    assert dt["message_id"] == np.dtype(("u1", 16))
    assert dt["priority"] == np.dtype(np.uint8)
    assert dt["correlation_id"] == np.dtype(("u1", 16))
    assert dt["sensor"] == np.dtype(np.int64)
    assert dt["value"] == np.dtype(np.float64)
    assert dt["ok"] == np.dtype(np.bool_)
    assert dt.isalignedstruct
    offsets = {name: dt.fields[name][1] for name in dt.names}
    assert offsets == {
        "message_id": 0,
        "priority": 16,
        "correlation_id": 17,
        "sensor": 40,  # 33 rounded up to int64's alignment
        "value": 48,
        "ok": 56,
    }
    assert dt.itemsize == 64  # rounded up to the largest alignment (8)


def test_rich_dtype_has_numpy_scalars_and_fixed_arrays() -> None:
    dt = Rich.__record_dtype__
    assert dt["small"] == np.dtype(np.float32)
    assert dt["index"] == np.dtype(np.int32)
    assert dt["flag"] == np.dtype(np.uint8)
    assert dt["source"] == np.dtype(("u1", 16))
    assert dt["vec"] == np.dtype((np.float32, (4,)))
    assert dt["grid"] == np.dtype((np.int16, (2, 3)))
    assert dt["z"] == np.dtype(np.complex64)
    for name in dt.names:
        base, offset = dt.fields[name][:2]
        assert offset % base.alignment == 0, name
    assert dt.itemsize % max(dt.fields[n][0].alignment for n in dt.names) == 0


def rich(**over: Any) -> Rich:
    fields: dict[str, Any] = dict(
        small=np.float32(1.5),
        index=np.int32(-7),
        flag=np.uint8(200),
        source=uuid.uuid4(),
        vec=np.arange(4, dtype=np.float32),
        grid=np.arange(6, dtype=np.int16).reshape(2, 3),
        z=np.complex64(1 - 2j),
        correlation_id=uuid.uuid4(),
        priority=3,
    )
    fields.update(over)
    return Rich(**fields)


def test_to_record_is_a_structured_scalar_and_from_record_restores() -> None:
    m = rich()
    rec = m.to_record()
    assert isinstance(rec, np.void) and rec.dtype == Rich.__record_dtype__
    assert bytes(rec["message_id"]) == m.message_id.bytes
    assert rec["priority"] == 3
    assert bytes(rec["correlation_id"]) == m.correlation_id.bytes
    np.testing.assert_array_equal(rec["grid"], m.grid)
    back = Rich.from_record(rec)
    assert back == m
    assert type(back.small) is np.float32 and type(back.index) is np.int32
    assert type(back.z) is np.complex64
    assert back.vec.flags.writeable


def test_none_correlation_is_all_zero_bytes() -> None:
    rec = Tick(1, 2.0).to_record()
    assert bytes(rec["correlation_id"]) == bytes(16)
    assert Tick.from_record(rec).correlation_id is None


def test_from_record_accepts_array_elements_and_0d_arrays() -> None:
    msgs = [Tick(i, i / 2, ok=bool(i % 2)) for i in range(5)]
    arr = records_from_messages(msgs)
    assert Tick.from_record(arr[3]) == msgs[3]
    assert Tick.from_record(np.array(arr[3])) == msgs[3]  # a 0-d structured array
    with pytest.raises(TypeError, match="expected one record, got an array of 5"):
        Tick.from_record(arr)


def test_from_record_rejects_another_dtype() -> None:
    with pytest.raises(TypeError, match=r"records of .*Rich have dtype .* got"):
        Rich.from_record(Tick(1, 1.0).to_record())
    with pytest.raises(TypeError, match="expected a numpy record"):
        Tick.from_record((1, 2))


def test_batches_roundtrip_and_match_single_records() -> None:
    msgs = [rich(index=np.int32(i), vec=np.full(4, i, np.float32)) for i in range(50)]
    arr = records_from_messages(msgs)
    assert arr.shape == (50,) and arr.dtype == Rich.__record_dtype__
    assert arr.flags.writeable
    assert arr[7].tobytes() == msgs[7].to_record().tobytes()
    np.testing.assert_array_equal(arr["index"], np.arange(50))
    assert messages_from_records(Rich, arr) == msgs
    assert messages_from_records(Rich, arr[::7]) == msgs[::7]  # non-contiguous views


def test_empty_and_mixed_batches() -> None:
    empty = records_from_messages([], cls=Tick)
    assert empty.shape == (0,) and empty.dtype == Tick.__record_dtype__
    assert messages_from_records(Tick, empty) == []
    with pytest.raises(TypeError, match="empty batch; pass cls="):
        records_from_messages([])
    with pytest.raises(TypeError, match="a record batch holds one message class"):
        records_from_messages([Tick(1, 1.0), rich()])
    with pytest.raises(TypeError, match=r"expected messages of .*Tick, got .*Rich"):
        records_from_messages([rich()], cls=Tick)
    with pytest.raises(TypeError, match="records of .*Tick have dtype"):
        messages_from_records(Tick, np.zeros(3, np.float64))


def test_records_accept_generators() -> None:
    arr = records_from_messages(Tick(i, 0.0) for i in range(3))
    assert list(arr["sensor"]) == [0, 1, 2]


@pytest.mark.parametrize(
    ("bad", "text"),
    [
        ({"vec": np.zeros(3, np.float32)}, r"field 'vec' .*expected shape \(4,\), got \(3,\)"),
        ({"vec": np.zeros((1,), np.float32)}, r"field 'vec' .*expected shape \(4,\), got \(1,\)"),
        ({"source": "not-a-uuid"}, "field 'source' .*expected a UUID, got str"),
        ({"correlation_id": 5}, "field 'correlation_id' .*expected a UUID, got int"),
    ],
)
def test_values_that_do_not_fit_name_the_field(bad: dict[str, Any], text: str) -> None:
    m = rich(**bad)
    with pytest.raises(MessageSerializationError, match=text):
        m.to_record()
    with pytest.raises(MessageSerializationError, match=text):
        records_from_messages([rich(), m])


def test_out_of_range_ints_name_the_field() -> None:
    with pytest.raises(MessageSerializationError, match="field 'sensor' of .*Tick .*int64"):
        Tick(2**63, 1.0).to_record()
    m = Tick(1, 1.0)
    m.priority = 256  # assignment after construction is not validated; the record is
    with pytest.raises(MessageSerializationError, match="field 'priority'"):
        m.to_record()


@pytest.mark.parametrize(
    ("annotation", "reason"),
    [
        (str, "str values vary in size"),
        (bytes, "bytes values vary in size"),
        (list[int], "list values vary in length"),
        (dict, "dict values vary in length"),
        (tuple[int, int], "tuple values vary in length"),
        (int | None, "Optional/Union values have no fixed-size representation"),
        (np.ndarray, "without a declared shape"),
        (npt.NDArray[np.float32], "without a declared shape"),
        (Annotated[np.ndarray, np.float32], "needs a shape and a dtype"),
        (Annotated[np.ndarray, (0,), np.float32], "must have at least one dimension"),
        (Annotated[np.ndarray, (2,), object], "dtype object has no fixed-size"),
        (np.datetime64, "needs a unit"),
        (np.str_, "has no fixed-size"),
        (Tick, "nested messages are not stored inside records"),
        (Any, "has no fixed-size record representation"),
    ],
)
def test_variable_size_fields_have_no_layout(annotation: Any, reason: str) -> None:
    cls = message(
        type("Odd", (), {"__annotations__": {"field_x": annotation}, "__module__": __name__})
    )
    assert not has_record_layout(cls)
    for access in (
        lambda: cls.__record_dtype__,
        lambda: record_dtype_of(cls),
        lambda: records_from_messages([], cls=cls),
    ):
        with pytest.raises(InvalidConfigurationError, match=f"{__name__}.Odd has no record") as e:
            access()
        assert "field 'field_x'" in str(e.value) and reason in str(e.value)


def test_variable_size_error_on_instances() -> None:
    with pytest.raises(InvalidConfigurationError, match="field 'name' .*str values vary"):
        Loose("n").to_record()
    assert has_record_layout(Tick) and not has_record_layout(Loose)


def test_annotated_ndarray_forms() -> None:
    @message
    class Forms:
        a: Annotated[np.ndarray, 3, np.uint8]
        b: Annotated[npt.NDArray[np.float64], (2, 2)]
        c: Annotated[np.ndarray, np.int16, (5,)]

    dt = Forms.__record_dtype__
    assert dt["a"] == np.dtype((np.uint8, (3,)))
    assert dt["b"] == np.dtype((np.float64, (2, 2)))
    assert dt["c"] == np.dtype((np.int16, (5,)))


# PEP 695 aliases, as numpy >= 2.5 defines NDArray (made without the 3.12 syntax here).
_te = pytest.importorskip("typing_extensions")
_T = TypeVar("_T", bound=np.generic)
Vector = _te.TypeAliasType("Vector", np.ndarray[tuple[int, ...], np.dtype[_T]], type_params=(_T,))
Count = _te.TypeAliasType("Count", np.int32)


def test_fields_typed_with_an_alias_get_the_layout_of_what_it_stands_for() -> None:
    @message
    class Aliased:
        v: Annotated[Vector[np.float32], (4,)]
        n: Count

    dt = Aliased.__record_dtype__
    assert dt["v"] == np.dtype((np.float32, (4,)))
    assert dt["n"] == np.dtype(np.int32)
    m = Aliased(np.arange(4, dtype=np.float32), np.int32(7))
    back = Aliased.from_record(m.to_record())
    assert back.n == 7 and back.v.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_subclass_of_base_has_layout_and_init_false_fields() -> None:
    import dataclasses

    class Scaled(RingKernelMessage):
        x: float = 0.0
        twice: float = dataclasses.field(init=False, default=0.0)

        def __post_init__(self) -> None:
            self.twice = self.x * 2

    m = Scaled(1.25)
    back = Scaled.from_record(m.to_record())
    assert back == m and back.twice == 2.5


def test_a_plain_message_built_from_a_record_equals_the_one_its_init_builds() -> None:
    class Plain(RingKernelMessage):
        x: np.int64 = np.int64(0)
        y: float = 0.0

    m = Plain(x=np.int64(-7), y=0.5, priority=3, correlation_id=uuid.uuid4())
    back = Plain.from_record(m.to_record())
    assert back == m and type(back.x) is np.int64 and type(back.priority) is int
    assert list(vars(back)) == ["message_id", "priority", "correlation_id", "x", "y"]
    back.y = 1.5  # an ordinary, mutable instance
    assert back.y == 1.5


def test_a_message_whose_attributes_are_intercepted_is_built_through_its_init() -> None:
    seen: list[str] = []

    class Logged(RingKernelMessage):
        x: np.int64 = np.int64(0)

        def __setattr__(self, name: str, value: Any) -> None:
            seen.append(name)
            object.__setattr__(self, name, value)

    m = Logged(x=np.int64(3))
    seen.clear()
    back = Logged.from_record(m.to_record())
    assert back == m and "x" in seen


# -------------------------------------------------------------------- property tests


@settings(max_examples=60, deadline=None)
@given(
    sensor=st.integers(-(2**63), 2**63 - 1),
    value=st.floats(allow_nan=False),
    ok=st.booleans(),
    priority=st.integers(0, 255),
    cid=st.none() | st.uuids(),
)
def test_property_tick_record_roundtrip(
    sensor: int, value: float, ok: bool, priority: int, cid: Any
) -> None:
    m = Tick(sensor, value, ok, priority=priority, correlation_id=cid)
    assert Tick.from_record(m.to_record()) == m
    assert messages_from_records(Tick, records_from_messages([m, m])) == [m, m]


F32 = st.floats(width=32, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(
    small=F32,
    index=st.integers(-(2**31), 2**31 - 1),
    flag=st.integers(0, 255),
    vec=st.lists(F32, min_size=4, max_size=4),
    grid=st.lists(st.integers(-(2**15), 2**15 - 1), min_size=6, max_size=6),
    source=st.uuids(),
)
def test_property_rich_record_roundtrip(
    small: float, index: int, flag: int, vec: list[float], grid: list[int], source: uuid.UUID
) -> None:
    m = rich(
        small=np.float32(small),
        index=np.int32(index),
        flag=np.uint8(flag),
        vec=np.array(vec, np.float32),
        grid=np.array(grid, np.int16).reshape(2, 3),
        source=source,
    )
    assert Rich.from_record(m.to_record()) == m


# -------------------------------------------------------------------- compiled handlers


@numba.njit(cache=True)
def _handle(records: Any, out: Any) -> int:
    """What a compiled handler does with a record: read and write every kind of field."""
    total = 0
    for i in range(records.shape[0]):
        r = records[i]
        o = out[i]
        o.index = r.index * 2
        o.small = r.small + np.float32(0.5)
        o.flag = r.priority
        for k in range(16):
            o.source[k] = r.message_id[k]  # the UUID subarray
            o.correlation_id[k] = r.correlation_id[k]
        for k in range(4):
            o.vec[k] = r.vec[3 - k]
        for a in range(2):
            for b in range(3):
                o.grid[a, b] = r.grid[a, b] + 1
        total += r.flag
    return total


def test_numba_handler_reads_and_writes_record_fields() -> None:
    msgs = [rich(index=np.int32(i), flag=np.uint8(i + 1), priority=i) for i in range(3)]
    records = records_from_messages(msgs)
    out = np.zeros(3, Rich.__record_dtype__)
    assert _handle(records, out) == 1 + 2 + 3
    for m, o in zip(msgs, messages_from_records(Rich, out), strict=True):
        assert o.index == m.index * 2
        assert o.small == m.small + np.float32(0.5)
        assert o.flag == m.priority
        assert o.source == m.message_id
        assert o.correlation_id == m.correlation_id
        np.testing.assert_array_equal(o.vec, m.vec[::-1])
        np.testing.assert_array_equal(o.grid, m.grid + 1)


@pytest.mark.parametrize("narrow", [False, True])
def test_fill_message_ids_gives_fresh_ids_only_where_there_is_none(narrow: bool) -> None:
    from pydotcompute.messages.record import fill_message_ids

    if narrow:  # 34-byte records: ids not on 8-byte words

        @message
        class Narrow:
            b: np.uint8

        dtype = Narrow.__record_dtype__
    else:

        @message
        class Wide:
            x: float

        dtype = Wide.__record_dtype__
    assert (dtype.itemsize % 8 == 0) is not narrow
    recs = np.zeros(5, dtype)
    recs["message_id"][2] = 7
    assert fill_message_ids(recs) is recs
    ids = [uuid.UUID(bytes=bytes(r)) for r in recs["message_id"]]
    assert ids[2].bytes == bytes([7] * 16)  # set by whoever made it: kept
    fresh = ids[:2] + ids[3:]
    assert len(set(fresh)) == 4
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in fresh)
