"""Where a link between two ``cuda`` kernels keeps its ring, decided from the GPUs they
run on: the one GPU's memory, the consumer's memory written peer to peer, or pinned
host memory when the two GPUs have no peer access. (A machine with one GPU, or the
simulator, only ever takes the first; the choice itself is checked here against a
stand-in for numba-cuda's device list.)"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from pydotcompute.backends import cuda_link
from pydotcompute.backends.cuda_loop import LINK_DEVICE, LINK_HOST, LINK_PEER
from pydotcompute.backends.options import CudaOptions
from pydotcompute.errors import InvalidConfigurationError


class _Context:
    def __init__(self, device: int, peers: set[tuple[int, int]]) -> None:
        self.device, self.peers = device, peers

    def can_access_peer(self, other: int) -> bool:
        return (self.device, other) in self.peers


class _FakeCuda:
    """``gpus[i]`` makes GPU i current; ``current_context()`` answers for it."""

    def __init__(self, peers: set[tuple[int, int]]) -> None:
        self.peers = peers
        self.current = 0
        self.gpus = self

    def __getitem__(self, i: int) -> Any:
        @contextlib.contextmanager
        def on() -> Any:
            before, self.current = self.current, i
            try:
                yield
            finally:
                self.current = before

        return on()

    def current_context(self) -> _Context:
        return _Context(self.current, self.peers)


@pytest.mark.parametrize(
    ("producer", "consumer", "peers", "kind"),
    [
        (0, 0, set(), LINK_DEVICE),
        (1, 1, {(1, 0)}, LINK_DEVICE),
        (0, 1, {(0, 1)}, LINK_PEER),
        (1, 0, {(0, 1)}, LINK_HOST),  # peer access one way only: not the producer's way
        (0, 1, set(), LINK_HOST),
    ],
)
def test_link_memory_follows_peer_access(monkeypatch, producer, consumer, peers, kind) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cuda_link, "_cuda", lambda: _FakeCuda(peers))
    assert cuda_link.link_memory(producer, consumer) == kind


@pytest.mark.parametrize("bad", [-1, True, 1.5, "0"])
def test_cuda_device_option_is_a_gpu_index(bad: Any) -> None:
    with pytest.raises(InvalidConfigurationError, match="device"):
        CudaOptions(device=bad)
    assert CudaOptions(device=1).device == 1
