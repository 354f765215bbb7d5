"""Link rings: records from one resident ``cuda`` kernel to another without the host.

``RingKernelRuntime.link(a, b)`` on two ``cuda`` kernels relaunches ``a``'s loop with
its outputs going into a :class:`LinkRing` and ``b``'s loop reading its input from the
same ring (``cuda_loop``'s ``out_link``/``in_link``). The ring follows the ring
protocol like the host-mapped rings (tagged slots; producer side ``DEVICE``, consumer
side ``LINK``). Capacity and backpressure are the consumer's. Where it lives
(:func:`link_memory`):

- both kernels on one GPU: that GPU's memory (``LINK_DEVICE``); no record crosses
  PCIe and words are ordered at GPU scope;
- on two GPUs with peer access: the consumer's GPU memory, written by the producer's
  GPU peer to peer (``LINK_PEER``; system scope);
- on two GPUs without it: mapped pinned host memory that both reach over PCIe
  (``LINK_HOST``; system scope).

The host touches a link ring only while neither kernel runs on it: to build it with
the records it starts with (what the consumer had not taken from its own input ring,
then what the producer had queued for the host) and, when the link ends, to take back
what is left for the consumer. Telemetry reads its header (a copy of 1 KiB).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pydotcompute.backends.cuda_loop import LINK_DEVICE, LINK_HOST, LINK_PEER
from pydotcompute.rings.backpressure import BackpressureStrategy
from pydotcompute.rings.host_ops import ring_pop
from pydotcompute.rings.host_ring import HostRing, RingCounters
from pydotcompute.rings.layout import HEADER_SIZE, OFF_CLAIM, OFF_PRODUCER_SIDE, RingSide

__all__ = ["LinkRing", "link_memory", "take_unreleased"]

_PEER_ACCESS_ALREADY_ENABLED = 704  # CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED


def _cuda() -> Any:
    from numba import cuda

    return cuda


def take_unreleased(buf: np.ndarray, dtype: np.dtype, capacity: int) -> np.ndarray:
    """The records of a crossing ring (``buf``) its device consumer has not released,
    in order, taken by the host once that consumer's loop has exited. The loop kept
    its claims in its own words, so the host claims from ``released``."""
    header = buf[:HEADER_SIZE].view(np.int64)
    header[OFF_CLAIM // 8] = RingCounters.of_header(header).released
    out = []
    scratch = np.empty(min(1024, capacity), dtype)
    while got := int(ring_pop(buf, scratch, 0, len(scratch))):
        out.append(scratch[:got].copy())
    return np.concatenate(out) if out else np.zeros(0, dtype)


def link_memory(producer: int, consumer: int) -> int:
    """Where a link from a kernel on GPU ``producer`` to one on GPU ``consumer`` keeps
    its ring: ``LINK_DEVICE`` (one GPU), ``LINK_PEER`` or ``LINK_HOST``."""
    if producer == consumer:
        return LINK_DEVICE
    cuda = _cuda()
    with cuda.gpus[producer]:
        peer = bool(cuda.current_context().can_access_peer(consumer))
    return LINK_PEER if peer else LINK_HOST


class LinkRing:
    """A ring between two resident ``cuda`` kernels, where ``kind`` says
    (``LINK_DEVICE``, ``LINK_PEER``, ``LINK_HOST``).

    ``words`` is the device array both loops are launched with (int64 words, header
    and slots). ``seed`` records are in it from position 0, as if the producer had
    placed them. ``path`` says in words where the records go."""

    def __init__(
        self,
        kind: int,
        producer: int,
        consumer: int,
        capacity: int,
        dtype: np.dtype,
        backpressure: BackpressureStrategy,
        seed: np.ndarray,
    ) -> None:
        self.kind, self.producer, self.consumer = kind, producer, consumer
        self.dtype = np.dtype(dtype)
        # Built on the host, where the host may play the producer for the seed, then
        # handed to the kernels: from there on the producer is a kernel.
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
        cuda = _cuda()
        self._host: np.ndarray | None = None
        if kind == LINK_HOST:
            self.words, self._host = _portable_mapped(words)
            self.path = (
                f"pinned host memory (GPU {producer} and GPU {consumer} have no peer access)"
            )
            return
        with cuda.gpus[consumer]:
            self.words = cuda.to_device(words)
        if kind == LINK_PEER:
            _enable_peer_access(producer, consumer)
            self.path = f"peer memory: GPU {producer} writes into GPU {consumer}'s memory"
        else:
            self.path = f"device memory of GPU {consumer}"

    def _copy(self, count: int) -> np.ndarray:
        """The first ``count`` words as they are now (as uint8)."""
        if self._host is not None:
            return self._host[:count].copy().view(np.uint8)
        cuda = _cuda()
        # The legacy default stream: the kernels' streams are non-blocking, so the copy
        # does not wait for the resident loops.
        with cuda.gpus[self.consumer]:
            host = self.words[:count].copy_to_host()
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
        return take_unreleased(self._copy(self.nbytes // 8), self.dtype, self.capacity)


def _portable_mapped(words: np.ndarray) -> tuple[Any, np.ndarray]:
    """``words`` in mapped pinned host memory every context may use: (the device array
    for the kernels, the host's int64 view)."""
    cuda = _cuda()
    mem = cuda.mapped_array(words.shape, dtype=np.int64, portable=True)
    host = mem._ary if _simulator() else np.ndarray.view(mem, type=np.ndarray)
    host[:] = words
    return mem, host


def _enable_peer_access(producer: int, consumer: int) -> None:
    """Let kernels on GPU ``producer`` reach GPU ``consumer``'s memory (once)."""
    from numba.cuda.cudadrv.devices import get_context
    from numba.cuda.cudadrv.driver import CudaAPIError

    cuda = _cuda()
    target = get_context(consumer)
    with cuda.gpus[producer]:
        try:
            cuda.current_context().enable_peer_access(target.handle)
        except CudaAPIError as exc:
            if exc.code != _PEER_ACCESS_ALREADY_ENABLED:
                raise


def _simulator() -> bool:
    from pydotcompute.rings.device import SIMULATOR

    return SIMULATOR
