"""The msgpack codec: message objects to bytes and back, without knowing the type.

Wire format: a message is the msgpack array ``[type name, {field name: value}]``. Values
msgpack has no type for travel as msgpack extension types (codes below), so they come
back as what they were: UUIDs, tuples, numpy arrays and scalars, datetimes, dates and
nested messages (any depth, also inside lists and dicts). Fields the receiver's class
does not have are ignored, so an older reader accepts a newer writer's extra fields.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable
from datetime import date, datetime
from typing import Any, TypeVar

import msgpack
import numpy as np

from pydotcompute.errors import MessageDeserializationError, MessageSerializationError
from pydotcompute.messages.registry import message_type

__all__ = ["encode", "decode", "deserialize_message", "EXT_CODES"]

M = TypeVar("M")

EXT_MESSAGE = 1
EXT_UUID = 2
EXT_NDARRAY = 3
EXT_NPSCALAR = 4
EXT_DATETIME = 5
EXT_DATE = 6
EXT_TUPLE = 7

EXT_CODES = {
    "message": EXT_MESSAGE,
    "uuid": EXT_UUID,
    "ndarray": EXT_NDARRAY,
    "numpy scalar": EXT_NPSCALAR,
    "datetime": EXT_DATETIME,
    "date": EXT_DATE,
    "tuple": EXT_TUPLE,
}

_PLAN = "__message_codec_plan__"
_SAFE_UNKNOWN = uuid.SafeUUID.unknown
_ExtType = msgpack.ExtType


# --------------------------------------------------------------------------- plans


class _Plan:
    """What the codec needs to know about one message class, computed once."""

    __slots__ = ("names", "count", "init_names", "required", "has_non_init", "uuids")

    def __init__(self, cls: type) -> None:
        fields = dataclasses.fields(cls)
        self.names = tuple(f.name for f in fields)
        self.count = len(fields)
        self.init_names = frozenset(f.name for f in fields if f.init)
        self.required = tuple(
            f.name
            for f in fields
            if f.init
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        self.has_non_init = len(self.init_names) != self.count
        # Header ids typed UUID (unless the class typed them otherwise): a decoded
        # message must hold a UUID there (or None where the type allows it), whatever
        # the bytes said, as a constructed one does.
        self.uuids = tuple(
            (f.name, "None" in str(f.type) or "Optional" in str(f.type))
            for f in fields
            if f.name in ("message_id", "correlation_id") and "UUID" in str(f.type)
        )


def _plan(cls: type) -> _Plan:
    plan = cls.__dict__.get(_PLAN)
    if plan is None:
        if "__message_type__" not in cls.__dict__ or not dataclasses.is_dataclass(cls):
            raise MessageSerializationError(
                f"{cls.__module__}.{cls.__qualname__} is not a message class "
                "(decorate it with @message or subclass RingKernelMessage)"
            )
        plan = _Plan(cls)
        type.__setattr__(cls, _PLAN, plan)
    return plan


# --------------------------------------------------------------------------- encoding


def _describe_type(t: type) -> str:
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _packb(obj: Any) -> bytes:
    # Nested payloads get a fresh packer: the thread's shared one is busy with the outer
    # message while the ``default`` hook runs.
    packed: bytes = msgpack.packb(obj, default=_default, strict_types=True)
    return packed


def _dtype_descr(dt: np.dtype) -> Any:
    if dt.fields is None and dt.subdtype is None:
        return dt.str
    return np.lib.format.dtype_to_descr(dt)


def _array_payload(a: np.ndarray) -> bytes:
    if a.dtype.hasobject:
        raise TypeError("numpy arrays of dtype object are not supported")
    fortran = a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous
    header: bytes = msgpack.packb([_dtype_descr(a.dtype), list(a.shape), fortran])
    return len(header).to_bytes(4, "little") + header + a.tobytes("F" if fortran else "C")


def _fields_of(msg: Any, plan: _Plan) -> dict[str, Any]:
    d: dict[str, Any] | None = getattr(msg, "__dict__", None)
    if d is not None and len(d) == plan.count:
        return d
    return {n: getattr(msg, n) for n in plan.names}


def _default(obj: Any) -> Any:
    """msgpack's hook for every value that is not exactly a msgpack type."""
    t = type(obj)
    if t is uuid.UUID:
        return _ExtType(EXT_UUID, obj.int.to_bytes(16, "big"))
    if t is tuple:
        return msgpack.ExtType(EXT_TUPLE, _packb(list(obj)))
    if getattr(t, "__message_type__", None) is not None:
        return msgpack.ExtType(EXT_MESSAGE, _encode_with(obj, _packb))
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(EXT_NDARRAY, _array_payload(obj))
    if isinstance(obj, np.generic):
        return msgpack.ExtType(EXT_NPSCALAR, _array_payload(np.asarray(obj)))
    if isinstance(obj, datetime):
        return msgpack.ExtType(EXT_DATETIME, obj.isoformat().encode())
    if isinstance(obj, date):
        return msgpack.ExtType(EXT_DATE, obj.isoformat().encode())
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(EXT_UUID, obj.bytes)
    if isinstance(obj, tuple):  # named tuples come back as plain tuples
        return msgpack.ExtType(EXT_TUPLE, _packb(list(obj)))
    # Subclasses of msgpack's own types (IntEnum, OrderedDict, str enums...) travel as
    # their base type.
    base: Any
    for base in (int, float, str, bytes, list, dict):
        if isinstance(obj, base):
            return base(obj)
    raise TypeError(f"values of type {_describe_type(t)} are not supported")


def _reason(value: Any, exc: BaseException) -> str:
    if isinstance(exc, OverflowError):
        return "integer outside the 64-bit range msgpack can carry"
    if isinstance(exc, (TypeError, MessageSerializationError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc} (value of type {_describe_type(type(value))})"


def _explain(msg: Any, name: str, plan: _Plan, exc: BaseException) -> MessageSerializationError:
    """Find the field that made encoding fail; only runs after a failure."""
    for n in plan.names:
        try:
            value = getattr(msg, n)
        except AttributeError:
            return MessageSerializationError(f"cannot encode {name}: field {n!r} is not set")
        try:
            _packb(value)
        except Exception as field_exc:  # noqa: BLE001 - turned into the error we raise
            return MessageSerializationError(
                f"cannot encode field {n!r} of {name}: {_reason(value, field_exc)}"
            )
    return MessageSerializationError(f"cannot encode {name}: {_reason(msg, exc)}")


def _encode_with(msg: Any, pack: Callable[[Any], bytes]) -> bytes:
    cls = type(msg)
    plan = _plan(cls)
    name = cls.__dict__["__message_type__"]
    try:
        return pack([name, _fields_of(msg, plan)])
    except Exception as exc:
        raise _explain(msg, name, plan, exc) from exc


_local = threading.local()


def _thread_packer() -> msgpack.Packer:
    try:
        return _local.packer
    except AttributeError:
        # A Packer reused per thread saves building one per message; it resets its
        # buffer after every pack, failed ones included.
        _local.packer = msgpack.Packer(default=_default, strict_types=True)
        return _local.packer


def encode(msg: Any) -> bytes:
    """Encode a message object (any ``@message`` class) to msgpack bytes.

    Raises ``MessageSerializationError`` naming the field and the type that could not be
    encoded.
    """
    return _encode_with(msg, _thread_packer().pack)


# --------------------------------------------------------------------------- decoding


def _uuid(
    data: bytes,
    _new: Any = object.__new__,
    _set: Any = object.__setattr__,
    _int: Any = int.from_bytes,
    _cls: type = uuid.UUID,
) -> uuid.UUID:
    if len(data) != 16:
        raise ValueError(f"a UUID is 16 bytes, got {len(data)}")
    # uuid.UUID(bytes=...) re-validates what we already know is fine; this is what its
    # constructor ends with, at a fraction of the cost.
    u: uuid.UUID = _new(_cls)
    _set(u, "int", _int(data, "big"))
    _set(u, "is_safe", _SAFE_UNKNOWN)
    return u


def _dtype_from_descr(descr: Any) -> np.dtype:
    if isinstance(descr, str):
        return np.dtype(descr)
    return np.lib.format.descr_to_dtype(descr)


def _array(data: bytes) -> np.ndarray:
    n = int.from_bytes(data[:4], "little")
    descr, shape, fortran = msgpack.unpackb(data[4 : 4 + n])
    dt = _dtype_from_descr(descr)
    if dt.hasobject:
        raise ValueError("numpy arrays of dtype object are not supported")
    count = 1
    for s in shape:
        count *= s
    offset = 4 + n
    if len(data) - offset != count * dt.itemsize:
        raise ValueError(
            f"array of {count} x {dt.itemsize} bytes needs {count * dt.itemsize} bytes, "
            f"got {len(data) - offset}"
        )
    # One copy of the bytes (padding of structured dtypes included) into a writable
    # buffer the array owns; reshaping in the order it was sent makes no further copy.
    flat = np.frombuffer(bytearray(memoryview(data)[offset:]), dt, count=count)
    return flat.reshape(shape, order="F" if fortran else "C")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_UUID and len(data) == 16:
        return _uuid(data)
    try:
        if code == EXT_UUID:
            return _uuid(data)
        if code == EXT_MESSAGE:
            return _build(_unpackb(data), None)
        if code == EXT_TUPLE:
            return tuple(_unpackb(data))
        if code == EXT_NDARRAY:
            return _array(data)
        if code == EXT_NPSCALAR:
            return _array(data)[()]
        if code == EXT_DATETIME:
            return datetime.fromisoformat(data.decode())
        if code == EXT_DATE:
            return date.fromisoformat(data.decode())
    except MessageDeserializationError:
        raise
    except Exception as exc:
        kind = next(k for k, v in EXT_CODES.items() if v == code)
        raise MessageDeserializationError(f"bad {kind} value: {exc}") from exc
    raise MessageDeserializationError(f"unknown msgpack extension type {code}")


def _unpackb(data: bytes | bytearray | memoryview) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def _type_label(cls: type) -> str:
    return cls.__dict__.get("__message_type__") or f"{cls.__module__}.{cls.__qualname__}"


def _shape_of(obj: Any) -> str:
    if isinstance(obj, list):
        return f"array of {len(obj)}"
    return _describe_type(type(obj))


def _build(obj: Any, expected: type | None) -> Any:
    if (
        type(obj) is not list
        or len(obj) != 2
        or type(obj[0]) is not str
        or type(obj[1]) is not dict
    ):
        raise MessageDeserializationError(
            f"not a message: expected [type name, fields], got {_shape_of(obj)}"
        )
    name, fields = obj
    cls: Any
    if expected is not None and expected.__dict__.get("__message_type__") == name:
        cls = expected
    else:
        cls = message_type(name)
        if cls is None:
            raise MessageDeserializationError(f"unknown message type {name!r}")
        if expected is not None and not issubclass(cls, expected):
            raise MessageDeserializationError(f"expected {_type_label(expected)}, got {name}")
    plan = _plan(cls)
    if plan.has_non_init:
        fields = {k: v for k, v in fields.items() if k in plan.init_names}
    try:
        return _checked(cls(**fields), plan, name)
    except TypeError as exc:
        missing = [n for n in plan.required if n not in fields]
        if missing:
            which = ", ".join(repr(n) for n in missing)
            raise MessageDeserializationError(
                f"field{'s' if len(missing) > 1 else ''} {which} missing for {name}"
            ) from exc
        unknown = [k for k in fields if k not in plan.init_names]
        if not unknown:
            raise MessageDeserializationError(f"cannot build {name}: {exc}") from exc
    except ValueError as exc:
        raise MessageDeserializationError(f"invalid {name}: {exc}") from exc
    # Fields this class does not have (a newer writer's): ignored.
    known = {k: v for k, v in fields.items() if k in plan.init_names}
    try:
        msg = cls(**known)
    except (TypeError, ValueError) as exc:
        raise MessageDeserializationError(f"cannot build {name}: {exc}") from exc
    return _checked(msg, plan, name)


def _checked(msg: Any, plan: _Plan, name: str) -> Any:
    for field, optional in plan.uuids:
        value = getattr(msg, field)
        if type(value) is not uuid.UUID and not (optional and value is None):
            raise MessageDeserializationError(
                f"invalid {name}: {field} must be a UUID{' or None' if optional else ''}, "
                f"got {_describe_type(type(value))}"
            )
    return msg


def decode(data: bytes | bytearray | memoryview, expected: type[M] | None = None) -> M:
    """Decode bytes made by ``encode`` into a message of whatever type they name.

    With ``expected``, the message must be of that class (or a subclass). Raises
    ``MessageDeserializationError`` saying what was wrong.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageDeserializationError(f"expected bytes, got {_describe_type(type(data))}")
    try:
        obj = _unpackb(data)
    except MessageDeserializationError:
        raise
    except Exception as exc:
        why = str(exc) or type(exc).__name__  # msgpack's FormatError has no text
        raise MessageDeserializationError(f"not msgpack data: {why}") from exc
    msg: M = _build(obj, expected)
    return msg


def deserialize_message(data: bytes | bytearray | memoryview) -> Any:
    """PyDotCompute's name for ``decode(data)``: the message the bytes hold, of the
    registered type they name. Unknown types raise ``MessageDeserializationError``."""
    return decode(data)
