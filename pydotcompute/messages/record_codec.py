"""One side of a kernel's messages as records: the conversion every ring backend uses.

A compiled kernel's input and output are records of a fixed dtype. What a caller
sends may be an ``@message`` instance, a record (``np.void``) or a record array, or an
object of a class with ``to_record``/``from_record``; what it receives is the same
kind it declared. ``RecordCodec`` does that conversion for one side of one kernel, so
the host side of the rings (``backends.ring_fed``) and the Ray placement
(``cluster.ray_backend``) convert alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pydotcompute.messages.message import RingKernelMessage
from pydotcompute.messages.record import (
    RecordLayout,
    fill_message_ids,
    fresh_id_bytes,
    record_layout,
)

__all__ = ["RecordCodec", "message_layout"]

_NO_ID = bytes(16)


def message_layout(t: Any, dtype: np.dtype) -> RecordLayout | None:
    """The record layout of an ``@message`` class whose records are ``dtype`` (None
    for numpy dtypes and other types)."""
    if not isinstance(t, type) or not issubclass(t, RingKernelMessage):
        return None
    layout = record_layout(t)
    return layout if layout.dtype == dtype else None


class RecordCodec:
    """Messages of type ``t`` ↔ records of ``dtype``, for ``owner`` (named in errors).

    ``fill_ids``: give decoded messages a fresh ``message_id`` where the record has
    none (the producer of the records did not set one). For ``@message`` classes the
    bytes are packed and unpacked directly through the class's layout, without an
    intermediate numpy scalar, into and out of a reused one-record scratch array.
    """

    __slots__ = ("type", "dtype", "owner", "layout", "fill_ids", "_one", "_one_bytes")

    def __init__(self, t: Any, dtype: np.dtype, owner: str, *, fill_ids: bool = True) -> None:
        self.type = t
        self.dtype = dtype
        self.owner = owner
        self.layout = message_layout(t, dtype)
        self.fill_ids = fill_ids
        self._one = np.zeros(1, dtype)
        self._one_bytes = memoryview(self._one.view(np.uint8))  # type: ignore[arg-type]

    # -- messages to records ---------------------------------------------------------

    def records(self, records: object) -> np.ndarray:
        """``records`` as a contiguous 1-d array of the dtype, or ``TypeError``."""
        if not isinstance(records, np.ndarray):
            raise TypeError(
                f"{self.owner} takes record arrays of dtype {self.dtype}, "
                f"got {type(records).__name__}"
            )
        if records.dtype != self.dtype:
            raise TypeError(
                f"{self.owner} takes records of dtype {self.dtype}, got dtype {records.dtype}"
            )
        if records.ndim != 1 or not records.flags.c_contiguous:
            records = np.ascontiguousarray(records.reshape(-1))
        return records

    def record_of(self, msg: Any) -> np.ndarray:
        """One message as a 1-record array. For ``@message`` classes and records of the
        dtype this is the reused scratch array: copy it before the next call."""
        if type(msg) is np.void and msg.dtype == self.dtype:
            one = self._one
            one[0] = msg  # half the cost of viewing it as an array
            return one
        if isinstance(msg, (np.void, np.ndarray)):
            return self.records(np.asarray(msg).reshape(-1))
        t = self.type
        if t is not None and not isinstance(t, np.dtype) and not isinstance(msg, t):
            raise TypeError(f"{self.owner} takes {t.__name__}, got {type(msg).__name__}")
        if self.layout is not None:
            self._one_bytes[:] = self.layout.to_bytes(msg)
            return self._one
        one = np.empty(1, self.dtype)
        one[0] = msg.to_record()
        return one

    def to_bytes(self, msg: Any) -> bytes:
        """The bytes of exactly one message's record."""
        rec = self.record_of(msg)
        if len(rec) != 1:
            raise TypeError(f"{self.owner} takes one record of dtype {self.dtype}, got {len(rec)}")
        return rec.tobytes()

    # -- records to messages ---------------------------------------------------------

    def scratch(self) -> np.ndarray:
        """A one-record array to pop an output into: the reused one where
        ``message_of`` copies out of it, a fresh one where it returns the record."""
        return self._one if self.layout is not None else np.empty(1, self.dtype)

    def message_of(self, one: np.ndarray) -> Any:
        """The message in a 1-record array (the record itself for dtypes)."""
        layout = self.layout
        if layout is not None:
            v = layout.unpack_from(one)  # type: ignore[arg-type]
            if v[0] == _NO_ID and self.fill_ids:
                # message_id leads every layout; the producer set none.
                v = (fresh_id_bytes(), *v[1:])
            return layout.build(v)
        if self.fill_ids:
            fill_message_ids(one)
        t = self.type
        if t is None or isinstance(t, np.dtype):
            return one[0]
        return t.from_record(one[0])

    def message_at(self, records: np.ndarray, i: int) -> Any:
        """The message of record ``i`` of ``records`` (a copy, never a view)."""
        layout = self.layout
        if layout is None:
            return self.message_of(records[i : i + 1].copy())
        v = layout.struct.unpack_from(records, i * records.itemsize)  # type: ignore[arg-type]
        if v[0] == _NO_ID and self.fill_ids:
            v = (fresh_id_bytes(), *v[1:])
        return layout.build(v)
