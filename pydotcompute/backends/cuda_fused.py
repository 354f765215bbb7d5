"""Fused ``cuda`` kernels: the handlers of several stages in one persistent device loop.

The coordinator fuses adjacent stages whose kernels are compiled ``cuda`` handlers
with matching record types (see ``coordinator.fusion``) into one kernel whose function
is a ``cpu_fused.FusedHandlers``; the ``cuda`` backend then runs
:class:`FusedCudaKernelBackend`. Its loop is the one-handler loop of ``cuda_loop``
(one agent polls, records staged as whole words, outputs in input order) with a chain
of handlers where the one handler was (``cuda_loop.compose_chain_loop``): each writes
an inner record in shared memory that the next reads, and a handler returning False
ends the record there (no output). Per handler, the loop counts in device memory the
records it passed on; :meth:`FusedCudaKernelBackend.stage_counts` reads them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pydotcompute.backends.cpu_fused import FusedHandlers
from pydotcompute.backends.cuda import CudaKernelBackend, device_state
from pydotcompute.backends.handler_errors import check_handler_source
from pydotcompute.errors import FusedStageError

__all__ = ["FusedCudaKernelBackend"]


class FusedCudaKernelBackend(CudaKernelBackend):
    """A ``cuda`` kernel running a :class:`FusedHandlers` chain in one device loop.

    The handlers' states are separate arrays in device memory, each a copy of its
    stage's kernel state. A handler that raises (possible only under the simulator: a
    GPU refuses ``raise`` at launch) fails the kernel with a ``FusedStageError`` naming
    its stage."""

    def __init__(self, kernel_id: str, func: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(kernel_id, func, *args, **kwargs)
        self.chain: FusedHandlers = func
        self.stages = len(self.chain.steps)
        self._states = tuple(device_state(s.state) for s in self.chain.steps)

    def _check_source(self) -> None:
        for s in self.chain.steps:
            check_handler_source(s.handler, self.kernel_id, "cuda", gpu=not self.simulator)

    def _compile_loop(self, in_link: int = 0, out_link: int = 0) -> Any:
        from pydotcompute.backends.cuda_loop import compile_chain_loop

        steps = self.chain.steps
        dtypes = [s.in_dtype for s in steps] + [steps[-1].out_dtype]
        return compile_chain_loop(
            [s.handler for s in steps],
            dtypes,
            self._states,
            self.threads,
            self.items,
            self.idle_sleep_ns,
            in_link,
            out_link,
        )

    def _state_to_device(self, stream: Any) -> Any:
        from numba import cuda

        if stream is None:
            return tuple(cuda.to_device(a) for a in self._states)
        return tuple(cuda.to_device(a, stream=stream) for a in self._states)

    def _device_error(self) -> BaseException | None:
        err = super()._device_error()
        if err is None or err is not self._thread_error:
            return err
        # Simulator: the handler's exception, raised out of the launch.
        from pydotcompute.backends.cuda_loop import SideWords

        side = self._read_side()
        at = 0 if side is None else int(side[SideWords.FAILED_STAGE])
        step = self.chain.steps[min(max(at, 0), len(self.chain.steps) - 1)]
        name = getattr(step.handler, "__name__", repr(step.handler))
        wrapped = FusedStageError(step.stage, name, err)
        wrapped.__cause__ = err
        return wrapped

    def read_state(self) -> np.ndarray:
        """Every handler's state, copied out of device memory, one after another."""
        if self._d_state is None:
            return np.concatenate([s.ravel().astype(np.float64) for s in self._states])
        parts = []
        if self._copy_stream is None:
            parts = [np.array(d.copy_to_host(), copy=True) for d in self._d_state]
        else:
            with self._on_device():
                parts = [d.copy_to_host(stream=self._copy_stream) for d in self._d_state]
                self._copy_stream.synchronize()
        return np.concatenate([p.ravel().astype(np.float64) for p in parts])

    def stage_counts(self) -> dict[str, dict[str, int]]:
        """Per stage: records ``processed``, ``emitted`` (passed on) and ``dropped`` (its
        handler returned False), as the device last counted them."""
        from pydotcompute.backends.cuda_loop import SideWords

        side = self._read_side()
        n = len(self.chain.steps)
        passed = [0] * n if side is None else [int(v) for v in side[SideWords.PASSED :][:n]]
        handled = 0 if side is None else int(side[SideWords.PROCESSED])
        out: dict[str, dict[str, int]] = {}
        for j, s in enumerate(self.chain.steps):
            processed = handled if j == 0 else passed[j - 1]
            out[s.stage] = {
                "processed": processed,
                "emitted": passed[j],
                "dropped": processed - passed[j],
            }
        return out
