"""Message classes: ``@message`` and the ``RingKernelMessage`` base.

Every message is a dataclass that subclasses ``RingKernelMessage`` and carries three
header fields: ``message_id`` (a fresh random version-4 UUID, made by ``ids.new_id``,
which also replaces a class's own ``default_factory=uuid.uuid4``), ``priority`` (0-255, default 128) and
``correlation_id`` (None). Header fields are keyword-only, so a message's own fields may
go without defaults: ``Reading(1.5)`` and ``Reading(1.5, priority=7)`` both work.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload
from uuid import UUID

import numpy as np

from pydotcompute.messages import codec, record
from pydotcompute.messages.ids import faster_factory, new_id
from pydotcompute.messages.record import HEADER_FIELDS
from pydotcompute.messages.registry import message_type_name, register_message_type

__all__ = ["RingKernelMessage", "message"]

# Type checkers learn from this marker that ``@message`` makes a dataclass; at run
# time it only records that fact on the function.
if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
elif sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:

    def dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        return lambda f: f


T = TypeVar("T")
Msg = TypeVar("Msg", bound="RingKernelMessage")

_VALIDATES = "__validates_priority__"
_PRIORITIES = frozenset(range(256))


def check_priority(priority: Any) -> int:
    """``priority`` as an int in 0..255; ``ValueError`` otherwise (bools are not ints here)."""
    if type(priority) is int and 0 <= priority <= 255:
        return priority
    if isinstance(priority, (int, np.integer)) and not isinstance(priority, (bool, np.bool_)):
        if 0 <= priority <= 255:
            return int(priority)
        raise ValueError(f"priority must be in 0..255, got {priority}")
    raise ValueError(f"priority must be an int in 0..255, got {type(priority).__name__}")


def _validating(post_init: Callable[[Any], None] | None) -> Callable[[Any], None]:
    """A ``__post_init__`` that checks the priority, then runs the class's own."""

    # Run for every message built: a class test and a set lookup (fewer steps than
    # a chained comparison) pass a valid priority; anything else is checked in full.
    if post_init is None:

        def __post_init__(self: Any) -> None:
            priority = self.priority
            if priority.__class__ is not int or priority not in _PRIORITIES:
                object.__setattr__(self, "priority", check_priority(priority))

    else:

        def __post_init__(self: Any) -> None:
            priority = self.priority
            if priority.__class__ is not int or priority not in _PRIORITIES:
                object.__setattr__(self, "priority", check_priority(priority))
            post_init(self)

    setattr(__post_init__, _VALIDATES, True)
    setattr(__post_init__, record._CHECKS_ONLY_PRIORITY, post_init is None)
    return __post_init__


class _RecordDtype:
    """``Cls.__record_dtype__``: computed on first access; raises for variable-size classes."""

    def __get__(self, obj: Any, owner: type) -> np.dtype:
        return record.record_dtype_of(owner)


def _keyword_only_header(cls: type) -> None:
    """Make header fields that ``cls`` declares itself keyword-only, as ours are."""
    own = cls.__dict__.get("__annotations__", {})
    for name in HEADER_FIELDS:
        if name not in own:
            continue
        value = cls.__dict__.get(name, dataclasses.MISSING)
        if isinstance(value, dataclasses.Field):
            value.kw_only = True
            value.default_factory = faster_factory(value.default_factory)
        elif value is dataclasses.MISSING:
            setattr(cls, name, dataclasses.field(kw_only=True))
        else:
            setattr(cls, name, dataclasses.field(default=value, kw_only=True))


def _as_dataclass(cls: type) -> None:
    """Apply ``dataclass`` in place so that applying it once more changes nothing.

    ``dataclass`` removes the class attributes of fields built with ``field(...)``, so a
    second ``@dataclass`` (written above ``@message``) would find those fields without
    their defaults. Putting the ``Field`` objects back keeps a second pass identical.
    """
    own = cls.__dict__.get("__annotations__", {})
    specs = {n: v for n, v in cls.__dict__.items() if n in own and isinstance(v, dataclasses.Field)}
    # eq=False: equality comes from RingKernelMessage, which also compares array fields.
    dataclasses.dataclass(cls, eq=False)
    for name, spec in specs.items():
        setattr(cls, name, spec)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            type(a) is type(b)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(np.array_equal(a, b))
        )
    return bool(a == b)


@dataclasses.dataclass(eq=False)
class RingKernelMessage:
    """Base class of every message. Subclasses become dataclasses and are registered by
    their module-qualified name (or the ``name`` given to ``@message``)."""

    message_id: UUID = dataclasses.field(default_factory=new_id, kw_only=True)
    priority: int = dataclasses.field(default=128, kw_only=True)
    correlation_id: UUID | None = dataclasses.field(default=None, kw_only=True)

    __record_dtype__ = _RecordDtype()

    __post_init__ = _validating(None)  # type: ignore[misc]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        post_init = cls.__post_init__
        if not getattr(post_init, _VALIDATES, False):
            cls.__post_init__ = _validating(post_init)
        if cls.__eq__ is RingKernelMessage.__eq__:
            # Pinned so that a @dataclass written above @message keeps this equality.
            cls.__eq__ = RingKernelMessage.__eq__  # type: ignore[method-assign]
        _keyword_only_header(cls)
        _as_dataclass(cls)
        register_message_type(cls, message_type_name(cls))

    def __eq__(self, other: object) -> bool:
        """Field-by-field equality of two messages of one class; array fields compare by
        shape, dtype and contents."""
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(
            _same(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.compare
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dataclass with eq

    def serialize(self) -> bytes:
        """This message as msgpack bytes (``MessageSerializationError`` names a bad field)."""
        return codec.encode(self)

    @classmethod
    def deserialize(cls: type[Msg], data: bytes | bytearray | memoryview) -> Msg:
        """A message of this class from bytes made by ``serialize``."""
        return codec.decode(data, cls)

    def with_correlation(self: Msg, correlation_id: UUID | None) -> Msg:
        """A copy of this message (same ``message_id``) with ``correlation_id`` set."""
        return dataclasses.replace(self, correlation_id=correlation_id)

    def to_record(self) -> np.void:
        """This message as one record (a ``numpy.void``, like an element of a record array)."""
        return record.to_record(self)

    @classmethod
    def from_record(cls: type[Msg], rec: Any) -> Msg:
        """A message of this class from one record."""
        return record.from_record(cls, rec)


register_message_type(RingKernelMessage, message_type_name(RingKernelMessage))


def _messagify(cls: type, name: str | None) -> type:
    if isinstance(cls, type) and issubclass(cls, RingKernelMessage):
        target = cls  # already made a dataclass and registered by __init_subclass__
    elif isinstance(cls, type):
        if "__dataclass_fields__" not in cls.__dict__:
            dataclasses.dataclass(cls, eq=False)
        elif cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            # The header is part of a mutable base; a frozen subclass of it cannot exist.
            raise TypeError(
                f"@message cannot make frozen dataclass {cls.__qualname__} a message; "
                "drop frozen=True"
            )
        # The message class is a subclass of the user's class and of RingKernelMessage:
        # methods (zero-argument super() included) keep working, isinstance checks hold,
        # and the header comes from the base.
        namespace: dict[str, Any] = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__annotations__": {},
        }
        declared = cls.__dataclass_fields__  # type: ignore[attr-defined]
        for header in HEADER_FIELDS:
            if header in declared:
                f = declared[header]
                namespace["__annotations__"][header] = f.type
                namespace[header] = dataclasses.field(
                    default=f.default,
                    default_factory=faster_factory(f.default_factory),
                    repr=f.repr,
                    compare=f.compare,
                    kw_only=True,
                )
        meta: Any = type(cls)
        target = meta(cls.__name__, (cls, RingKernelMessage), namespace)
    else:
        raise TypeError(f"@message decorates a class, got {type(cls).__name__}")
    if name is not None:
        register_message_type(target, name)
    return target


@overload
@dataclass_transform(field_specifiers=(dataclasses.field,))
def message(cls: type[T], /) -> type[T]: ...
@overload
@dataclass_transform(field_specifiers=(dataclasses.field,))
def message(*, name: str | None = None) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(field_specifiers=(dataclasses.field,))
def message(cls: type[T] | None = None, /, *, name: str | None = None) -> Any:
    """Make a class a message: a dataclass subclassing ``RingKernelMessage`` with the
    header fields, registered for decoding under ``name`` (default: the module-qualified
    class name). Works on a plain annotated class or a ``@dataclass``.
    """
    if cls is None:
        return lambda c: _messagify(c, name)
    return _messagify(cls, name)
