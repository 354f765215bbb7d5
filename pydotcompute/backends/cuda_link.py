"""Link rings: records from one resident ``cuda`` kernel to another, in device memory.

``RingKernelRuntime.link(a, b)`` on two ``cuda`` kernels relaunches ``a``'s loop with
its outputs going into a :class:`LinkRing` and ``b``'s loop reading its input from the
same ring (``cuda_loop``'s ``out_link``/``in_link``). The ring follows the ring
protocol like the host-mapped rings (tagged slots; producer side ``DEVICE``, consumer
side ``LINK``), but lives in device memory, so its records never cross PCIe and its
words are ordered at GPU scope. Capacity and backpressure are the consumer's.

The host touches a link ring only while neither kernel runs on it: to build it with
the records it starts with (what the consumer had not taken from its own input ring,
then what the producer had queued for the host) and, when the link ends, to take back
what is left for the consumer. Telemetry reads its header (a copy of 1 KiB).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.rings.host_ops import ring_pop
from pydotcompute.rings.host_ring import HostRing, RingCounters
from pydotcompute.rings.layout import HEADER_SIZE, OFF_CLAIM, OFF_PRODUCER_SIDE, RingSide

__all__ = ["LinkRing"]


class LinkRing:
    """A ring in device memory between two resident ``cuda`` kernels of one GPU.

    ``words`` is the device array both loops are launched with (int64 words, header
    and slots). ``seed`` records are in it from position 0, as if the producer had
    placed them."""

    def __init__(
        self,
        capacity: int,
        dtype: np.dtype,
        backpressure: BackpressureStrategy,
        seed: np.ndarray,
        stream: Any = None,
    ) -> None:
        from numba import cuda

        self.dtype = np.dtype(dtype)
        # Built on the host, where the host may play the producer for the seed, then
        # handed to the device: from there on the producer is a kernel.
        ring = HostRing(
            capacity,
            self.dtype,
            backpressure=backpressure,
            producer_side=RingSide.HOST,
            consumer_side=RingSide.LINK,
        )
        if len(seed) and ring.try_push_batch(seed) != len(seed):
            raise ValueError(f"{len(seed)} records do not fit a link ring of {capacity}")
        ring.buffer[:HEADER_SIZE].view(np.int64)[OFF_PRODUCER_SIDE // 8] = int(RingSide.DEVICE)
        self.capacity = capacity
        self.nbytes = ring.buffer.nbytes
        words = ring.buffer.view(np.int64)
        self.words = cuda.to_device(words) if stream is None else cuda.to_device(words, stream)
        self._stream = stream
        if stream is not None:
            stream.synchronize()

    def _copy(self, count: int) -> np.ndarray:
        """The first ``count`` words, copied out of device memory (as uint8)."""
        part = self.words[:count]
        if self._stream is None:
            host = part.copy_to_host()
        else:
            host = part.copy_to_host(stream=self._stream)
            self._stream.synchronize()
        return np.ascontiguousarray(host).view(np.uint8)

    def counters(self) -> RingCounters:
        """The header's indices and counters as the kernels last wrote them."""
        return RingCounters.of_header(self._copy(HEADER_SIZE // 8))

    def snapshot(self) -> HostRing:
        """A host copy of the whole ring (header and slots)."""
        return HostRing.attach(self._copy(self.nbytes // 8), self.dtype)

    def leftovers(self) -> np.ndarray:
        """The records placed and not yet released by the consumer, in order. Only
        while no kernel runs on the ring (both have exited their loops)."""
        buf = self._copy(self.nbytes // 8)
        header = buf[:HEADER_SIZE].view(np.int64)
        header[OFF_CLAIM // 8] = RingCounters.of_header(
            header
        ).released  # the consumer's claims were its own words
        out = []
        scratch = np.empty(min(1024, self.capacity), self.dtype)
        while got := int(ring_pop(buf, scratch, 0, len(scratch))):
            out.append(scratch[:got].copy())
        return np.concatenate(out) if out else np.zeros(0, self.dtype)
