"""Messages a journal stores as their records: exact round trips, smaller rows, and the
fall back to a plain pickle whenever the record would not give back exactly the same
message."""

from __future__ import annotations

import pickle
import uuid
from typing import Annotated

import numpy as np

from pydotcompute import message
from pydotcompute.coordinator.records import decode, encode
from pydotcompute.messages import messages_from_records, records_from_messages
from pydotcompute.messages.record import as_record_pickle


@message
class Reading:
    x: np.int64
    v: np.float32
    n: int
    ok: bool


@message
class Window:
    samples: Annotated[np.ndarray, (4,), np.float32]


def _kernel_output() -> Reading:
    """A message as a compiled kernel's output decodes: numpy scalar fields, both ids."""
    sent = Reading(x=np.int64(7), v=np.float32(0.5), n=3, ok=True)
    recs = records_from_messages([sent], Reading)
    recs["correlation_id"] = recs["message_id"]
    (out,) = messages_from_records(Reading, recs)
    return out


def _same(a: object, b: object) -> None:
    assert a.__dict__.keys() == b.__dict__.keys()
    for name, value in a.__dict__.items():
        assert type(b.__dict__[name]) is type(value), name
        assert b.__dict__[name] == value, name


def test_a_kernel_output_is_stored_as_its_record_and_comes_back_exactly() -> None:
    out = _kernel_output()
    assert isinstance(out.x, np.int64) and isinstance(out.correlation_id, uuid.UUID)
    assert as_record_pickle(out) is not None
    row = encode(out)
    back = decode(row)
    assert type(back) is Reading
    _same(out, back)
    assert len(row) < len(b"x" * 5) + len(pickle.dumps(out, protocol=5))  # smaller


def test_fields_the_record_would_change_are_pickled_as_they_are() -> None:
    held = Reading(x=7, v=np.float32(0.5), n=3, ok=True)  # an int in an np.int64 field
    recs = records_from_messages([held], Reading)  # the class's layout exists now
    assert len(recs) == 1 and as_record_pickle(held) is None
    back = decode(encode(held))
    assert type(back.x) is int
    _same(held, back)


def test_extra_attributes_subarrays_and_nan_fall_back() -> None:
    out = _kernel_output()
    out.note = "kept"  # type: ignore[attr-defined]
    assert as_record_pickle(out) is None
    assert decode(encode(out)).note == "kept"
    w = Window(samples=np.arange(4, dtype=np.float32))
    records_from_messages([w], Window)
    assert as_record_pickle(w) is None
    assert np.array_equal(decode(encode(w)).samples, w.samples)
    nan = _kernel_output()
    nan.v = np.float32("nan")
    assert as_record_pickle(nan) is None


@message
class Fresh:
    x: float


def test_a_class_without_a_record_layout_yet_is_pickled() -> None:
    m = Fresh(x=1.5)
    assert as_record_pickle(m) is None
    assert decode(encode(m)).x == 1.5
