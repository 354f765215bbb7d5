"""Plain records a flow hands out: item states, dead letters, and the token a worker holds."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

__all__ = ["ACTIVE", "CANCELLED", "DEAD", "DONE", "DeadLetter", "Token", "decode", "encode"]

ACTIVE = "active"  # submitted, not finished
DONE = "done"  # finished, result stored
DEAD = "dead"  # a stage ran out of attempts; see the dead letters
CANCELLED = "cancelled"  # in-memory flow cancelled or closed before the item finished


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


def encode(value: Any) -> bytes:
    """Values cross the journal and process boundaries pickled: exact types, any object."""
    return pickle.dumps(value, protocol=5)


def decode(blob: bytes) -> Any:
    return pickle.loads(blob)
