"""``backend="cpu"`` kernels end to end through ``RingKernelRuntime``."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest

from pydotcompute.backends.cpu import CpuKernelBackend
from pydotcompute.errors import (
    KernelFailedError,
    QueueFullError,
    QueueTimeoutError,
)
from pydotcompute.runtime import RingKernelRuntime, ring_kernel
from pydotcompute.runtime.lifecycle import KernelState

IN = np.dtype([("a", "<i8"), ("b", "<f8")])
OUT = np.dtype([("a", "<i8"), ("s", "<f8")])


@dataclasses.dataclass
class Sample:
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


@ring_kernel(
    kernel_id="scale",
    input_type=Sample,
    output_type=Scaled,
    backend="cpu",
    state=np.zeros(2),
    queue_size=64,
    auto_register=False,
)
def scale(msg, out, state):
    """Emits (a, 2b) for even a; counts calls in state[0] and sums a in state[1]."""
    state[0] += 1
    state[1] += msg.a
    out.a = msg.a
    out.s = msg.b * 2.0
    return msg.a % 2 == 0


def fails_on_five(msg, out, state):
    if msg.a == 5:
        raise RuntimeError("five is not allowed")
    out.a = msg.a
    out.s = msg.b
    return True


def does_not_type(msg, out, state):
    out.a = msg.b.nonexistent
    return True


def samples(a, b=0.5):
    r = np.zeros(len(a), IN)
    r["a"] = a
    r["b"] = b
    return r


def cpu_threads():
    return [t for t in threading.enumerate() if t.name.startswith("pydotcompute-cpu-")]


async def launch(rt, kid="k", func=scale, **over):
    over.setdefault("input_type", Sample)
    over.setdefault("output_type", Scaled)
    over.setdefault("backend", "cpu")
    await rt.launch(kid, func, **over)
    await rt.activate(kid)


async def test_records_state_telemetry_and_clean_terminate():
    before = len(cpu_threads())
    async with RingKernelRuntime() as rt:
        await launch(rt)
        assert await rt.send_batch("k", samples(np.arange(40))) == 40
        got = []
        while len(got) < 20:
            got.extend((await rt.receive_batch("k", 64, timeout=5.0))["a"])
        assert got == list(range(0, 40, 2))
        for _ in range(500):
            if rt.read_state("k")[0] == 40:
                break
            await asyncio.sleep(0.002)
        assert list(rt.read_state("k")) == [40.0, float(sum(range(40)))]
        tel = rt.get_telemetry("k")
        assert (tel.backend, tel.messages_processed, tel.messages_sent) == ("cpu", 40, 20)
        assert tel.queue_capacity == 64 and tel.state == "ACTIVE"
        await rt.terminate("k")
        assert rt.get_kernel_state("k") is KernelState.TERMINATED
    assert len(cpu_threads()) == before


async def test_a_kernel_loop_keeps_its_instance_dict_keys_shared():
    # CPython 3.11 stops sharing an instance's dict keys at 30 attributes; from there every
    # attribute load on the per-message path gets slower.
    async with RingKernelRuntime() as rt:
        await rt.launch("k", scale, backend="cpu", input_type=IN, output_type=OUT)
        assert len(vars(rt._kernels["k"].kernel_backend)) < 30


async def test_message_objects_through_send_and_receive():
    async with RingKernelRuntime() as rt:
        await launch(rt)
        await rt.send("k", Sample(4, 1.25))
        assert await rt.receive("k", timeout=5.0) == Scaled(4, 2.5)
        await rt.send("k", Sample(3, 1.0))  # odd: no output
        with pytest.raises(QueueTimeoutError):
            await rt.receive("k", timeout=0.02)
        assert await rt.send_and_receive("k", Sample(6, 0.5), timeout=5.0) == Scaled(6, 1.0)


async def test_send_batch_with_the_wrong_dtype_names_both():
    async with RingKernelRuntime() as rt:
        await launch(rt)
        with pytest.raises(TypeError) as e:
            await rt.send_batch("k", np.zeros(4, OUT))
        assert str(IN) in str(e.value) and str(OUT) in str(e.value)


async def test_several_workers_one_ring():
    async with RingKernelRuntime() as rt:
        await launch(rt, state=np.zeros(2), workers=3, queue_size=256)
        n = 6000
        sender = asyncio.create_task(rt.send_batch("k", samples(np.arange(n)), timeout=10.0))
        got: list[int] = []
        while len(got) < n // 2:
            got.extend((await rt.receive_batch("k", 1024, timeout=5.0))["a"])
        assert await sender == n
        assert sorted(got) == list(range(0, n, 2))
        assert rt.get_telemetry("k").messages_processed == n


async def test_handler_exception_fails_the_kernel_with_its_cause():
    async with RingKernelRuntime() as rt:
        await launch(rt, func=fails_on_five, workers=2)
        await rt.send_batch("k", samples(np.arange(10)))
        for _ in range(1000):
            if rt.get_kernel_state("k") is KernelState.FAILED:
                break
            await asyncio.sleep(0.002)
        assert rt.get_kernel_state("k") is KernelState.FAILED
        err = rt.get_error("k")
        assert isinstance(err, RuntimeError) and "five" in str(err)
        with pytest.raises(KernelFailedError) as e:
            await rt.send_batch("k", samples([1]))
        assert e.value.__cause__ is err
        assert rt.get_telemetry("k").errors == 1
        await rt.terminate("k")  # releases the (already stopped) threads
        assert rt.get_kernel_state("k") is KernelState.FAILED
    assert not cpu_threads()


async def test_typing_failure_fails_the_launch():
    async with RingKernelRuntime() as rt:
        with pytest.raises(KernelFailedError, match="does not compile"):
            await rt.launch(
                "bad", does_not_type, input_type=Sample, output_type=Scaled, backend="cpu"
            )
        assert rt.get_kernel_state("bad") is KernelState.FAILED


async def test_backpressure_strategies_through_the_runtime():
    async with RingKernelRuntime() as rt:
        for kid, strategy in [("rj", "reject"), ("dn", "drop_newest"), ("do", "drop_oldest")]:
            await rt.launch(
                kid,
                scale,
                input_type=Sample,
                output_type=Scaled,
                backend="cpu",
                queue_size=4,
                backpressure=strategy,
            )
        for a in range(4):
            await rt.send("rj", Sample(a, 0.0))
        with pytest.raises(QueueFullError):
            await rt.send("rj", Sample(9, 0.0))
        assert rt.get_telemetry("rj").messages_rejected == 1

        assert await rt.send_batch("dn", samples(np.arange(0, 12, 2))) == 4
        await rt.activate("dn")
        assert list((await rt.receive_batch("dn", 8, timeout=5.0))["a"]) == [0, 2, 4, 6]
        assert rt.get_telemetry("dn").messages_dropped == 2

        assert await rt.send_batch("do", samples(np.arange(0, 12, 2))) == 4
        await rt.activate("do")
        got: list[int] = []
        while len(got) < 4:
            got.extend((await rt.receive_batch("do", 8, timeout=5.0))["a"])
        assert got == [4, 6, 8, 10]
        assert rt.get_telemetry("do").messages_dropped == 2

        await rt.launch(
            "bl", scale, input_type=Sample, output_type=Scaled, backend="cpu", queue_size=2
        )
        await rt.send_batch("bl", samples([0, 2]))
        with pytest.raises(QueueFullError):
            await rt.send("bl", Sample(4, 0.0), timeout=0.01)
        assert rt.get_telemetry("bl").messages_rejected == 1


async def test_relaunching_a_kernel_does_not_recompile(monkeypatch):
    import pydotcompute.backends.cpu as cpu

    async with RingKernelRuntime() as rt:
        await launch(rt, kid="a")
        calls = []
        real = cpu._compose
        monkeypatch.setattr(cpu, "_compose", lambda *a: calls.append(a) or real(*a))
        await launch(rt, kid="b")
        await rt.terminate("a")
        await launch(rt, kid="a")
        assert calls == []
        assert isinstance(rt._kernels["b"].kernel_backend, CpuKernelBackend)


async def test_message_classes_with_record_layouts():
    from pydotcompute import message

    @message
    class Reading:
        sensor: int
        value: float

    @message
    class Doubled:
        sensor: int
        value: float

    def double(msg, out, state):
        out.sensor = msg.sensor
        out.value = 2.0 * msg.value
        out.correlation_id[:] = msg.message_id
        return msg.value >= 0.0

    async with RingKernelRuntime() as rt:
        await launch(rt, func=double, input_type=Reading, output_type=Doubled, state=None)
        r = Reading(sensor=3, value=1.5)
        out = await rt.send_and_receive("k", r, timeout=5.0)
        assert isinstance(out, Doubled)
        assert (out.sensor, out.value, out.correlation_id) == (3, 3.0, r.message_id)
        recs = np.zeros(3, Reading.__record_dtype__)
        recs["sensor"] = [1, 2, 3]
        recs["value"] = [1.0, -1.0, 2.0]
        assert await rt.send_batch("k", recs) == 3
        got = await rt.receive_batch("k", 8, timeout=5.0)
        while len(got) < 2:
            got = np.concatenate([got, await rt.receive_batch("k", 8, timeout=5.0)])
        assert got.dtype == Doubled.__record_dtype__
        assert list(got["sensor"]) == [1, 3] and list(got["value"]) == [2.0, 4.0]


async def test_blocked_message_sends_keep_their_own_records():
    from pydotcompute import message

    @message
    class Num:
        n: int

    def passthrough(msg, out, state):
        out.n = msg.n
        return True

    async with RingKernelRuntime() as rt:
        await rt.launch(
            "p", passthrough, input_type=Num, output_type=Num, backend="cpu", queue_size=2
        )
        await rt.send("p", Num(n=1))
        await rt.send("p", Num(n=2))
        waiting = [asyncio.create_task(rt.send("p", Num(n=i), timeout=5.0)) for i in (3, 4)]
        await asyncio.sleep(0.01)  # both are now waiting for room
        assert not any(t.done() for t in waiting)
        await rt.activate("p")
        await asyncio.gather(*waiting)
        got = sorted([(await rt.receive("p", timeout=5.0)).n for _ in range(4)])
        assert got == [1, 2, 3, 4]


async def test_kernel_typed_by_a_plain_dtype_takes_single_records():
    dt = np.dtype([("a", "<i8"), ("b", "<f8")], align=True)

    def double(msg, out, state):
        out.a = msg.a * 2
        out.b = msg.b
        return True

    async with RingKernelRuntime() as rt:
        await rt.launch("dt", double, backend="cpu", input_type=dt, output_type=dt)
        await rt.activate("dt")
        await rt.send("dt", np.array((3, 1.5), dt)[()])
        out = await rt.receive("dt", timeout=5)
        assert (int(out["a"]), float(out["b"])) == (6, 1.5)
        with pytest.raises(TypeError):  # the ring names both dtypes
            await rt.send("dt", np.array((1,), [("x", "<i8")])[()])


async def test_launch_compiles_everything_the_first_batch_needs():
    # A dtype no other test uses, so its ring operations were never compiled before.
    dt = np.dtype([("first_batch_a", "<i4"), ("first_batch_b", "<f4")], align=True)
    from pydotcompute.rings import host_ops

    def copy(msg, out, state):
        out.first_batch_a = msg.first_batch_a
        out.first_batch_b = msg.first_batch_b
        return True

    def compiled() -> dict[str, int]:
        names = ("ring_push", "ring_try_push", "ring_pop", "ring_depth")
        return {name: len(getattr(host_ops, name).signatures) for name in names}

    async with RingKernelRuntime() as rt:
        await rt.launch("warm", copy, backend="cpu", input_type=dt, output_type=dt)
        await rt.activate("warm")
        after_launch = compiled()
        recs = np.zeros(8, dt)
        recs["first_batch_a"] = np.arange(8)
        await rt.send_batch("warm", recs)
        got = await rt.receive_batch("warm", 100, timeout=5)
        assert list(got["first_batch_a"]) == list(range(8))
        # nothing was compiled on the first batch: launch did it
        assert compiled() == after_launch
