"""Resident ``cuda`` kernels under the numba-cuda simulator, taking turns.

The simulator runs one kernel launch at a time in a process, and a launch runs to its
end: two persistent loops cannot both be running, yet a link (one kernel feeding
another through a ring in device memory) or a pipeline of kernels needs several of
them making progress. So under the simulator nothing is launched for ever: one
thread, :class:`SimulatedDevice`, launches each running kernel in *slices* (the loop
with a negative ``max_iterations``: at most that many rounds, ending at the first
round that found nothing to do), and only when the kernel has something to do: input
it has not claimed while active, a state word it has not seen, or stale records to
skip. A kernel whose output ring lacks room for a whole round waits for its turn
instead (a slice that blocked on a full ring would hold every other kernel back,
the one that frees the room included).

The device is process-wide because the simulator's launch state is; it holds a kernel
only from its start to its exit, and its thread ends when no kernel is left.
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar, Protocol

__all__ = ["SimulatedDevice", "SimulatedKernel", "IDLE", "RAN", "EXITED"]

IDLE, RAN, EXITED = 0, 1, 2
_IDLE_SLEEP_S = 5e-4  # no kernel had anything to do: the host gets the core


class SimulatedKernel(Protocol):
    """What the device asks of a kernel it runs."""

    def simulated_turn(self) -> int:
        """Run a slice if there is something to do: ``IDLE`` (nothing ran), ``RAN``, or
        ``EXITED`` (the loop has exited: it leaves the device). Raises nothing: a
        failure is kept by the kernel."""
        ...

    def simulated_left(self) -> None:
        """Called once the kernel has left the device after ``EXITED``."""
        ...


class SimulatedDevice:
    """The one simulated device of the process: a thread giving kernels turns."""

    _instance: ClassVar[SimulatedDevice | None] = None
    _guard: ClassVar[threading.Lock] = threading.Lock()
    launching: ClassVar[threading.Lock] = threading.Lock()
    """Held by each slice, and by whoever composes device code meanwhile: while a
    launch runs, the simulator replaces the ``cuda`` module in the globals of the
    modules whose functions it runs, so ``cuda.jit`` there is not numba's."""

    def __init__(self) -> None:
        self.kernels: list[SimulatedKernel] = []
        self.thread: threading.Thread | None = None

    @classmethod
    def run(cls, kernel: SimulatedKernel) -> None:
        """Give ``kernel`` turns from now until its loop exits."""
        with cls._guard:
            dev = cls._instance
            if dev is None:
                dev = cls._instance = SimulatedDevice()
            if kernel not in dev.kernels:
                dev.kernels.append(kernel)
            if dev.thread is None:
                dev.thread = threading.Thread(
                    target=dev._turns, name="pydotcompute-cuda-simulator", daemon=True
                )
                dev.thread.start()

    @classmethod
    def running(cls) -> list[Any]:
        """The kernels that have turns now."""
        with cls._guard:
            return [] if cls._instance is None else list(cls._instance.kernels)

    def _turns(self) -> None:
        while True:
            with self._guard:
                kernels = list(self.kernels)
                if not kernels:
                    self.thread = None
                    return
            ran = False
            for k in kernels:
                turn = k.simulated_turn()
                ran = ran or turn != IDLE
                if turn == EXITED:
                    with self._guard:
                        self.kernels.remove(k)
                    k.simulated_left()  # after the removal: a relaunch may add it again
            if not ran:
                time.sleep(_IDLE_SLEEP_S)
