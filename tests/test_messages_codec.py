"""The msgpack codec: every supported value type round-trips; failures say what and where."""

from __future__ import annotations

import dataclasses
import enum
import math
import uuid
from collections import OrderedDict, namedtuple
from datetime import date, datetime, timedelta, timezone
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pydotcompute.errors import MessageDeserializationError, MessageSerializationError
from pydotcompute.messages import RingKernelMessage, decode, encode, message


@message
class Box:
    value: Any = None


@message
class Pair:
    left: Any
    right: Any = None


@message
class Sample:
    value: float
    count: int = 0


def roundtrip(value: Any) -> Any:
    back = decode(encode(Box(value)))
    assert type(back) is Box
    return back.value


INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.uuids(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(-5, 5)), inner, max_size=4),
    ),
    max_leaves=12,
)


def same(a: Any, b: Any) -> bool:
    """Equality that also demands equal types (True vs 1, tuple vs list)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES)
def test_property_any_value_roundtrips_with_its_type(value: Any) -> None:
    assert same(roundtrip(value), value)


@settings(max_examples=60, deadline=None)
@given(
    value=st.floats(allow_nan=False),
    count=INT64,
    priority=st.integers(0, 255),
    cid=st.none() | st.uuids(),
)
def test_property_message_roundtrip(value: float, count: int, priority: int, cid: Any) -> None:
    m = Sample(value, count, priority=priority, correlation_id=cid)
    back = Sample.deserialize(m.serialize())
    assert back == m
    assert back.serialize() == m.serialize()


@pytest.mark.parametrize("n", [0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1])
def test_64_bit_integers_roundtrip(n: int) -> None:
    assert roundtrip(n) == n


@pytest.mark.parametrize("n", [2**64, -(2**63) - 1, 10**30])
def test_integers_beyond_64_bits_name_the_field(n: int) -> None:
    with pytest.raises(
        MessageSerializationError,
        match=f"cannot encode field 'right' of {__name__}.Pair: integer outside the 64-bit",
    ):
        Pair(1, [n]).serialize()


def test_floats_bools_none_and_special_floats() -> None:
    assert roundtrip(True) is True and roundtrip(None) is None
    assert roundtrip(float("inf")) == float("inf")
    assert math.isnan(roundtrip(float("nan")))
    assert roundtrip(-0.0) == 0.0 and math.copysign(1, roundtrip(-0.0)) == -1


def test_tuples_come_back_as_tuples_at_any_depth() -> None:
    value = {"t": (1, (2, [3, (4,)])), (1, 2): "tuple key"}
    back = roundtrip(value)
    assert same(back, value)
    Point = namedtuple("Point", "x y")
    assert same(roundtrip(Point(1, 2)), (1, 2))


def test_dict_keys_of_any_msgpack_type() -> None:
    key = uuid.uuid4()
    value = {1: "a", "b": 2, b"c": 3, 2.5: 4, None: 5, key: 6}
    assert roundtrip(value) == value


def test_builtin_subclasses_travel_as_their_base_type() -> None:
    class Color(enum.IntEnum):
        RED = 3

    back = roundtrip([Color.RED, OrderedDict(a=1), bytearray(b"xy")])
    assert back == [3, {"a": 1}, b"xy"]
    assert type(back[0]) is int and type(back[1]) is dict and type(back[2]) is bytes


DTYPES = ["bool", "int8", "uint16", "int32", "int64", "uint64", "float16", "float32",
          "float64", "complex64", "complex128", ">i4", "<U3", "S4", "datetime64[ns]"]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_arrays_of_every_dtype(dtype: str) -> None:
    a = np.arange(24).reshape(2, 3, 4).astype(dtype)
    back = roundtrip(a)
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)
    assert back.flags.writeable


def test_numpy_array_layouts_and_shapes() -> None:
    f = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    back = roundtrip(f)
    assert back.flags.f_contiguous and not back.flags.c_contiguous
    np.testing.assert_array_equal(back, f)
    strided = np.arange(20)[::3]
    np.testing.assert_array_equal(roundtrip(strided), strided)
    for shape in [(), (0,), (3, 0), (1, 1, 1, 1)]:
        a = np.zeros(shape, np.float32)
        assert roundtrip(a).shape == shape


def test_structured_arrays_roundtrip() -> None:
    dt = np.dtype([("a", "u1"), ("b", "f8"), ("c", "i2", (2,))], align=True)
    a = np.zeros(3, dt)
    a["b"] = [1.5, 2.5, 3.5]
    a["c"][1] = [7, 8]
    back = roundtrip(a)
    assert back.dtype == dt
    assert back.tobytes() == a.tobytes()


def test_numpy_scalars_keep_their_type() -> None:
    for s in [np.float32(1.5), np.float64(2.5), np.int8(-3), np.uint64(2**64 - 1), np.bool_(True),
              np.complex64(1 + 2j), np.datetime64("2024-01-02", "D")]:  # fmt: skip
        back = roundtrip(s)
        assert type(back) is type(s) and back == s


def test_object_arrays_are_refused() -> None:
    with pytest.raises(MessageSerializationError, match="dtype object are not supported"):
        Box(np.array([object()])).serialize()


def test_datetimes_and_dates() -> None:
    naive = datetime(2024, 5, 6, 7, 8, 9, 123456)
    aware = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=-3)))
    back = roundtrip([naive, aware, date(2020, 2, 29)])
    assert back == [naive, aware, date(2020, 2, 29)]
    assert back[1].utcoffset() == timedelta(hours=-3)
    assert type(back[2]) is date


def test_nested_messages_at_any_depth_and_inside_containers() -> None:
    inner = Sample(1.0, 2, priority=3)
    deep = Pair(Pair(Pair(inner)), {"list": [inner, (inner,)], "key": Box(np.arange(3))})
    back = decode(deep.serialize())
    assert back == deep
    assert type(back.left.left.left) is Sample
    assert back.left.left.left.message_id == inner.message_id
    np.testing.assert_array_equal(back.right["key"].value, np.arange(3))


def test_header_values_roundtrip() -> None:
    cid = uuid.uuid4()
    m = Sample(1.0, priority=0, correlation_id=cid)
    back = decode(m.serialize())
    assert (back.message_id, back.priority, back.correlation_id) == (m.message_id, 0, cid)


def test_unencodable_value_names_field_and_type() -> None:
    with pytest.raises(
        MessageSerializationError,
        match=rf"cannot encode field 'left' of {__name__}\.Pair: values of type set are not",
    ):
        Pair({1, 2}).serialize()

    class Opaque:
        pass

    with pytest.raises(MessageSerializationError, match=r"values of type .*Opaque are not"):
        Box({"k": [Opaque()]}).serialize()


def test_nested_failure_names_the_path() -> None:
    with pytest.raises(MessageSerializationError) as err:
        Pair(Box(object())).serialize()
    assert f"field 'left' of {__name__}.Pair" in str(err.value)
    assert f"field 'value' of {__name__}.Box" in str(err.value)


def test_a_failed_encode_leaves_the_codec_usable() -> None:
    with pytest.raises(MessageSerializationError):
        Box({1, 2}).serialize()
    m = Sample(3.0, 4)
    assert Sample.deserialize(m.serialize()) == m


def test_encode_refuses_non_messages() -> None:
    @dataclasses.dataclass
    class NotAMessage:
        x: int = 0

    with pytest.raises(MessageSerializationError, match="is not a message class"):
        encode(NotAMessage())


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"\xc1", "not msgpack data: FormatError"),
        (b"", "not msgpack data: Unpack failed: incomplete input"),
        (b"\x93\x01\x02\x03", "not a message: expected [type name, fields], got array of 3"),
        (msgpack.packb({"a": 1}), "not a message: expected [type name, fields], got dict"),
        (msgpack.packb(["nowhere.Missing", {}]), "unknown message type 'nowhere.Missing'"),
        (msgpack.packb([f"{__name__}.Sample", {}]), "field 'value' missing"),
        (msgpack.packb([f"{__name__}.Pair", {"right": 1}]), "field 'left' missing"),
        (
            msgpack.packb([f"{__name__}.Sample", {"value": 1.0, "priority": 999}]),
            "invalid .*Sample: priority must be in 0..255, got 999",
        ),
        (
            msgpack.packb(["x", {}], default=None) + b"\x00",
            "not msgpack data: unpack\\(b\\) received extra data",
        ),
        (
            msgpack.packb([f"{__name__}.Box", {"value": msgpack.ExtType(2, b"abc")}]),
            "bad uuid value: a UUID is 16 bytes, got 3",
        ),
        (
            msgpack.packb([f"{__name__}.Box", {"value": msgpack.ExtType(99, b"")}]),
            "unknown msgpack extension type 99",
        ),
        (
            msgpack.packb([f"{__name__}.Box", {"value": msgpack.ExtType(3, b"\x00")}]),
            "bad ndarray value",
        ),
    ],
)
def test_bad_bytes_say_what_was_wrong(data: bytes, text: str) -> None:
    with pytest.raises(MessageDeserializationError, match=text.replace("[", r"\[")):
        decode(data)


def test_truncated_messages_are_reported() -> None:
    data = Pair(np.arange(100), "text").serialize()
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(MessageDeserializationError, match="not msgpack data"):
            decode(data[:cut])


def test_truncated_array_payload_is_reported() -> None:
    good = encode(Box(np.arange(4)))
    ext = msgpack.unpackb(good, ext_hook=lambda code, data: msgpack.ExtType(code, data))[1]
    cut = msgpack.ExtType(3, ext["value"].data[:-3])
    data = msgpack.packb([f"{__name__}.Box", {"value": cut}])
    with pytest.raises(MessageDeserializationError, match="bad ndarray value: array of 4"):
        decode(data)


def test_nested_unknown_type_is_reported() -> None:
    inner = msgpack.ExtType(1, msgpack.packb(["gone.Type", {}]))
    data = msgpack.packb([f"{__name__}.Box", {"value": inner}])
    with pytest.raises(MessageDeserializationError, match="unknown message type 'gone.Type'"):
        decode(data)


def test_wrong_type_for_deserialize() -> None:
    with pytest.raises(
        MessageDeserializationError, match=f"expected {__name__}.Sample, got {__name__}.Box"
    ):
        Sample.deserialize(Box(1).serialize())


def test_non_bytes_input() -> None:
    with pytest.raises(MessageDeserializationError, match="expected bytes, got str"):
        decode("hello")  # type: ignore[arg-type]


def test_unknown_fields_from_a_newer_writer_are_ignored() -> None:
    data = msgpack.packb([f"{__name__}.Sample", {"value": 1.5, "added_later": [1, 2]}])
    back = Sample.deserialize(data)
    assert back.value == 1.5 and back.count == 0


def test_bytearray_and_memoryview_input() -> None:
    data = Sample(1.0).serialize()
    assert decode(bytearray(data)).value == 1.0
    assert decode(memoryview(data)).value == 1.0


def test_non_init_fields_are_recomputed_not_passed() -> None:
    @message
    class Derived:
        x: int
        doubled: int = dataclasses.field(init=False, default=0)

        def __post_init__(self) -> None:
            self.doubled = self.x * 2

    back = Derived.deserialize(Derived(4).serialize())
    assert back.doubled == 8


def test_base_class_messages_roundtrip() -> None:
    m = RingKernelMessage(priority=9)
    back = RingKernelMessage.deserialize(m.serialize())
    assert back == m


ARRAY_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="="),
    hnp.unsigned_integer_dtypes(endianness="="),
    hnp.floating_dtypes(endianness="="),
    hnp.complex_number_dtypes(endianness="="),
)


@settings(max_examples=80, deadline=None)
@given(
    a=hnp.arrays(ARRAY_DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    fortran=st.booleans(),
)
def test_property_arrays_roundtrip(a: np.ndarray, fortran: bool) -> None:
    if fortran:
        a = np.asfortranarray(a)
    back = roundtrip(a)
    assert back.dtype == a.dtype and back.shape == a.shape
    assert back.tobytes(order="A") == a.tobytes(order="A")
    assert back.flags.f_contiguous == a.flags.f_contiguous
