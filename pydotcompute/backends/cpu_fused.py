"""Fused ``cpu`` kernels: the handlers of several stages in one compiled loop.

The coordinator fuses adjacent stages whose kernels are compiled ``cpu`` handlers
with matching record types (see ``coordinator.fusion``). It launches one kernel
whose function is a :class:`FusedHandlers`; the ``cpu`` backend then runs
:class:`FusedCpuKernelBackend`, whose loop is generated for the chain: for each
record it calls the handlers in order, each writing into a scratch record that the
next one reads, and a handler returning False ends the record there (no output).
Per stage it counts the records handled, passed on and dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, typeof
from numba.core.registry import CPUDispatcher

from pydotcompute.backends import cpu
from pydotcompute.backends.base import KernelBackend
from pydotcompute.backends.handler_errors import check_handler_source
from pydotcompute.errors import FusedStageError
from pydotcompute.messages.record import output_header, uuid_offset
from pydotcompute.rings import atomics, host_ops, wake
from pydotcompute.rings.layout import OFF_BACKPRESSURE, OFF_CLAIM

__all__ = ["FusedCpuKernelBackend", "FusedHandlers", "FusedStageError", "FusedStep"]

# Per stage, three counters in a worker's counts array.
PROCESSED, EMITTED, DROPPED = 0, 1, 2


@dataclass(frozen=True, eq=False)
class FusedStep:
    """One stage of a chain: its name, its kernel's handler, record types and state."""

    stage: str
    handler: Callable[..., Any]
    in_dtype: np.dtype
    out_dtype: np.dtype
    state: np.ndarray


class FusedHandlers:
    """The function of a fused kernel: the chain's steps, in order."""

    fused_handlers = True  # how the cpu and cuda backends tell a chain from a handler

    def __init__(self, steps: Sequence[FusedStep]) -> None:
        if len(steps) < 2:
            raise ValueError("a fused chain has at least two steps")
        self.steps = tuple(steps)
        self.__name__ = "fused(" + " >> ".join(s.stage for s in steps) + ")"

    def __call__(self, *args: Any) -> Any:
        raise TypeError(f"{self.__name__} runs only as a compiled cpu or cuda kernel")

    def __repr__(self) -> str:
        return f"<{self.__name__}>"


_TEMPLATE = """
def fused_loop(in_buf, out_buf, ctrl, state, in_batch, out_batch, out_blank, progress, ids,
               counts, {params}):
    batch = in_batch.shape[0]
    out_blocks = load_acquire(out_buf, OFF_BACKPRESSURE) == 0
    idle = 0
    seed = ids[0]
    while True:
        mode = load_acquire(ctrl, STATE)
        if mode == TERMINATE or mode == HALT:
            fetch_add(ctrl, IDLE_POLLS, idle & 63)
            ids[0] = seed
            return
        if mode != ACTIVE:
            if progress[P_CARRIED] == 0:
                store_release(progress, P_HAND * 8, NO_HAND)
            fetch_add(ctrl, HEARTBEAT, 1)
            sleep_us(PAUSED_SLEEP_US)
            continue
        got = progress[P_CARRIED]
        if got > 0:
            progress[P_CARRIED] = 0
        else:
            store_release(progress, P_HAND * 8, load_acquire(in_buf, OFF_CLAIM))
            got = ring_pop(in_buf, in_batch, 0, batch)
        if got == 0:
            idle += 1
            if idle & 63 == 0:
                fetch_add(ctrl, IDLE_POLLS, 64)
                fetch_add(ctrl, HEARTBEAT, 1)
            if idle < SPIN_POLLS:
                cpu_pause()
            elif idle < YIELD_POLLS:
                cpu_yield()
            else:
                sleep_us(IDLE_SLEEP_US)
            continue
        if idle:
            fetch_add(ctrl, IDLE_POLLS, idle & 63)
            idle = 0
        progress[P_GOT] = got
        k = 0
        for i in range(got):
            progress[P_AT] = i
            progress[P_EMITTED] = k
            copy_bytes(out_batch, k * OUT_RS, out_blank, 0, OUT_RS)
            if MAKE_IDS:
                seed += GOLDEN
                hi = (mix(seed) & V_KEEP) | V_SET
                seed += GOLDEN
                lo = (mix(seed) & VAR_KEEP) | VAR_SET
                store_word(out_batch, k * OUT_RS + OUT_ID_AT, np.int64(hi))
                store_word(out_batch, k * OUT_RS + OUT_ID_AT + 8, np.int64(lo))
            if CORRELATE:
                copy_bytes(out_batch, k * OUT_RS + CORR_AT, in_batch, i * IN_RS + ID_AT, 16)
{calls}
            k += 1
        progress[P_GOT] = 0
        fetch_add(ctrl, PROCESSED_WORD, got)
        fetch_add(ctrl, HEARTBEAT, 1)
        placed = ring_push(out_buf, out_batch, 0, k)
        if placed:
            wake_signal(ctrl, WAKE)
        if out_blocks:
            spins = 0
            while placed < k:
                if load_acquire(ctrl, STATE) == TERMINATE:
                    fetch_add(ctrl, DROPPED_WORD, k - placed)
                    ids[0] = seed
                    return
                spins = backoff(min(spins, 300))
                more = ring_push(out_buf, out_batch, placed * OUT_RS, k - placed)
                if more:
                    wake_signal(ctrl, WAKE)
                placed += more
        fetch_add(ctrl, EMITTED_WORD, k)
        store_release(progress, P_HAND * 8, NO_HAND)
"""

# One step's call: reset its output record to its blank header (the input's id as
# correlation id, as an unfused loop would), call it, count, stop the record on False.
_STEP = """\
            progress[P_STAGE] = {j}
            counts[{p}] += 1
            {reset}if not h{j}({src}, {dst}, st{j}):
                counts[{d}] += 1
                continue
            counts[{e}] += 1
"""


def fused_loop_source(n: int) -> str:
    """The Python source of the loop for a chain of ``n`` handlers (compiled by numba)."""
    params = ", ".join([f"st{j}" for j in range(n)] + [f"x{j}" for j in range(1, n)])
    params += ", " + ", ".join(f"b{j}" for j in range(1, n))
    calls = []
    for j in range(n):
        src = "in_batch[i]" if j == 0 else f"x{j}[0]"
        dst = "out_batch[k]" if j == n - 1 else f"x{j + 1}[0]"
        reset = ""
        if j < n - 1:
            reset = (
                f"copy_bytes(x{j + 1}, 0, b{j + 1}, 0, RS{j + 1})\n"
                f"            if CORR{j + 1} >= 0 and ID_AT >= 0:\n"
                f"                copy_bytes(x{j + 1}, CORR{j + 1}, in_batch, i * IN_RS + ID_AT, 16)\n"
                "            "
            )
        calls.append(
            _STEP.format(
                j=j,
                p=3 * j + PROCESSED,
                e=3 * j + EMITTED,
                d=3 * j + DROPPED,
                src=src,
                dst=dst,
                reset=reset,
            )
        )
    return _TEMPLATE.format(params=params, calls="".join(calls))


def _namespace(steps: Sequence[FusedStep], handlers: Sequence[Any]) -> dict[str, Any]:
    """The globals the generated loop sees: ring operations, constants, the handlers."""
    first, last = steps[0], steps[-1]
    _, id_at, corr_at = output_header(first.in_dtype, last.out_dtype)
    ns: dict[str, Any] = {
        "np": np,
        "OFF_BACKPRESSURE": OFF_BACKPRESSURE,
        "load_acquire": atomics.load_acquire,
        "fetch_add": atomics.fetch_add,
        "sleep_us": atomics.sleep_us,
        "cpu_pause": atomics.cpu_pause,
        "cpu_yield": atomics.cpu_yield,
        "copy_bytes": atomics.copy_bytes,
        "store_word": atomics.store_word,
        "ring_pop": host_ops.ring_pop,
        "ring_push": host_ops.ring_push,
        "backoff": host_ops.backoff,
        "wake_signal": wake.wake_signal,
        "mix": cpu._mix,
        "STATE": cpu._STATE,
        "TERMINATE": cpu._TERMINATE,
        "HALT": cpu._HALT,
        "ACTIVE": cpu._ACTIVE,
        "IDLE_POLLS": cpu._IDLE_POLLS,
        "HEARTBEAT": cpu._HEARTBEAT,
        "WAKE": cpu._WAKE,
        "PROCESSED_WORD": cpu._PROCESSED,
        "EMITTED_WORD": cpu._EMITTED,
        "DROPPED_WORD": cpu._DROPPED,
        "PAUSED_SLEEP_US": cpu._PAUSED_SLEEP_US,
        "IDLE_SLEEP_US": cpu._IDLE_SLEEP_US,
        "SPIN_POLLS": cpu._SPIN_POLLS,
        "YIELD_POLLS": cpu._YIELD_POLLS,
        "P_CARRIED": cpu._P_CARRIED,
        "P_AT": cpu._P_AT,
        "P_GOT": cpu._P_GOT,
        "P_EMITTED": cpu._P_EMITTED,
        "P_STAGE": cpu._P_STAGE,
        "P_HAND": cpu._P_HAND,
        "NO_HAND": cpu._NO_HAND,
        "OFF_CLAIM": OFF_CLAIM,
        "store_release": atomics.store_release,
        "GOLDEN": cpu._GOLDEN,
        "V_KEEP": cpu._V_KEEP,
        "V_SET": cpu._V_SET,
        "VAR_KEEP": cpu._VAR_KEEP,
        "VAR_SET": cpu._VAR_SET,
        "IN_RS": first.in_dtype.itemsize,
        "OUT_RS": last.out_dtype.itemsize,
        "ID_AT": id_at,
        "CORR_AT": corr_at,
        "CORRELATE": id_at >= 0 and corr_at >= 0,
        "OUT_ID_AT": uuid_offset(last.out_dtype, "message_id") if cpu._LITTLE_ENDIAN else -1,
        "MAKE_IDS": cpu._LITTLE_ENDIAN and uuid_offset(last.out_dtype, "message_id") >= 0,
    }
    for j, h in enumerate(handlers):
        ns[f"h{j}"] = h
    for j in range(1, len(steps)):
        dt = steps[j].in_dtype
        ns[f"RS{j}"] = dt.itemsize
        ns[f"CORR{j}"] = uuid_offset(dt, "correlation_id")
    return ns


# One compiled loop per chain (handlers, record types, state types, options).
_FUSED: dict[tuple[Any, ...], Any] = {}
_FUSED_LOCK = threading.Lock()


def _scratch(steps: Sequence[FusedStep]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per inner record type: a one-record scratch array and its blank header."""
    xs, blanks = [], []
    for j in range(1, len(steps)):
        prev, cur = steps[j - 1], steps[j]
        blank, _, _ = output_header(prev.in_dtype, cur.in_dtype)
        xs.append(np.zeros(1, cur.in_dtype))
        blanks.append(np.asarray(blank))
    return xs, blanks


def compile_fused_loop(
    chain: FusedHandlers, state: np.ndarray, *, boundscheck: bool = False
) -> Callable[..., None]:
    """Compile every handler of ``chain`` alone (so numba's error names the handler),
    then the loop that calls them in order (cached per chain)."""
    steps = chain.steps
    key = (
        tuple(s.handler for s in steps),
        tuple((s.in_dtype, s.out_dtype, typeof(s.state)) for s in steps),
        bool(boundscheck),
    )
    with _FUSED_LOCK:
        loop = _FUSED.get(key)
        if loop is not None:
            return loop  # type: ignore[no-any-return]
        handlers = []
        for s in steps:
            py = s.handler.py_func if isinstance(s.handler, CPUDispatcher) else s.handler
            h = njit(nogil=True, boundscheck=boundscheck)(py)
            one_in, one_out = np.zeros(1, s.in_dtype), np.zeros(1, s.out_dtype)
            h.compile((typeof(one_in[0]), typeof(one_out[0]), typeof(s.state)))
            handlers.append(h)
        ns = _namespace(steps, handlers)
        exec(compile(fused_loop_source(len(steps)), f"<{chain.__name__}>", "exec"), ns)  # noqa: S102 - our own template
        loop = njit(nogil=True, boundscheck=boundscheck)(ns["fused_loop"])
        buf, words = np.zeros(8, np.uint8), np.zeros(1, np.int64)
        in_batch = np.zeros(1, steps[0].in_dtype)
        out_batch = np.zeros(1, steps[-1].out_dtype)
        xs, blanks = _scratch(steps)
        args: tuple[np.ndarray, ...] = (buf, buf, words, state, in_batch, out_batch, out_batch)
        args += (words, np.zeros(1, np.uint64), words, *(s.state for s in steps), *xs, *blanks)
        loop.compile(tuple(typeof(a) for a in args))
        _FUSED[key] = loop
    return loop  # type: ignore[no-any-return]


class FusedCpuKernelBackend(cpu.CpuKernelBackend):
    """A ``cpu`` kernel running a :class:`FusedHandlers` chain in one loop.

    Each worker counts, per stage, the records handled, passed on and dropped in an
    array of its own (no shared writes per record); :meth:`stage_counts` sums them.
    """

    def __init__(self, kernel_id: str, func: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(kernel_id, func, *args, **kwargs)
        self.chain: FusedHandlers = func
        self._states = [np.array(s.state, copy=True) for s in self.chain.steps]
        self._counts: list[np.ndarray] = []

    def _check_source(self) -> None:
        for s in self.chain.steps:
            check_handler_source(s.handler, self.kernel_id, "cpu")

    def link_refusal(self, peer: KernelBackend) -> str | None:
        # Its loop makes fresh ids, so replies could not be matched past it; it may
        # still be linked *to*.
        return f"{self.kernel_id!r} is a fused chain, whose outputs cannot be linked"

    def _compile_loop(self, carry_ids: bool = False) -> Callable[..., None]:
        assert not carry_ids, "a fused kernel's outputs are not linked"
        return compile_fused_loop(self.chain, self.state, boundscheck=self.boundscheck)

    def _worker_args(self) -> tuple[Any, ...]:
        counts = np.zeros(3 * len(self.chain.steps), np.int64)
        self._counts.append(counts)
        xs, blanks = _scratch(self.chain.steps)
        return (counts, *self._states, *xs, *blanks)

    def _crash_error(self, exc: BaseException, progress: np.ndarray) -> BaseException:
        at = int(progress[cpu._P_STAGE])
        step = self.chain.steps[min(at, len(self.chain.steps) - 1)]
        name = getattr(step.handler, "__name__", repr(step.handler))
        err = FusedStageError(step.stage, name, exc)
        err.__cause__ = exc
        return err

    async def restart(self) -> None:
        # Every handler starts over from its declared state, as the chain did at launch.
        for live, s in zip(self._states, self.chain.steps, strict=True):
            live[...] = s.state
        await super().restart()

    def read_state(self) -> np.ndarray:
        return np.concatenate([s.ravel().astype(np.float64) for s in self._states])

    def stage_counts(self) -> dict[str, dict[str, int]]:
        """Per stage: records ``processed``, ``emitted`` (passed on) and ``dropped``
        (its handler returned False), over every worker and run since launch."""
        total = np.zeros(3 * len(self.chain.steps), np.int64)
        for c in list(self._counts):
            total += c
        return {
            s.stage: {
                "processed": int(total[3 * j + PROCESSED]),
                "emitted": int(total[3 * j + EMITTED]),
                "dropped": int(total[3 * j + DROPPED]),
            }
            for j, s in enumerate(self.chain.steps)
        }
