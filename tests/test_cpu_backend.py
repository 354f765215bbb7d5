"""The ``cpu`` backend's kernel loop, driven directly (without the runtime)."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.backends.cpu import ControlBlock, CpuKernelBackend, compile_kernel_loop
from pydotcompute.errors import (
    InvalidConfigurationError,
    KernelFailedError,
    QueueFullError,
    QueueTimeoutError,
)

IN = np.dtype([("a", "<i8"), ("b", "<f8")])
OUT = np.dtype([("a", "<i8"), ("s", "<f8")])


def halve_odd(msg, out, state):
    """Emits (a, 2b) for even a; counts every call in state[0], sums a in state[1]."""
    state[0] += 1
    state[1] += msg.a
    out.a = msg.a
    out.s = msg.b * 2.0
    return msg.a % 2 == 0


def echo(msg, out, state):
    out.a = msg.a
    out.s = msg.b
    return True


def raises_on_three(msg, out, state):
    if msg.a == 3:
        raise ValueError("a is three")
    out.a = msg.a
    return True


def writes_past_state(msg, out, state):
    state[msg.a] = 1.0
    out.a = msg.a
    return True


def reads_missing_field(msg, out, state):
    out.a = msg.missing
    return True


def batch(a, b=1.5):
    r = np.zeros(len(a), IN)
    r["a"] = a
    r["b"] = b
    return r


class Loops:
    """Creates loops and always stops them, even when a test fails."""

    def __init__(self):
        self.loops = []
        self.failures = []

    async def start(self, handler, *, active=True, workers=1, state=None, **cfg):
        extra = cfg.pop("extra", {})
        config = RingKernelConfig(
            backend="cpu",
            queue_size=cfg.pop("queue_size", 256),
            workers=workers,
            state=np.zeros(4) if state is None else state,
            extra=extra,
            **cfg,
        )
        loop = CpuKernelBackend("k", handler, config, IN, OUT, self.failures.append)
        self.loops.append(loop)
        await loop.start()
        if active:
            loop.set_active(True)
        return loop

    async def close(self):
        for loop in self.loops:
            await loop.stop(5.0)


@pytest.fixture
async def loops():
    ls = Loops()
    yield ls
    await ls.close()
    for loop in ls.loops:
        assert not any(t.is_alive() for t in loop._threads)


async def drain(loop, n, timeout=5.0):
    got = []
    while sum(map(len, got)) < n:
        got.append(await loop.get_batch(n, timeout))
    return np.concatenate(got)


async def wait_for(pred, timeout=5.0):
    for _ in range(int(timeout / 0.002)):
        if pred():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not reached")


async def test_handler_output_state_and_counters(loops):
    loop = await loops.start(halve_odd)
    assert await loop.put_batch(batch(np.arange(100)), None) == 100
    out = await drain(loop, 50)
    assert list(out["a"]) == list(range(0, 100, 2))  # FIFO with one worker
    assert np.all(out["s"] == 3.0)
    await wait_for(lambda: loop.control[ControlBlock.PROCESSED] == 100)
    state = loop.read_state()
    assert list(state[:2]) == [100, sum(range(100))]
    state[0] = -1  # a copy: the kernel's state is untouched
    assert loop.read_state()[0] == 100
    tel = loop.telemetry("active")
    assert (tel.messages_processed, tel.messages_sent, tel.errors) == (100, 50, 0)
    assert tel.queue_depth == 0 and tel.queue_capacity == 256 and tel.backend == "cpu"


async def test_unset_output_fields_are_zero_after_a_false_return(loops):
    def first_sets_s(msg, out, state):
        if msg.a == 0:
            out.s = 99.0
            return False
        out.a = msg.a
        return True

    loop = await loops.start(first_sets_s)
    await loop.put_batch(batch([0, 1, 2]), None)
    out = await drain(loop, 2)
    assert list(out["s"]) == [0.0, 0.0]


async def test_several_workers_process_each_record_once(loops):
    loop = await loops.start(echo, workers=3, queue_size=64)
    n = 20_000

    async def produce():
        for start in range(0, n, 500):
            assert await loop.put_batch(batch(np.arange(start, start + 500)), 5.0) == 500

    producer = asyncio.create_task(produce())
    received = await drain(loop, n)
    await producer
    got = np.sort(received["a"])
    assert np.array_equal(got, np.arange(n))
    assert len(loop._threads) == 3


async def test_deactivate_pauses_and_activate_resumes(loops):
    loop = await loops.start(echo, active=False)
    await loop.put_batch(batch(np.arange(10)), None)
    await asyncio.sleep(0.02)
    assert loop.control[ControlBlock.PROCESSED] == 0
    assert loop.in_ring.depth == 10
    loop.set_active(True)
    assert list((await drain(loop, 10))["a"]) == list(range(10))
    loop.set_active(False)
    await asyncio.sleep(0.005)  # let the workers see the flag
    await loop.put_batch(batch([10]), None)
    await asyncio.sleep(0.02)
    assert loop.control[ControlBlock.PROCESSED] == 10
    hb = loop.control[ControlBlock.HEARTBEAT]
    await wait_for(lambda: loop.control[ControlBlock.HEARTBEAT] > hb)  # paused, alive


async def test_terminate_with_a_full_output_ring_does_not_hang(loops):
    loop = await loops.start(echo, queue_size=8, output_queue_size=2)
    await loop.put_batch(batch(np.arange(8)), None)
    await wait_for(lambda: loop.out_ring.depth == 2)
    await loop.stop(2.0)
    assert not any(t.is_alive() for t in loop._threads)
    assert loop.control[ControlBlock.DROPPED] > 0
    assert loop.telemetry("terminated").messages_dropped > 0


async def test_wrong_dtype_names_both_dtypes(loops):
    loop = await loops.start(echo)
    wrong = np.zeros(3, OUT)
    with pytest.raises(TypeError) as e:
        await loop.put_batch(wrong, None)
    assert str(IN) in str(e.value) and str(OUT) in str(e.value)
    with pytest.raises(TypeError, match="record arrays"):
        await loop.put_batch([1, 2], None)


async def test_get_times_out(loops):
    loop = await loops.start(echo)
    with pytest.raises(QueueTimeoutError):
        await loop.get_batch(4, 0.01)


async def test_block_put_times_out_and_counts(loops):
    loop = await loops.start(echo, active=False, queue_size=4)
    assert await loop.put_batch(batch(np.arange(4)), None) == 4
    with pytest.raises(QueueFullError, match="0 of 2"):
        await loop.put_batch(batch([4, 5]), 0.01)
    assert loop.telemetry("deactivated").messages_rejected == 2
    loop.set_active(True)
    assert await loop.put_batch(batch([4, 5]), 1.0) == 2  # room appears as it drains
    assert list((await drain(loop, 6))["a"]) == list(range(6))


async def test_reject_drop_newest_drop_oldest_at_the_input(loops):
    rej = await loops.start(echo, active=False, queue_size=4, backpressure="reject")
    assert await rej.put_batch(batch(np.arange(6)), None) == 4
    with pytest.raises(QueueFullError):
        await rej.put(batch([9])[0], None)
    assert rej.telemetry("x").messages_rejected == 3

    dn = await loops.start(echo, active=False, queue_size=4, backpressure="drop_newest")
    assert await dn.put_batch(batch(np.arange(6)), None) == 4
    await dn.put(batch([9])[0], None)  # dropped, counted, no error
    dn.set_active(True)
    assert list((await drain(dn, 4))["a"]) == [0, 1, 2, 3]
    assert dn.telemetry("x").messages_dropped == 3

    do = await loops.start(echo, active=False, queue_size=4, backpressure="drop_oldest")
    assert await do.put_batch(batch(np.arange(6)), None) == 4
    await do.put(batch([9])[0], None)
    do.set_active(True)
    assert list((await drain(do, 4))["a"]) == [3, 4, 5, 9]
    assert do.telemetry("x").messages_dropped == 3


async def test_handler_that_raises_fails_the_kernel(loops):
    loop = await loops.start(raises_on_three, workers=2)
    await loop.put_batch(batch(np.arange(10)), None)
    await wait_for(lambda: loops.failures)
    (exc,) = loops.failures
    assert isinstance(exc, ValueError) and "a is three" in str(exc)
    # Reported once every worker has left the loop; the queues stay open until the
    # owner decides (restart or close_failed).
    assert loop._run.alive == 0
    await wait_for(lambda: not any(t.is_alive() for t in loop._threads))
    assert loop.failed_input["a"] == 3
    snap = loop.control.snapshot()
    assert (snap["errors"], snap["error_code"]) == (1, ControlBlock.ERR_HANDLER)
    loop.close_failed(lambda: KernelFailedError("closed"))
    with pytest.raises(KernelFailedError, match="closed") as e:
        await loop.put_batch(batch([1]), None)
    assert loop.failure is not None and e.value is not loop.failure


async def test_a_raising_record_keeps_what_its_batch_produced_and_left(loops):
    # One worker, one batch of 8: records 0-2 were handled, 3 raised, 4-7 were not.
    loop = await loops.start(raises_on_three)
    loop.set_active(False)
    await loop.put_batch(batch(np.arange(8)), None)
    loop.set_active(True)
    await wait_for(lambda: loops.failures)
    assert list((await drain(loop, 3))["a"]) == [0, 1, 2]  # produced before the raise
    assert loop.failed_input["a"] == 3
    assert loop.telemetry("x").messages_sent == 3
    # A restart handles the rest of the batch first, then what is queued after it.
    await loop.put_batch(batch([8, 9]), None)
    await loop.restart()
    loop.set_active(True)
    assert list((await drain(loop, 6))["a"]) == [4, 5, 6, 7, 8, 9]
    assert loop.failed_input is None and len(loops.failures) == 1


async def test_close_failed_counts_the_inputs_nobody_will_handle(loops):
    loop = await loops.start(raises_on_three, active=False)
    await loop.put_batch(batch([3, 4, 5]), None)
    loop.set_active(True)
    await wait_for(lambda: loops.failures)
    await loop.put_batch(batch([6]), None)  # queued after the crash, before the verdict
    assert loop.close_failed(lambda: KernelFailedError("closed")) == 3  # 4, 5 and 6
    assert loop.telemetry("x").messages_dropped == 3
    with pytest.raises(KernelFailedError):
        await loop.get_batch(1, 0.01)


async def test_a_restart_starts_the_handler_from_its_declared_state(loops):
    loop = await loops.start(halve_odd, state=np.array([5.0, 0, 0, 0]))
    await loop.put_batch(batch([1, 2]), None)
    await drain(loop, 1)
    await wait_for(lambda: loop.read_state()[0] == 7.0)
    loop._run.crash = ValueError("pretend")  # restart() needs a crashed run, not a raise
    loop.control.set_state(ControlBlock.HALT)
    await loop.restart()
    assert list(loop.read_state()) == [5.0, 0, 0, 0]


async def test_out_of_bounds_write_is_caught_with_boundscheck(loops):
    loop = await loops.start(writes_past_state, extra={"boundscheck": True}, state=np.zeros(2))
    await loop.put_batch(batch([0, 1, 7]), None)
    await wait_for(lambda: loops.failures)
    assert isinstance(loops.failures[0], IndexError)
    await wait_for(lambda: not any(t.is_alive() for t in loop._threads))


async def test_typing_failure_is_reported_at_start(loops):
    with pytest.raises(KernelFailedError, match="does not compile") as e:
        await loops.start(reads_missing_field)
    assert e.value.__cause__ is not None
    assert loops.loops[-1].failure is e.value


async def test_a_handler_compiles_once():
    state = np.zeros(4)
    first = compile_kernel_loop(echo, IN, OUT, state)
    again = compile_kernel_loop(echo, IN, OUT, np.ones(9))
    assert first is again
    narrow = np.dtype([("a", "<i4"), ("s", "<f4")])
    assert compile_kernel_loop(echo, IN, narrow, state) is not first


def test_input_type_needs_a_record_layout():
    cfg = RingKernelConfig(backend="cpu")
    with pytest.raises(InvalidConfigurationError, match="record layout"):
        CpuKernelBackend("k", echo, cfg, None, OUT, lambda e: None)

    class Loose:
        pass

    with pytest.raises(InvalidConfigurationError, match="Loose"):
        CpuKernelBackend("k", echo, cfg, Loose, OUT, lambda e: None)


@dataclasses.dataclass
class Point:
    """A minimal message class with a record layout."""

    a: int
    b: float

    __record_dtype__ = IN

    def to_record(self):
        return np.array((self.a, self.b), IN)[()]


@dataclasses.dataclass
class Scaled:
    a: int
    s: float

    __record_dtype__ = OUT

    @classmethod
    def from_record(cls, rec):
        return cls(int(rec["a"]), float(rec["s"]))


async def test_message_objects_in_and_out(loops):
    cfg = RingKernelConfig(backend="cpu", queue_size=16, state=np.zeros(4))
    loop = CpuKernelBackend("m", halve_odd, cfg, Point, Scaled, loops.failures.append)
    loops.loops.append(loop)
    await loop.start()
    loop.set_active(True)
    for a in range(4):
        await loop.put(Point(a, 0.25), None)
    assert await loop.get(1.0) == Scaled(0, 0.5)
    assert await loop.get(1.0) == Scaled(2, 0.5)
    assert loop.try_get(None) is None
    with pytest.raises(TypeError, match="takes Point"):
        await loop.put(("not", "a point"), None)


async def test_get_batch_sizes_its_result_by_what_is_queued(loops):
    loop = await loops.start(echo)
    await loop.put_batch(batch([1, 2, 3]), None)
    got = []
    while len(got) < 3:
        # 2**40 records of 16 bytes could never be allocated: only what is queued is
        got.extend((await loop.get_batch(1 << 40, 5.0))["a"])
    assert got == [1, 2, 3]


@pytest.mark.parametrize("strategy", ["drop_newest", "drop_oldest"])
async def test_lossy_input_with_several_workers_accounts_for_every_record(loops, strategy):
    loop = await loops.start(echo, workers=2, queue_size=8, backpressure=strategy)
    n = 5000
    outputs = []
    for start in range(0, n, 50):
        await loop.put_batch(batch(np.arange(start, start + 50)), None)
        try:
            outputs.append(await loop.get_batch(1 << 20, 0))
        except QueueTimeoutError:
            pass
    await wait_for(lambda: loop.in_ring.depth == 0)
    await wait_for(
        lambda: loop.control[ControlBlock.EMITTED] == loop.control[ControlBlock.PROCESSED]
    )
    processed = loop.control[ControlBlock.PROCESSED]
    in_c, out_c = loop.in_ring.counters(), loop.out_ring.counters()
    assert processed + in_c.dropped == n and in_c.dropped > 0
    delivered = processed - out_c.dropped  # the output ring has the same strategy
    assert loop.telemetry("active").messages_dropped == in_c.dropped + out_c.dropped
    rest = delivered - sum(map(len, outputs))
    if rest:
        outputs.append(await drain(loop, rest))
    got = np.concatenate(outputs)["a"]
    assert len(got) == len(set(got.tolist())) == delivered
