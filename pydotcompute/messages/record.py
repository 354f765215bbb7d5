"""Record layouts: fixed-size messages as numpy structured dtypes.

A record is what travels through a ring and what a compiled handler sees. The layout of a
message class is its header (``message_id``, ``priority``, ``correlation_id``) and then
its own fields in declaration order, built with ``align=True``: every field starts at a
multiple of its own alignment and the record size is a multiple of the largest one, as a
C compiler lays out the same struct, so device loads are naturally aligned.

Values are moved in and out through one ``struct.Struct`` per class whose format mirrors
the dtype byte for byte (padding included), so converting a message is one C call over
all of its fields rather than one numpy assignment per field.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import struct
import typing
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, TypeVar

import numpy as np

from pydotcompute.errors import InvalidConfigurationError, MessageSerializationError

__all__ = [
    "HEADER_FIELDS",
    "RecordLayout",
    "record_layout",
    "record_dtype_of",
    "has_record_layout",
    "records_from_messages",
    "messages_from_records",
    "DEFAULT_PRIORITY",
    "output_header",
    "fill_message_ids",
    "fresh_id_bytes",
    "uuid_offset",
    "as_record_pickle",
    "message_from_record_bytes",
]

M = TypeVar("M")

HEADER_FIELDS = ("message_id", "priority", "correlation_id")
DEFAULT_PRIORITY = 128

_LAYOUT = "__message_record_layout__"
_CHECKS_ONLY_PRIORITY = "__checks_only_priority__"
"""Set on a message class's ``__post_init__`` that does nothing but check the priority."""
_NO_UUID = bytes(16)
_SAFE_UNKNOWN = uuid.SafeUUID.unknown

# (dtype kind, itemsize) -> struct code, for scalars struct can pack directly.
_STRUCT_CODES = {
    ("b", 1): "?",
    ("i", 1): "b",
    ("i", 2): "h",
    ("i", 4): "i",
    ("i", 8): "q",
    ("u", 1): "B",
    ("u", 2): "H",
    ("u", 4): "I",
    ("u", 8): "Q",
    ("f", 2): "e",
    ("f", 4): "f",
    ("f", 8): "d",
}


class _NotFixedSize(Exception):
    """Internal: a field type has no fixed-size representation (the text says why)."""


@dataclasses.dataclass(frozen=True)
class _Slot:
    """How one field sits in the record."""

    name: str
    format: Any  # numpy dtype format for this field
    code: str  # struct code
    encoder: str  # expression template turning ``{v}`` into what struct packs
    decoder: str  # expression template turning ``{v}`` back into the field value
    fast: str | None = None  # an unchecked encoder for the hot path, if cheaper


def _uuid_from(
    data: bytes,
    _new: Any = object.__new__,
    _set: Any = object.__setattr__,
    _int: Any = int.from_bytes,
    _cls: type = uuid.UUID,
) -> uuid.UUID:
    # What uuid.UUID(bytes=...) ends with, without re-validating 16 known-good bytes.
    u: uuid.UUID = _new(_cls)
    _set(u, "int", _int(data, "big"))
    _set(u, "is_safe", _SAFE_UNKNOWN)
    return u


def _uuid_bytes(value: Any) -> bytes:
    if type(value) is not uuid.UUID and not isinstance(value, uuid.UUID):
        raise TypeError(f"expected a UUID, got {type(value).__name__}")
    return value.bytes


def _optional_uuid_bytes(value: Any) -> bytes:
    return _NO_UUID if value is None else _uuid_bytes(value)


def _raw_bytes(value: Any, dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    a = np.asarray(value)
    if a.shape != shape:
        raise ValueError(f"expected shape {shape}, got {a.shape}")
    if a.dtype.hasobject:
        raise TypeError("object arrays cannot be stored in a record")
    return a.astype(dtype, copy=False).tobytes()


def _raw_array(data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    # frombuffer views immutable bytes; the message gets its own writable array.
    return np.frombuffer(data, dtype).reshape(shape).copy()


def _raw_scalar(data: bytes, dtype: np.dtype) -> Any:
    return np.frombuffer(data, dtype)[0]


_HELPERS: dict[str, Any] = {
    "_uuid_bytes": _uuid_bytes,
    "_uuid_from": _uuid_from,
    "_optional_uuid_bytes": _optional_uuid_bytes,
    "_NO_UUID": _NO_UUID,
    "_raw_bytes": _raw_bytes,
    "_raw_array": _raw_array,
    "_raw_scalar": _raw_scalar,
}


def _scalar_slot(name: str, dt: np.dtype, wrap: str | None) -> _Slot:
    code = _STRUCT_CODES.get((dt.kind, dt.itemsize))
    if code is not None:
        return _Slot(name, dt, code, "{v}", f"{wrap}({{v}})" if wrap else "{v}")
    # complex, long double, datetime64[unit]...: struct has no code, numpy moves the bytes.
    return _Slot(name, dt, f"{dt.itemsize}s", "_raw_bytes({v}, {dt}, ())", "_raw_scalar({v}, {dt})")


def _check_dtype(dt: np.dtype) -> None:
    if dt.hasobject or dt.itemsize == 0 or dt.kind in "SUV":
        raise _NotFixedSize(f"dtype {dt} has no fixed-size numeric representation")
    if dt.kind in "mM" and np.datetime_data(dt)[0] == "generic":
        raise _NotFixedSize(f"dtype {dt} needs a unit, e.g. datetime64[ns]")


def _array_slot(name: str, args: tuple[Any, ...], metadata: tuple[Any, ...]) -> _Slot:
    shape: tuple[int, ...] | None = None
    dt: np.dtype | None = None
    # numpy.typing.NDArray[np.float32] carries its dtype in its own arguments.
    if len(args) == 2 and typing.get_args(args[1]):
        dt = np.dtype(typing.get_args(args[1])[0])
    for item in metadata:
        if isinstance(item, int) and not isinstance(item, bool):
            shape = (item,)
        elif isinstance(item, tuple) and all(
            isinstance(s, int) and not isinstance(s, bool) for s in item
        ):
            shape = item
        else:
            try:
                dt = np.dtype(item)
            except TypeError:
                raise _NotFixedSize(
                    f"cannot read {item!r} as a shape or a dtype in its Annotated[...]"
                ) from None
    if shape is None or dt is None:
        raise _NotFixedSize(
            "a record array needs a shape and a dtype: Annotated[np.ndarray, (4,), np.float32]"
        )
    if not shape or any(s < 1 for s in shape):
        raise _NotFixedSize(f"array shape {shape} must have at least one dimension, all >= 1")
    _check_dtype(dt)
    size = dt.itemsize
    for s in shape:
        size *= s
    return _Slot(
        name,
        (dt, shape),
        f"{size}s",
        f"_raw_bytes({{v}}, {{dt}}, {shape!r})",
        f"_raw_array({{v}}, {{dt}}, {shape!r})",
    )


def _unalias(tp: Any) -> Any:
    """What a PEP 695 type alias stands for (numpy >= 2.5 defines ``NDArray`` as one):
    ``Alias[args]`` becomes the alias's value with ``args`` in place of its parameters."""
    origin = typing.get_origin(tp)
    alias, args = (origin, typing.get_args(tp)) if origin is not None else (tp, ())
    value = getattr(alias, "__value__", None)
    params = getattr(alias, "__type_params__", None)
    if value is None or params is None:  # not an alias
        return tp
    if args and len(args) == len(params):
        value = value[args]
    return _unalias(value)


def _slot(name: str, tp: Any) -> _Slot:
    """The record slot of a field annotated ``tp``; raises _NotFixedSize with the reason."""
    tp = _unalias(tp)
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base = _unalias(tp.__origin__)
        if base is np.ndarray or typing.get_origin(base) is np.ndarray:
            return _array_slot(name, typing.get_args(base), tp.__metadata__)
        return _slot(name, base)
    if tp is bool:
        return _Slot(name, np.dtype(np.bool_), "?", "{v}", "{v}")
    if tp is int:
        return _Slot(name, np.dtype(np.int64), "q", "{v}", "{v}")
    if tp is float:
        return _Slot(name, np.dtype(np.float64), "d", "{v}", "{v}")
    if tp is uuid.UUID:
        return _Slot(name, ("u1", 16), "16s", "_uuid_bytes({v})", "_uuid_from({v})", _FAST_UUID)
    if isinstance(tp, type) and issubclass(tp, np.generic):
        dt = np.dtype(tp)
        _check_dtype(dt)
        return _scalar_slot(name, dt, "{wrap}")
    if tp is np.ndarray or origin is np.ndarray:
        raise _NotFixedSize(
            "a numpy array without a declared shape varies in size; "
            "declare Annotated[np.ndarray, (shape,), dtype]"
        )
    if tp in (str, bytes, bytearray):
        raise _NotFixedSize(f"{tp.__name__} values vary in size")
    if origin in (list, dict, tuple, set, frozenset) or tp in (list, dict, tuple, set, frozenset):
        kind = (origin or tp).__name__
        raise _NotFixedSize(f"{kind} values vary in length")
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        raise _NotFixedSize("Optional/Union values have no fixed-size representation")
    if isinstance(tp, type) and getattr(tp, "__message_type__", None) is not None:
        raise _NotFixedSize("nested messages are not stored inside records")
    raise _NotFixedSize(f"{tp!r} has no fixed-size record representation")


# A UUID's bytes without the property call and type check; a value that is not a UUID
# fails here and the checked encoder then names the field.
_FAST_UUID = "{v}.int.to_bytes(16, 'big')"

_HEADER_SLOTS = (
    _Slot("message_id", ("u1", 16), "16s", "_uuid_bytes({v})", "_uuid_from({v})", _FAST_UUID),
    _Slot("priority", np.dtype(np.uint8), "B", "{v}", "{v}"),
    _Slot(
        "correlation_id",
        ("u1", 16),
        "16s",
        "_optional_uuid_bytes({v})",
        "(None if {v} == _NO_UUID else _uuid_from({v}))",
        f"(_NO_UUID if {{v}} is None else {_FAST_UUID})",
    ),
)


class RecordLayout:
    """The record form of one message class: its dtype and the converters to and from it."""

    def __init__(self, cls: type, slots: Sequence[_Slot], wraps: dict[str, Any]) -> None:
        self.cls = cls
        self.dtype = np.dtype(
            {"names": [s.name for s in slots], "formats": [s.format for s in slots]}, align=True
        )
        self.struct = _struct_for(self.dtype, slots)
        self.unpack_from = self.struct.unpack_from
        self._slots = tuple(slots)
        self.pack: Callable[[Any], bytes]
        self.build: Callable[[tuple[Any, ...]], Any]
        self._field_encoders: list[Callable[[Any], Any]]
        self._compile(wraps)

    def _compile(self, wraps: dict[str, Any]) -> None:
        env: dict[str, Any] = dict(_HELPERS)
        env["_pack"] = self.struct.pack
        env["_cls"] = self.cls
        env["_set"] = object.__setattr__
        init = {f.name: f.init for f in dataclasses.fields(self.cls)}
        packed, checked, kwargs, late, stores = [], [], [], [], []
        for i, s in enumerate(self._slots):
            env[f"_dt{i}"] = np.dtype(s.format[0] if isinstance(s.format, tuple) else s.format)
            if s.name in wraps:
                env[f"_wrap{i}"] = wraps[s.name]
            fill = {"dt": f"_dt{i}", "wrap": f"_wrap{i}"}
            checked.append(s.encoder.format(v=f"m.{s.name}", **fill))
            packed.append((s.fast or s.encoder).format(v=f"m.{s.name}", **fill))
            value = s.decoder.format(v=f"v[{i}]", **fill)
            stores.append(f"    d[{s.name!r}] = {value}\n")
            if init[s.name]:
                kwargs.append(f"{s.name}={value}")
            else:
                late.append(f"    _set(m, {s.name!r}, {value})")
        # Generated once per class, like dataclasses' own __init__: a message becomes a
        # record in one struct.pack call and comes back in one constructor call.
        # One encoder per field as well, so a failure can be pinned on its field.
        fields_src = "".join(
            f"def _field{i}(m):\n    return {expr}\n" for i, expr in enumerate(checked)
        )
        if _init_only_stores(self.cls):
            # What its __init__ would do, without the call: the fields straight into the
            # instance's dict (a record's priority is a byte, always valid).
            env["_new"] = object.__new__
            build_src = "def build(v):\n    m = _new(_cls)\n    d = m.__dict__\n"
            build_src += "".join(stores) + "    return m\n"
        else:
            build_src = (
                f"def build(v):\n    m = _cls({', '.join(kwargs)})\n"
                + "".join(line + "\n" for line in late)
                + "    return m\n"
            )
        src = fields_src + f"def pack(m):\n    return _pack({', '.join(packed)})\n" + build_src
        exec(compile(src, f"<record layout of {self.cls.__qualname__}>", "exec"), env)
        self.pack = env["pack"]
        self.build = env["build"]
        self._field_encoders = [env[f"_field{i}"] for i in range(len(self._slots))]

    def explain(self, msg: Any, exc: BaseException) -> MessageSerializationError:
        """Name the field that could not be stored (only runs after a failure)."""
        name = _label(type(msg))
        for s, encoder in zip(self._slots, self._field_encoders, strict=True):
            try:
                struct.pack("=" + s.code, encoder(msg))
            except Exception as field_exc:  # noqa: BLE001 - becomes the error we raise
                return MessageSerializationError(
                    f"cannot store field {s.name!r} of {name} in its record "
                    f"({self.dtype[s.name]}): {field_exc}"
                )
        return MessageSerializationError(f"cannot store {name} in its record: {exc}")

    def to_bytes(self, msg: Any) -> bytes:
        try:
            return self.pack(msg)
        except Exception as exc:
            raise self.explain(msg, exc) from exc

    def check(self, dtype: np.dtype) -> None:
        if dtype != self.dtype:
            raise TypeError(f"records of {_label(self.cls)} have dtype {self.dtype}, got {dtype}")


def _init_only_stores(cls: type) -> bool:
    """Whether building ``cls`` from its fields' values does nothing but store them: its
    ``__init__`` is the one ``dataclass`` generated, its ``__post_init__`` (if any) only
    checks the priority, and nothing intercepts creating it or setting its attributes."""
    made: Any = cls  # its special methods are compared with object's, not called
    init = getattr(made.__init__, "__code__", None)
    post_init = getattr(made, "__post_init__", None)
    if (
        init is None
        or init.co_filename != "<string>"  # dataclasses compile __init__ from a string
        or made.__new__ is not object.__new__
        or made.__setattr__ is not object.__setattr__
        or (post_init is not None and not getattr(post_init, _CHECKS_ONLY_PRIORITY, False))
    ):
        return False
    for f in dataclasses.fields(cls):
        attr = inspect.getattr_static(cls, f.name, None)
        if hasattr(type(attr), "__set__"):  # a descriptor: __init__ would call it
            return False
    try:
        return isinstance(object.__new__(cls).__dict__, dict)
    except (AttributeError, TypeError):  # __slots__: no dict to store into
        return False


def _struct_for(dtype: np.dtype, slots: Sequence[_Slot]) -> struct.Struct:
    fields: Any = dtype.fields
    parts = ["="]
    at = 0
    for s in slots:
        offset = fields[s.name][1]
        if offset > at:
            parts.append(f"{offset - at}x")
        parts.append(s.code)
        at = offset + fields[s.name][0].itemsize
    if dtype.itemsize > at:
        parts.append(f"{dtype.itemsize - at}x")
    st = struct.Struct("".join(parts))
    if st.size != dtype.itemsize:  # pragma: no cover - would be a bug in the slot table
        raise AssertionError(f"struct {st.format} is {st.size} bytes, dtype {dtype.itemsize}")
    return st


def _label(cls: type) -> str:
    return cls.__dict__.get("__message_type__") or f"{cls.__module__}.{cls.__qualname__}"


def _build_layout(cls: type) -> RecordLayout:
    if not dataclasses.is_dataclass(cls):
        raise InvalidConfigurationError(f"{_label(cls)} is not a message class")
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception as exc:
        raise InvalidConfigurationError(
            f"{_label(cls)} has no record layout: its annotations cannot be resolved ({exc})"
        ) from exc
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    missing = [h for h in HEADER_FIELDS if h not in names]
    if missing:
        raise InvalidConfigurationError(
            f"{_label(cls)} has no record layout: header field {missing[0]!r} is missing"
        )
    slots = list(_HEADER_SLOTS)
    wraps: dict[str, Any] = {}
    for f in fields:
        if f.name in HEADER_FIELDS:
            continue
        tp = _unalias(hints.get(f.name, f.type))
        try:
            slot = _slot(f.name, tp)
        except _NotFixedSize as why:
            shown = getattr(tp, "__name__", None) or repr(tp)
            raise InvalidConfigurationError(
                f"{_label(cls)} has no record layout: field {f.name!r} ({shown}): {why}"
            ) from None
        if isinstance(tp, type) and issubclass(tp, np.generic):
            wraps[f.name] = tp
        slots.append(slot)
    return RecordLayout(cls, slots, wraps)


def record_layout(cls: type) -> RecordLayout:
    """The record layout of ``cls``; ``InvalidConfigurationError`` if it has none."""
    layout = cls.__dict__.get(_LAYOUT)
    if type(layout) is RecordLayout:
        return layout
    if layout is None:
        try:
            layout = _build_layout(cls)
        except InvalidConfigurationError as exc:
            layout = str(exc)  # remembered: the answer never changes for a class
        type.__setattr__(cls, _LAYOUT, layout)
    if isinstance(layout, str):
        raise InvalidConfigurationError(layout)
    return layout


def record_dtype_of(cls: type) -> np.dtype:
    """The numpy structured dtype of ``cls``'s records."""
    return record_layout(cls).dtype


def has_record_layout(cls: type) -> bool:
    """Whether every field of ``cls`` is fixed-size, so it has a record layout."""
    try:
        record_layout(cls)
    except InvalidConfigurationError:
        return False
    return True


def to_record(msg: Any) -> np.void:
    """One message as a record: a ``numpy.void`` structured scalar, like ``arr[i]``."""
    layout = record_layout(type(msg))
    rec: np.void = np.frombuffer(bytearray(layout.to_bytes(msg)), layout.dtype)[0]
    return rec


def from_record(cls: type[M], rec: Any) -> M:
    """Build a message of class ``cls`` from one record (``arr[i]`` or a 0-d array)."""
    layout = record_layout(cls)
    if type(rec) is not np.void:
        if not isinstance(rec, np.ndarray):
            raise TypeError(f"expected a numpy record of {_label(cls)}, got {type(rec).__name__}")
        if rec.size != 1:
            raise TypeError(f"expected one record, got an array of {rec.size}")
    if rec.dtype != layout.dtype:
        layout.check(rec.dtype)
    msg: M = layout.build(layout.unpack_from(rec))  # reads the record's own buffer
    return msg


def records_from_messages(msgs: Iterable[Any], cls: type | None = None) -> np.ndarray:
    """Messages of one class as a 1-d record array (``cls`` names it for an empty batch)."""
    msgs = msgs if isinstance(msgs, (list, tuple)) else list(msgs)
    kinds = set(map(type, msgs))
    if cls is None:
        if not kinds:
            raise TypeError("cannot tell the record dtype of an empty batch; pass cls=")
        if len(kinds) > 1:
            names = ", ".join(sorted(_label(k) for k in kinds))
            raise TypeError(f"a record batch holds one message class, got {names}")
        cls = kinds.pop()
    elif kinds - {cls}:
        other = next(iter(kinds - {cls}))
        raise TypeError(f"expected messages of {_label(cls)}, got {_label(other)}")
    layout = record_layout(cls)
    try:
        data = b"".join(map(layout.pack, msgs))
    except Exception as exc:
        bad = next(m for m in msgs if _fails(layout, m))
        raise layout.explain(bad, exc) from exc
    return np.frombuffer(bytearray(data), layout.dtype)


def _fails(layout: RecordLayout, msg: Any) -> bool:
    try:
        layout.pack(msg)
    except Exception:  # noqa: BLE001 - the caller reports it
        return True
    return False


def messages_from_records(cls: type[M], records: np.ndarray) -> list[M]:
    """Records (any array of ``cls``'s dtype) as message objects, in C order."""
    layout = record_layout(cls)
    layout.check(records.dtype)
    build = layout.build
    return [build(v) for v in layout.struct.iter_unpack(np.ascontiguousarray(records).tobytes())]


# -- the header of a compiled kernel's outputs ---------------------------------------
#
# A compiled handler fills the fields of its output record; the header is filled for
# it: the loop starts every output as a copy of a blank record (the default priority)
# with ``correlation_id`` set to the input's ``message_id``, and the host gives each
# output whose ``message_id`` is still zero a fresh one as it leaves the output ring.


def uuid_offset(dtype: np.dtype, name: str) -> int:
    """Byte offset of a 16-byte UUID field ``name`` of ``dtype``, or -1 if it has none."""
    fields = dtype.fields
    field = fields.get(name) if fields is not None else None
    if field is None or field[0].subdtype != (np.dtype(np.uint8), (16,)):
        return -1
    return int(field[1])


def output_header(in_dtype: np.dtype, out_dtype: np.dtype) -> tuple[np.ndarray, int, int]:
    """What a compiled loop writes into each output record before its handler runs:
    ``(blank, id_at, corr_at)``. ``blank`` is one record of ``out_dtype``, zeros but
    for ``priority`` (``DEFAULT_PRIORITY`` where the record has one); the input's
    ``message_id`` at byte ``id_at`` is copied to the output's ``correlation_id`` at
    byte ``corr_at`` (both -1 when either record lacks its field)."""
    blank = np.zeros(1, out_dtype)
    fields = out_dtype.fields
    field = fields.get("priority") if fields is not None else None
    if field is not None and field[0] == np.dtype(np.uint8):
        blank["priority"] = DEFAULT_PRIORITY
    id_at = uuid_offset(in_dtype, "message_id")
    corr_at = uuid_offset(out_dtype, "correlation_id")
    if id_at < 0 or corr_at < 0:
        return blank, -1, -1
    return blank, id_at, corr_at


def _version4(raw: np.ndarray) -> np.ndarray:
    """Random bytes, ``(n, 16)``, made UUID version 4 (RFC 4122 variant) in place."""
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    return raw


def fill_message_ids(records: np.ndarray) -> np.ndarray:
    """Give every record whose ``message_id`` is all zeros a fresh random UUID, in place
    (records without that field are left alone); returns ``records``."""
    at = uuid_offset(records.dtype, "message_id")
    n = len(records)
    if at < 0 or n == 0 or not records.flags.c_contiguous:
        return records
    size = records.dtype.itemsize
    if size % 8 == 0 and at % 8 == 0:  # as two words per id: a few numpy calls per batch
        words = records.view("<u8").reshape(n, size // 8)
        blank = (words[:, at // 8] | words[:, at // 8 + 1]) == 0
        ids = words[:, at // 8 : at // 8 + 2]
    else:
        raw = records.view(np.uint8).reshape(n, size)
        ids = raw[:, at : at + 16]
        blank = ~ids.any(axis=1)
    missing = int(np.count_nonzero(blank))
    if missing:
        fresh = _version4(
            np.frombuffer(os.urandom(16 * missing), np.uint8).reshape(missing, 16).copy()
        )
        fresh = fresh.view(ids.dtype).reshape(missing, ids.shape[1])
        if missing == n:
            ids[:] = fresh
        else:
            ids[blank] = fresh
    return records


# Fresh ids for one record at a time, drawn 256 at a time: os.urandom is a system call.
# popleft is atomic, so threads never share an id; a forked child drops the pool (the
# hook is registered on first use, not at import).
_ids: deque[bytes] = deque()
_fork_hook: list[bool] = []


def fresh_id_bytes() -> bytes:
    """The 16 bytes of a fresh random (version 4) UUID."""
    while True:
        try:
            return _ids.popleft()
        except IndexError:
            pass
        if not _fork_hook and hasattr(os, "register_at_fork"):
            _fork_hook.append(True)
            os.register_at_fork(after_in_child=_ids.clear)
        raw = _version4(np.frombuffer(os.urandom(4096), np.uint8).reshape(256, 16).copy())
        block = raw.tobytes()
        _ids.extend([block[i : i + 16] for i in range(0, 4096, 16)])


def message_from_record_bytes(cls: type, raw: bytes) -> Any:
    """The message of class ``cls`` whose record is ``raw`` (what ``as_record_pickle``
    stores; kept by this name, since stored pickles refer to it)."""
    layout = record_layout(cls)
    return layout.build(layout.unpack_from(raw))


class _RecordPickle:
    """Pickles as a call of ``message_from_record_bytes``: the class, then its bytes."""

    __slots__ = ("cls", "raw")

    def __init__(self, cls: type, raw: bytes) -> None:
        self.cls, self.raw = cls, raw

    def __reduce__(self) -> tuple[Any, tuple[type, bytes]]:
        return message_from_record_bytes, (self.cls, self.raw)


def as_record_pickle(msg: Any) -> Any:
    """``msg`` in a form that pickles as its record (a class reference and the record's
    bytes), or None when its record would not give back exactly ``msg``: a class
    without a built record layout, fields of other types than the record gives back
    (an ``int`` held in an ``np.int64`` field, say), subarray fields, or attributes
    beyond the fields. A numpy scalar field alone pickles to about 100 bytes; the
    whole record of a small message is a few dozen."""
    cls = type(msg)
    layout = cls.__dict__.get(_LAYOUT)
    state = getattr(msg, "__dict__", None)
    if type(layout) is not RecordLayout or state is None or len(state) != len(layout._slots):
        return None
    try:
        raw = layout.pack(msg)
    except Exception:  # noqa: BLE001 - it does not fit its record: pickled as it is
        return None
    back = layout.build(layout.unpack_from(raw)).__dict__
    for name, value in state.items():
        other = back.get(name, _MISSING)
        if type(other) is not type(value) or isinstance(value, np.ndarray) or other != value:
            return None
    return _RecordPickle(cls, raw)


_MISSING = object()
