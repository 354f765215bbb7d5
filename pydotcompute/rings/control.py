"""The control block: the words a compiled kernel's loop and the host share.

One layout for every ring backend: the ``cpu`` backend's worker threads and the
``cuda`` backend's persistent kernel read the host's command from ``STATE`` and
publish their counters in the other fields. Offsets are in bytes; device code uses
them as int64 word indices (``backends.cuda_loop.ControlWords``).
"""

from __future__ import annotations

import numpy as np

from pydotcompute.rings.layout import aligned_buffer

__all__ = ["ControlBlock"]


class ControlBlock:
    """A kernel's control block: one int64 array the loop and the host share.

    Each field sits on its own 128-byte line (offsets below are in bytes), so the
    host polling counters never contends with the workers' hot lines more than it
    must. The state word is written by the host, everything else by the workers,
    except the wake words (``rings.wake``) beside the state word, which a receiver
    arms and the worker that publishes output disarms.
    """

    STATE = 0
    WAKE = 8
    PROCESSED = 128
    EMITTED = 256
    DROPPED = 384
    IDLE_POLLS = 512
    ERRORS = 640
    HEARTBEAT = 768
    ERROR_CODE = 896
    NBYTES = 1024

    INACTIVE = 0
    ACTIVE = 1
    TERMINATE = 2
    HALT = 3
    """A worker's handler raised: the others finish the batch in hand, queue its
    outputs (waiting for room, unlike TERMINATE) and exit."""

    ERR_NONE = 0
    ERR_HANDLER = 1
    """The handler (or the loop) raised; the exception is kept by the host side."""

    def __init__(self) -> None:
        self.words = aligned_buffer(self.NBYTES).view(np.int64)

    def __getitem__(self, offset: int) -> int:
        return int(self.words[offset // 8])

    def set_state(self, value: int) -> None:
        self.words[self.STATE // 8] = value

    def snapshot(self) -> dict[str, int]:
        """All fields by name."""
        names = ("processed", "emitted", "dropped", "idle_polls", "errors", "heartbeat")
        offs = (
            self.PROCESSED,
            self.EMITTED,
            self.DROPPED,
            self.IDLE_POLLS,
            self.ERRORS,
            self.HEARTBEAT,
        )
        out = {n: self[o] for n, o in zip(names, offs, strict=True)}
        out["state"] = self[self.STATE]
        out["error_code"] = self[self.ERROR_CODE]
        return out
