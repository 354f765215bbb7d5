"""Links between ``cuda`` kernels on numba-cuda's simulator: ``rt.link(a, b)`` relaunches
``a``'s loop writing into a ring in device memory that ``b``'s loop reads. Records keep
their order and arrive once, what either kernel held at the link goes first, a full
link holds the producer back (BLOCK), and ending the link (``unlink``, or the producer
stopping) gives the consumer what the link still held, then its own input ring.

The simulator tests run in a child process with ``NUMBA_ENABLE_CUDASIM=1``.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pydotcompute import message
from tests.simulator_child import parent, run_simulator_half, sim


@parent
def test_simulator_suite() -> None:
    out = run_simulator_half(__file__, "not test_simulator_suite", timeout=300)
    assert "skipped" not in out.splitlines()[-1]


REC = np.dtype([("x", "<i8")])


@message
class FlowNum:
    """A record a durable flow can journal (defined at module level, so it pickles)."""

    x: np.int64


WIDE = np.dtype([("x", "<i8"), ("y", "<i8")])


def plus_one(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x + 1
    return True


def times_ten(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x * 10
    return True


def widen(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x
    out.y = msg.x
    return True


def one(x: int) -> np.void:
    rec = np.zeros(1, REC)
    rec["x"] = x
    return rec[0]


async def _wait_for(cond, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def _receive_all(rt, kid: str, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    got: list[int] = []
    while len(got) < n:
        batch = await rt.receive_batch(kid, n - len(got), timeout=60)
        got += [int(v) for v in batch["x"]]
    return got


async def _nothing_more(rt, kid: str) -> None:  # type: ignore[no-untyped-def]
    from pydotcompute.errors import QueueTimeoutError

    with pytest.raises(QueueTimeoutError):
        await rt.receive(kid, timeout=0.3)


async def _launch_pair(rt, queue_size: int = 16, activate_b: bool = True) -> None:  # type: ignore[no-untyped-def]
    opts = dict(backend="cuda", input_type=REC, output_type=REC, queue_size=queue_size)
    await rt.launch("a", plus_one, **opts)
    await rt.launch("b", times_ten, **opts)
    await rt.activate("a")
    if activate_b:
        await rt.activate("b")


async def _fill_link(rt, n: int) -> tuple[asyncio.Future[None], int]:  # type: ignore[no-untyped-def]
    """Pause ``b`` and send ``n`` records to ``a`` in order from a task of their own
    until the link from ``a`` to ``b`` is full; returns that task and the capacity."""
    await rt.deactivate("b")

    async def send_all() -> None:
        for x in range(n):
            await rt.send("a", one(x), timeout=60)

    sends = asyncio.ensure_future(send_all())
    cap = rt.get_telemetry("b").queue_capacity
    await _wait_for(lambda: rt.get_telemetry("b").queue_depth == cap)
    return sends, cap


@sim
async def test_a_link_keeps_order_and_what_both_kernels_held() -> None:
    from pydotcompute import RingKernelRuntime
    from pydotcompute.backends.cuda import CudaKernelBackend

    async with RingKernelRuntime() as rt:
        await _launch_pair(rt, activate_b=False)
        for x in (100, 101):  # b is paused: these wait in its own input ring
            await rt.send("b", one(x))
        for x in range(3):  # a answers these into its own output ring
            await rt.send("a", one(x))
        await _wait_for(lambda: rt.get_telemetry("a").output_queue_depth == 3)
        await rt.link("a", "b")
        assert rt.links == {"a": "b"}
        a = rt._get("a").kernel_backend
        b = rt._get("b").kernel_backend
        assert isinstance(a, CudaKernelBackend) and a.linked_to is b
        assert a._out_words is b._in_words  # one ring in device memory between them
        await rt.activate("b")
        for x in range(3, 24):
            await rt.send("a", one(x))
        got = await _receive_all(rt, "b", 2 + 24)
        assert got == [1000, 1010] + [(x + 1) * 10 for x in range(24)]
        await _nothing_more(rt, "b")
        ta, tb = rt.get_telemetry("a"), rt.get_telemetry("b")
        assert ta.messages_processed == 24 and tb.messages_processed == 26
        assert ta.messages_dropped == 0 and tb.messages_dropped == 0


@sim
async def test_a_full_link_holds_the_producer_back() -> None:
    from pydotcompute import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        await _launch_pair(rt, queue_size=16)
        await rt.link("a", "b")
        sends, cap = await _fill_link(rt, 48)
        # The link stays full while b is paused; a waits, nothing drops.
        await asyncio.sleep(0.3)
        assert rt.get_telemetry("b").queue_depth == cap
        assert rt.get_telemetry("a").messages_processed < 48
        await rt.reactivate("b")
        got = await _receive_all(rt, "b", 48)  # the sends finish as room frees up
        await sends
        assert got == [(x + 1) * 10 for x in range(48)]
        await _nothing_more(rt, "b")
        for kid in ("a", "b"):
            assert rt.get_telemetry(kid).messages_dropped == 0


@sim
async def test_unlink_gives_the_consumer_what_the_link_held() -> None:
    from pydotcompute import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        await _launch_pair(rt)
        await rt.link("a", "b")
        await rt.deactivate("b")
        for x in range(6):
            await rt.send("a", one(x))
        await _wait_for(lambda: rt.get_telemetry("a").messages_processed == 6)
        await rt.unlink("a", "b")
        assert rt.links == {}
        await rt.reactivate("b")
        await rt.send("b", one(7))  # b's own input ring again, after what the link held
        assert await _receive_all(rt, "b", 7) == [(x + 1) * 10 for x in range(6)] + [70]
        await rt.send("a", one(9))  # a answers the host again
        assert await _receive_all(rt, "a", 1) == [10]
        await _nothing_more(rt, "b")


@sim
async def test_a_producer_that_stops_hands_the_consumer_back_its_input() -> None:
    from pydotcompute import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        await _launch_pair(rt)
        await rt.link("a", "b")
        for x in range(5):
            await rt.send("a", one(x))
        assert await _receive_all(rt, "b", 5) == [(x + 1) * 10 for x in range(5)]
        await rt.terminate("a")
        assert rt.links == {}
        await rt.send("b", one(3))
        assert await _receive_all(rt, "b", 1) == [30]


@sim
async def test_links_refuse_what_they_cannot_join() -> None:
    from pydotcompute import RingKernelRuntime
    from pydotcompute.errors import KernelLinkError

    async with RingKernelRuntime() as rt:
        opts = dict(backend="cuda", input_type=REC, queue_size=8)
        await rt.launch("a", plus_one, output_type=REC, **opts)
        await rt.launch("w", widen, output_type=WIDE, **opts)
        await rt.launch("c", times_ten, backend="cpu", input_type=REC, output_type=REC)
        with pytest.raises(KernelLinkError, match="runs on cpu"):
            await rt.link("a", "c")
        with pytest.raises(KernelLinkError, match="outputs records"):
            await rt.link("w", "a")


@sim
async def test_the_far_kernels_reply_correlates_with_the_message_sent() -> None:
    # The producer's outputs keep their input's message_id, so what the consumer
    # answers names, as its correlation_id, the message that entered the link.
    from pydotcompute import RingKernelRuntime, message

    @message
    class LinkNum:
        x: np.int64

    async with RingKernelRuntime() as rt:
        opts = dict(backend="cuda", input_type=LinkNum, output_type=LinkNum, queue_size=16)
        await rt.launch("a", plus_one, **opts)
        await rt.launch("b", times_ten, **opts)
        for kid in ("a", "b"):
            await rt.activate(kid)
        await rt.link("a", "b")
        sent = [LinkNum(x=x) for x in range(6)]
        for m in sent:
            await rt.send("a", m)
        got = [await rt.receive("b", timeout=60) for _ in sent]
        assert [g.x for g in got] == [(m.x + 1) * 10 for m in sent]
        assert [g.correlation_id for g in got] == [m.message_id for m in sent]
        assert len({g.message_id for g in got}) == len(sent)  # replies have ids of their own


def fails_on_3(msg, out, state):  # type: ignore[no-untyped-def]
    if msg.x == 3:
        raise ValueError("three")
    out.x = msg.x + 1
    return True


@sim
async def test_a_producer_that_fails_hands_the_consumer_back_its_input() -> None:
    from pydotcompute import RingKernelRuntime
    from pydotcompute.errors import KernelFailedError

    async with RingKernelRuntime() as rt:
        opts = dict(backend="cuda", input_type=REC, output_type=REC, queue_size=16)
        await rt.launch("a", fails_on_3, **opts)
        await rt.launch("b", times_ten, **opts)
        for kid in ("a", "b"):
            await rt.activate(kid)
        await rt.link("a", "b")
        for x in range(3):
            await rt.send("a", one(x))
        assert await _receive_all(rt, "b", 3) == [10, 20, 30]
        await rt.send("a", one(3))
        await _wait_for(lambda: rt.get_kernel_state("a").name == "FAILED")
        with pytest.raises(KernelFailedError):
            await rt.send("a", one(4))
        await rt.terminate("a")
        await rt.send("b", one(5))
        assert await _receive_all(rt, "b", 1) == [50]
        await _nothing_more(rt, "b")


@sim
async def test_link_says_where_its_records_go_and_runs_through_pinned_host_memory(
    monkeypatch,
) -> None:  # type: ignore[no-untyped-def]
    # One GPU: device memory. Two GPUs without peer access link through pinned host
    # memory; the simulator has one device, so that choice is forced here, and the
    # ring in mapped memory is run end to end.
    from pydotcompute import RingKernelRuntime
    from pydotcompute.backends import cuda_link
    from pydotcompute.backends.cuda_loop import LINK_HOST

    async with RingKernelRuntime() as rt:
        await _launch_pair(rt)
        assert await rt.link("a", "b") == "device memory of GPU 0"
        await rt.unlink("a")
        monkeypatch.setattr(cuda_link, "link_memory", lambda producer, consumer: LINK_HOST)
        path = await rt.link("a", "b")
        assert path.startswith("pinned host memory")
        b = rt._get("b").kernel_backend
        assert b._in_link.kind == LINK_HOST and b._in_link._host is not None
        for x in range(20):
            await rt.send("a", one(x))
        assert await _receive_all(rt, "b", 20) == [(x + 1) * 10 for x in range(20)]
        await _nothing_more(rt, "b")


@sim
async def test_a_device_the_machine_does_not_have_is_refused() -> None:
    from pydotcompute import RingKernelRuntime
    from pydotcompute.backends.options import CudaOptions
    from pydotcompute.errors import KernelFailedError

    async with RingKernelRuntime() as rt:
        with pytest.raises(KernelFailedError, match="device=3, but this machine has 1 GPU"):
            await rt.launch("far", plus_one, backend="cuda", input_type=REC, output_type=REC,
                            options=CudaOptions(device=3))  # fmt: skip


@sim
@pytest.mark.parametrize("durable", [False, True])
async def test_a_flow_links_cuda_stages_that_do_not_fuse(tmp_path, durable: bool) -> None:  # type: ignore[no-untyped-def]
    # Two cuda kernel stages kept apart (fuse=False) run linked: records go from the
    # first resident loop to the second through device memory, one hop for the flow
    # (a durable flow links copies of the kernels).
    from pydotcompute import RingKernelRuntime
    from pydotcompute.coordinator import stage

    journal = str(tmp_path / "links.db") if durable else None
    async with RingKernelRuntime(journal=journal) as rt:
        for kid, fn in (("c1", plus_one), ("c2", times_ten)):
            await rt.launch(kid, fn, backend="cuda", input_type=FlowNum,
                            output_type=FlowNum, queue_size=16)  # fmt: skip
            await rt.activate(kid)
        g = (
            stage(lambda i: FlowNum(x=i))
            >> stage("c1", fuse=False, timeout=60)
            >> stage("c2", fuse=False, timeout=60)
            >> stage(lambda m: int(m.x))
        )
        flow = await rt.deploy(g, name="cudalinks")
        report = flow.explain()
        assert [s.stages for s in report.linked] == [("c1", "c2")], report.not_linked
        (seg,) = report.linked
        first = seg.copies[0] if durable else "c1"
        assert rt.links[first] == (seg.copies[1] if durable else "c2")
        keys = [str(i) for i in range(12)]
        await flow.submit_many(range(12), keys=keys)
        await flow.drain(timeout=120)
        assert [await flow.result(k) for k in keys] == [(i + 1) * 10 for i in range(12)]
        assert list(flow.dead_letters()) == []
        await flow.close()


def keep_even(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x
    return msg.x % 2 == 0


@sim
async def test_a_record_dropped_in_a_linked_cuda_segment_ends_its_item_filtered() -> None:
    # The first kernel drops odd records; the segment is in order end to end and each
    # kernel says where the outputs of what it released end (the consumer of the link
    # through its mirror of the link's `released`), so the burst's dropped items end
    # filtered long before the stage timeout, and the others keep their outputs.
    from pydotcompute import RingKernelRuntime
    from pydotcompute.coordinator import stage

    async with RingKernelRuntime() as rt:
        for kid, fn in (("even", keep_even), ("ten", times_ten)):
            await rt.launch(kid, fn, backend="cuda", input_type=FlowNum,
                            output_type=FlowNum, queue_size=16)  # fmt: skip
            await rt.activate(kid)
        flow = await rt.deploy(
            stage(lambda i: FlowNum(x=i))
            >> stage("even", fuse=False, timeout=300)
            >> stage("ten", fuse=False, timeout=300)
            >> stage(lambda m: int(m.x)),
            name="droplink",
        )
        assert [s.stages for s in flow.explain().linked] == [("even", "ten")]
        values = [0, 1, 2, 3, 4, 5, 7, 9]  # the burst ends with dropped records
        await flow.submit_many(values, keys=[str(i) for i in values])
        await asyncio.wait_for(flow.drain(), 60)
        assert [await flow.result(str(i)) for i in (0, 2, 4)] == [0, 20, 40]
        assert flow.status() == {"done": 3, "filtered": 5}
        assert flow.dead_letters() == []
        await flow.close()


@sim
async def test_a_producer_paused_and_resumed_while_its_link_is_full_goes_on() -> None:
    # On the simulator a kernel whose link is full must not take a turn that claims
    # input (it would wait for room while holding every kernel back, the consumer
    # that frees the room included): resuming it then waits for room instead.
    from pydotcompute import RingKernelRuntime

    async with RingKernelRuntime() as rt:
        await _launch_pair(rt, queue_size=16)
        await rt.link("a", "b")
        sends, cap = await _fill_link(rt, 40)
        await rt.deactivate("a")
        await asyncio.sleep(0.2)  # its loop has seen the pause
        await rt.reactivate("a")
        await asyncio.sleep(0.2)
        await rt.reactivate("b")
        got = await _receive_all(rt, "b", 40)
        await sends
        assert got == [(x + 1) * 10 for x in range(40)]
