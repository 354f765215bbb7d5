"""Message ids: random version-4 UUIDs, three times cheaper to make than ``uuid.uuid4()``.

``uuid.uuid4()`` asks the OS for 16 bytes and validates them in ``UUID.__init__``:
about 2.3 us, most of what building a small message costs. ``new_id()`` returns the
same thing -- a ``uuid.UUID``, version 4, RFC 4122 variant, its 122 random bits from
``os.urandom`` -- for about 0.8 us: it takes the OS's random bytes 4 KiB at a time
(256 ids per system call) and builds the UUID the way ``UUID.__init__`` ends.

``@message`` uses it as the ``message_id`` default wherever a class asks for
``uuid.uuid4``: same values, same type, less time.

Ids are handed out by ``next()`` on a ``struct.iter_unpack`` iterator, one C call
under the GIL, so two threads never get the same bytes. A forked child drops the
bytes it inherited (``os.register_at_fork``, registered on first use), so it never
repeats its parent's ids. Where the interpreter runs without a GIL, a shared iterator
is not safe, and ``new_id`` is ``uuid.uuid4`` itself.
"""

from __future__ import annotations

import os
import struct
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["new_id", "faster_factory"]

_BATCH_BYTES = 4096
_unpack_pairs = struct.Struct(">QQ").iter_unpack
_urandom = os.urandom
_new = object.__new__
_set = object.__setattr__
_UUID = uuid.UUID
_SAFE_UNKNOWN = uuid.SafeUUID.unknown
# Version 4 in the high nibble of byte 6, variant 0b10 in the top bits of byte 8 (what
# UUID(version=4) sets), written into a whole batch at once by bytes.translate.
_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT_RFC_4122 = bytes((b & 0x3F) | 0x80 for b in range(256))

_pairs: Iterator[tuple[int, int]] = iter(())
_fork_hook_registered = False


def _forget_inherited_bytes() -> None:
    global _pairs
    _pairs = iter(())


def _refill() -> Iterator[tuple[int, int]]:
    global _pairs, _fork_hook_registered
    if not _fork_hook_registered:
        _fork_hook_registered = True
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_forget_inherited_bytes)
    batch = bytearray(_urandom(_BATCH_BYTES))
    batch[6::16] = batch[6::16].translate(_VERSION_4)
    batch[8::16] = batch[8::16].translate(_VARIANT_RFC_4122)
    _pairs = pairs = _unpack_pairs(bytes(batch))
    return pairs


def _new_id() -> uuid.UUID:
    try:
        hi, lo = next(_pairs)
    except StopIteration:
        hi, lo = next(_refill())  # this thread's own fresh batch
    u = _new(_UUID)
    _set(u, "int", hi << 64 | lo)
    _set(u, "is_safe", _SAFE_UNKNOWN)
    return u


_gil_enabled = getattr(sys, "_is_gil_enabled", lambda: True)()
new_id: Callable[[], uuid.UUID] = _new_id if _gil_enabled else uuid.uuid4
"""A fresh random version-4 UUID, like ``uuid.uuid4()``."""


def faster_factory(factory: Any) -> Any:
    """``new_id`` where ``factory`` is ``uuid.uuid4``; anything else unchanged."""
    return new_id if factory is uuid.uuid4 else factory
