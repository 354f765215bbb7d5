"""@message and RingKernelMessage: dataclass shape, header fields, priority, registry."""

from __future__ import annotations

import dataclasses
import pickle
import uuid
from dataclasses import dataclass, field

import numpy as np
import pytest

from pydotcompute.errors import MessageDeserializationError
from pydotcompute.messages import RingKernelMessage, decode, encode, message, message_type


@message
class Plain:
    value: float
    label: str = "x"

    def doubled(self) -> float:
        return self.value * 2


@message
@dataclass
class FromDataclass:
    count: int
    items: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.total = self.count * 10


@dataclass
@message
class DataclassAbove:
    count: int
    items: list = field(default_factory=list)


class Sub(RingKernelMessage):
    value: float
    tags: tuple = ()


@message
class DecoratedSub(RingKernelMessage):
    value: float


@message
class OwnHeader:
    value: float
    priority: int = 7
    correlation_id: str | None = "none-yet"


@message(name="custom.Name")
class Named:
    x: int = 0


HEADER = ["message_id", "priority", "correlation_id"]


@pytest.mark.parametrize("cls", [Plain, FromDataclass, DataclassAbove, Sub, DecoratedSub])
def test_every_form_is_a_dataclass_message_with_the_header_first(cls: type) -> None:
    assert dataclasses.is_dataclass(cls)
    assert issubclass(cls, RingKernelMessage)
    names = [f.name for f in dataclasses.fields(cls)]
    assert names[:3] == HEADER
    m = cls(1)  # the first own field positionally, header fields defaulted
    assert isinstance(m.message_id, uuid.UUID) and m.message_id.version == 4
    assert m.priority == 128
    assert m.correlation_id is None
    assert isinstance(m, RingKernelMessage)


def test_own_fields_without_defaults_come_before_keyword_only_header() -> None:
    cid = uuid.uuid4()
    m = Plain(2.5, "y", priority=3, correlation_id=cid)
    assert (m.value, m.label, m.priority, m.correlation_id) == (2.5, "y", 3, cid)
    with pytest.raises(TypeError):
        Plain(2.5, "y", uuid.uuid4())  # the header is keyword-only


def test_each_message_gets_a_fresh_id() -> None:
    assert Plain(1.0).message_id != Plain(1.0).message_id


def test_methods_post_init_and_default_factories_survive() -> None:
    assert Plain(1.5).doubled() == 3.0
    m = FromDataclass(2)
    assert m.total == 20 and m.items == []
    assert FromDataclass(1).items is not FromDataclass(1).items
    d = DataclassAbove(3)
    assert d.items == [] and d.priority == 128
    assert DataclassAbove(1).items is not DataclassAbove(1).items


def test_declared_header_fields_are_kept_and_keyword_only() -> None:
    m = OwnHeader(1.0)
    assert m.priority == 7
    assert m.correlation_id == "none-yet"
    assert OwnHeader(1.0, priority=9).priority == 9
    assert isinstance(m.message_id, uuid.UUID)


@pytest.mark.parametrize("bad", [-1, 256, 1000])
def test_priority_out_of_range_raises(bad: int) -> None:
    with pytest.raises(ValueError, match=f"priority must be in 0..255, got {bad}"):
        Plain(1.0, priority=bad)


@pytest.mark.parametrize("bad", [True, False, 1.0, "5", None, np.bool_(True)])
def test_priority_must_be_an_int(bad: object) -> None:
    with pytest.raises(ValueError, match="priority must be an int in 0..255"):
        Sub(1.0, priority=bad)


def test_priority_bounds_and_numpy_ints_are_accepted() -> None:
    assert Plain(1.0, priority=0).priority == 0
    assert Plain(1.0, priority=255).priority == 255
    p = Plain(1.0, priority=np.uint8(9)).priority
    assert p == 9 and type(p) is int


def test_priority_is_checked_before_the_class_post_init() -> None:
    seen = []

    @message
    class Watched:
        x: int = 0

        def __post_init__(self) -> None:
            seen.append(self.priority)

    Watched(priority=5)
    with pytest.raises(ValueError):
        Watched(priority=300)
    assert seen == [5]


def test_subclass_post_init_does_not_skip_validation() -> None:
    class WithHook(RingKernelMessage):
        x: int = 0

        def __post_init__(self) -> None:
            self.y = self.x + 1

    assert WithHook(2).y == 3
    with pytest.raises(ValueError):
        WithHook(priority=-5)


def test_equality_compares_fields_including_arrays() -> None:
    mid = uuid.uuid4()
    a = Sub(1.0, message_id=mid)
    assert a == Sub(1.0, message_id=mid)
    assert a != Sub(2.0, message_id=mid)
    assert a != Sub(1.0)

    @message
    class WithArray:
        data: np.ndarray

    x = WithArray(np.arange(3), message_id=mid)
    assert x == WithArray(np.arange(3), message_id=mid)
    assert x != WithArray(np.arange(4), message_id=mid)
    assert x != WithArray(np.arange(3.0), message_id=mid)  # dtype differs


def test_registry_names_are_module_qualified_and_overridable() -> None:
    assert Plain.__message_type__ == f"{__name__}.Plain"
    assert message_type(f"{__name__}.Plain") is Plain
    assert Named.__message_type__ == "custom.Name"
    assert message_type("custom.Name") is Named
    assert message_type(f"{__name__}.Named") is None  # renamed, not registered twice
    assert isinstance(decode(encode(Named(3))), Named)


def test_redefining_a_class_replaces_its_registration() -> None:
    def define(extra: bool) -> type:
        @message(name="tests.Redefined")
        class Redefined:
            x: int = 0

        return Redefined

    first = define(False)
    second = define(True)
    assert first is not second
    assert message_type("tests.Redefined") is second
    back = decode(encode(first(5)))
    assert type(back) is second and back.x == 5
    # The stale class can still read its own bytes.
    assert first.deserialize(encode(first(6))).x == 6


def test_deserialize_accepts_subclasses_and_rejects_others() -> None:
    class Child(Sub):
        extra: int = 0

    data = Child(1.0, extra=2).serialize()
    assert isinstance(Sub.deserialize(data), Child)
    with pytest.raises(MessageDeserializationError, match=f"expected {__name__}.Plain, got"):
        Plain.deserialize(data)


def test_messages_pickle() -> None:
    m = Plain(1.5, "z", priority=4)
    assert pickle.loads(pickle.dumps(m)) == m


def test_message_rejects_non_classes() -> None:
    with pytest.raises(TypeError, match="@message decorates a class"):
        message(lambda: None)  # type: ignore[arg-type]


def test_frozen_dataclasses_are_refused_clearly() -> None:
    with pytest.raises(TypeError, match="cannot make frozen dataclass .*Frozen a message"):

        @message
        @dataclass(frozen=True)
        class Frozen:
            x: int = 0


class Base:
    def describe(self) -> str:
        return "base"


def test_inherited_methods_and_zero_argument_super_work() -> None:
    @message
    class Derived(Base):
        x: int = 1

        def describe(self) -> str:
            return "derived+" + super().describe()

    assert Derived().describe() == "derived+base"
    assert isinstance(Derived(), Base)


def test_dataclass_above_message_keeps_array_aware_equality() -> None:
    @dataclass
    @message
    class Outer:
        data: np.ndarray

    mid = uuid.uuid4()
    assert Outer(np.arange(3), message_id=mid) == Outer(np.arange(3), message_id=mid)


def test_a_class_defined_equality_is_kept() -> None:
    @message
    class ById:
        x: int = 0

        def __eq__(self, other: object) -> bool:
            return isinstance(other, ById) and other.message_id == self.message_id

    a = ById(1)
    assert a == ById(2, message_id=a.message_id)
