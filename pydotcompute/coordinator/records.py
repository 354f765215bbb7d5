"""Plain records a flow hands out: item states, dead letters, and the token a worker holds."""

from __future__ import annotations

import pickle
import zlib
from dataclasses import dataclass
from typing import Any

from pydotcompute.errors import JournalError
from pydotcompute.messages.record import as_record_pickle

__all__ = [
    "ACTIVE",
    "CANCELLED",
    "DEAD",
    "DONE",
    "FILTERED",
    "DeadLetter",
    "Token",
    "decode",
    "encode",
]

ACTIVE = "active"  # submitted, not finished
DONE = "done"  # finished, result stored
DEAD = "dead"  # a stage ran out of attempts; see the dead letters
CANCELLED = "cancelled"  # in-memory flow cancelled or closed before the item finished
FILTERED = "filtered"  # a stage consumed it without output (a handler returned False)


@dataclass(frozen=True)
class DeadLetter:
    """Why an item stopped: the stage, the last error and its traceback, the input it had."""

    key: str
    stage: str
    node: int
    error: str
    traceback: str
    attempts: int
    failed_at: float
    value: Any


class Token:
    """An item waiting at (or being run by) a call node: ``port`` 0 is the node's input."""

    __slots__ = ("failures", "key", "node", "value")

    def __init__(self, key: str, node: int, value: Any, failures: int = 0) -> None:
        self.key = key
        self.node = node
        self.value = value
        self.failures = failures


# A stored value: this mark, the CRC-32 of the pickle (4 bytes, big-endian), the pickle.
# A row damaged on disk, in transit or by a bad write fails the check and is refused,
# never read back as some other value. Rows written before the mark existed are bare
# protocol-5 pickles (they start with PROTO 5) and are still read.
ROW_MARK = b"\x01"
BARE_PICKLE = b"\x80\x05"


def encode(value: Any) -> bytes:
    """Values cross the journal and process boundaries pickled: exact types, any object.
    A message that its record gives back exactly is pickled as its record (what a
    compiled kernel stage hands on: numpy scalar fields cost ~10 us each to pickle
    one by one, measured). The journal is trusted data (unpickling runs code): the
    checksum catches damage, not forgery."""
    packed = as_record_pickle(value)
    body = pickle.dumps(value if packed is None else packed, protocol=5)
    return ROW_MARK + zlib.crc32(body).to_bytes(4, "big") + body


def decode(blob: bytes | bytearray | memoryview) -> Any:
    """A value ``encode`` stored; ``JournalError`` if the bytes are damaged or cannot
    be loaded here (e.g. the module that defines the value's type is missing)."""
    data = bytes(blob)
    if data[:1] == ROW_MARK:
        body = data[5:]
        if len(data) < 5 or zlib.crc32(body) != int.from_bytes(data[1:5], "big"):
            raise JournalError(
                f"a stored value is damaged ({len(data)} bytes, checksum does not match); "
                "the journal row was changed or cut after it was written"
            )
    elif data[:2] == BARE_PICKLE:
        body = data
    else:
        raise JournalError(
            f"a stored value is damaged: {len(data)} bytes starting {data[:8]!r} are not "
            "a value a journal holds"
        )
    try:
        return pickle.loads(body)
    except Exception as exc:
        raise JournalError(
            f"a stored value cannot be loaded here: {type(exc).__name__}: {exc}"
        ) from exc
