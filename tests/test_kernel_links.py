"""Links between compiled ``cpu`` kernels: one kernel's loop feeds another's input ring.

``rt.link(a, b)`` re-points ``a``'s workers at ``b``'s input ring: records go from one
compiled loop to the other with no Python per record, in order, exactly once, under
``b``'s backpressure strategy. Bad links are refused naming the kernels; ``unlink``
and terminating either kernel end a link cleanly. A coordinator graph whose adjacent
``cpu`` kernel stages do not fuse runs them linked, with the same results.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pydotcompute import CpuOptions, KernelLinkError, RingKernelRuntime, message
from pydotcompute.coordinator import deploy, stage
from pydotcompute.coordinator.ledger_journal import JournalLedger
from pydotcompute.errors import ItemFailedError, ItemFilteredError, KernelFailedError
from pydotcompute.rings.backpressure import BackpressureStrategy


@message
class Num:
    x: np.int64


@message
class Pair:
    x: np.int64
    y: np.int64


def inc(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x + 1
    return True


def double(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x * 2
    return True


def keep_even(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x
    return msg.x % 2 == 0


def fails_on_13(msg, out, state):  # type: ignore[no-untyped-def]
    if msg.x == 13:
        raise ValueError("thirteen")
    out.x = msg.x
    return True


def widen(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x
    out.y = -msg.x
    return True


async def _launch(rt: RingKernelRuntime, kid: str, fn, **kw) -> None:  # type: ignore[no-untyped-def]
    kw.setdefault("input_type", Num)
    kw.setdefault("output_type", Num)
    await rt.launch(kid, fn, backend="cpu", **kw)
    await rt.activate(kid)


async def _receive_all(rt: RingKernelRuntime, kid: str, n: int, timeout: float = 20.0) -> list[int]:
    got: list[int] = []
    while len(got) < n:
        batch = await rt.receive_batch(kid, n - len(got), timeout)
        got.extend(int(v) for v in batch["x"])
    return got


async def _until(check, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Wait until ``check()`` holds (the kernels' threads run on their own time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def _processed(rt: RingKernelRuntime, kid: str) -> int:
    t = rt.get_telemetry(kid)
    assert t is not None
    return t.messages_processed


def _num_records(values: range) -> np.ndarray:
    from pydotcompute.messages.record import record_layout

    dt = record_layout(Num).dtype
    out = np.zeros(len(values), dt)
    out["x"] = np.fromiter(values, np.int64, len(values))
    return out


async def test_fifo_and_exactly_once_through_a_small_ring() -> None:
    """Many records through a link whose ring holds 8: it wraps and the producer
    waits (BLOCK), yet every record arrives once, in order."""
    n = 20_000
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "b", double, queue_size=8)
        assert await rt.link("a", "b") == "the input ring of 'b' (process memory)"
        assert rt.links == {"a": "b"}
        sender = asyncio.create_task(rt.send_batch("a", _num_records(range(n)), 30))
        got = await _receive_all(rt, "b", n)
        await sender
        assert got == [(v + 1) * 2 for v in range(n)]
        b_ring = rt._kernels["b"].kernel_backend.in_ring  # type: ignore[attr-defined]
        c = b_ring.counters()
        assert c.enqueued == n and c.dequeued == n and c.dropped == 0 and c.rejected == 0
        assert c.high_water <= 8


async def test_block_holds_the_producer_and_loses_nothing() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await rt.launch("b", double, backend="cpu", input_type=Num, output_type=Num, queue_size=4)
        await rt.link("a", "b")  # b stays LAUNCHED: it consumes nothing
        await rt.send_batch("a", _num_records(range(100)), 5)
        b_ring = rt._kernels["b"].kernel_backend.in_ring  # type: ignore[attr-defined]
        await _until(lambda: b_ring.depth == 4)  # full; the producer waits for room
        await asyncio.sleep(0.05)
        assert b_ring.depth == 4
        assert b_ring.counters().dropped == 0 and b_ring.counters().rejected == 0
        await rt.activate("b")
        got = await _receive_all(rt, "b", 100)
        assert got == [(v + 1) * 2 for v in range(100)]


@pytest.mark.parametrize(
    "strategy",
    [
        BackpressureStrategy.DROP_NEWEST,
        BackpressureStrategy.DROP_OLDEST,
        BackpressureStrategy.REJECT,
    ],
)
async def test_drop_strategies_count_what_the_link_drops(strategy: BackpressureStrategy) -> None:
    n = 50
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await rt.launch(
            "b",
            double,
            backend="cpu",
            input_type=Num,
            output_type=Num,
            queue_size=4,
            backpressure=strategy,
        )
        await rt.link("a", "b")
        await rt.send_batch("a", _num_records(range(n)), 5)
        b_ring = rt._kernels["b"].kernel_backend.in_ring  # type: ignore[attr-defined]

        def lost_now() -> int:
            c = b_ring.counters()
            return c.rejected if strategy is BackpressureStrategy.REJECT else c.dropped

        await _until(lambda: lost_now() == n - 4)
        c = b_ring.counters()
        lost = lost_now()
        assert lost == n - 4 and c.depth == 4
        await rt.activate("b")
        got = await _receive_all(rt, "b", 4)
        kept = range(n - 4, n) if strategy is BackpressureStrategy.DROP_OLDEST else range(4)
        assert got == [(v + 1) * 2 for v in kept]
        tb = rt.get_telemetry("b")
        assert tb is not None
        counted = (
            tb.messages_rejected if strategy is BackpressureStrategy.REJECT else tb.messages_dropped
        )
        assert counted == n - 4


async def test_replies_correlate_with_the_message_sent_to_the_first_kernel() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "b", double)
        await rt.link("a", "b")
        sent = [Num(x=i) for i in range(10)]
        for m in sent:
            await rt.send("a", m)
        replies = [await rt.receive("b", 5) for _ in sent]
        assert [r.correlation_id for r in replies] == [m.message_id for m in sent]
        assert len({r.message_id for r in replies}) == 10
        assert all(r.message_id != m.message_id for r, m in zip(replies, sent, strict=True))


async def test_bad_links_are_refused_naming_the_kernels() -> None:
    async def actor(ctx):  # type: ignore[no-untyped-def]
        while not ctx.should_terminate:
            await ctx.send(await ctx.receive())

    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "b", double)
        await _launch(rt, "c", inc)
        await _launch(rt, "wide", widen, output_type=Pair)
        await rt.launch("host", actor)
        with pytest.raises(KernelLinkError, match="'a'.*'a'.*itself"):
            await rt.link("a", "a")
        with pytest.raises(KernelLinkError, match="'wide' outputs records .*'b' takes"):
            await rt.link("wide", "b")
        with pytest.raises(KernelLinkError, match="'host' runs on host"):
            await rt.link("a", "host")
        await rt.link("a", "b")
        with pytest.raises(KernelLinkError, match="'a' already feeds 'b'"):
            await rt.link("a", "c")
        with pytest.raises(KernelLinkError, match="'b' is already fed by 'a'"):
            await rt.link("c", "b")
        with pytest.raises(KernelLinkError, match="cycle"):
            await rt.link("b", "a")
        with pytest.raises(KernelLinkError, match="'b' is fed by kernel 'a'.*send to 'a'"):
            await rt.send("b", Num(x=1))
        with pytest.raises(KernelLinkError, match="'b' is fed by kernel 'a'"):
            await rt.send_batch("b", _num_records(range(3)))
        with pytest.raises(KernelLinkError, match="'a' sends its outputs to kernel 'b'"):
            await rt.receive("a", 0.01)
        with pytest.raises(KernelLinkError, match="'a' sends its outputs to kernel 'b'"):
            await rt.receive_batch("a", 4, 0.01)
        with pytest.raises(KernelLinkError, match="'c' is not linked"):
            await rt.unlink("c")
        with pytest.raises(KernelLinkError, match="'a' is not linked to 'c'"):
            await rt.unlink("a", "c")
        await rt.terminate("c")
        with pytest.raises(KernelLinkError, match="'c' is TERMINATED"):
            await rt.link("b", "c")


async def test_a_chain_of_three_and_unlink_in_the_middle_of_traffic() -> None:
    n = 5_000
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "b", double, queue_size=16)
        await _launch(rt, "c", inc, queue_size=16)
        await rt.link("a", "b")
        await rt.link("b", "c")
        got: dict[str, list[int]] = {"b": [], "c": []}

        async def collect() -> None:
            while len(got["b"]) + len(got["c"]) < n:
                for kid in ("c", "b"):
                    try:
                        batch = await rt.receive_batch(kid, n, 0.005)
                    except (asyncio.TimeoutError, KernelLinkError):
                        continue  # b refuses receives while it is linked
                    got[kid].extend(int(v) for v in batch["x"])

        collector = asyncio.create_task(collect())
        sender = asyncio.create_task(rt.send_batch("a", _num_records(range(n)), 30))
        while len(got["c"]) < 100:
            await asyncio.sleep(0.001)
        await rt.unlink("b", "c")  # b's later outputs go to b's own output ring
        assert rt.links == {"a": "b"}
        await sender
        await asyncio.wait_for(collector, 30)
        # Each record came out of exactly one end, in order, and once.
        assert [v - 1 for v in got["c"]] + got["b"] == [(v + 1) * 2 for v in range(n)]
        assert got["b"], "the unlink came after the last record"
        await rt.send("c", Num(x=1))  # c takes sends again
        assert (await rt.receive("c", 5)).x == 2


async def test_outputs_queued_before_the_link_go_first() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "b", double)
        await rt.send_batch("a", _num_records(range(50)))

        def queued() -> int:
            t = rt.get_telemetry("a")
            assert t is not None
            return t.output_queue_depth

        await _until(lambda: queued() == 50)
        await rt.link("a", "b")
        await rt.send_batch("a", _num_records(range(50, 100)))
        assert await _receive_all(rt, "b", 100) == [(v + 1) * 2 for v in range(100)]


async def test_terminating_the_consumer_ends_the_link() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await rt.launch("b", double, backend="cpu", input_type=Num, output_type=Num, queue_size=4)
        await rt.link("a", "b")
        await rt.send_batch("a", _num_records(range(20)))
        await _until(lambda: _processed(rt, "a") == 20)  # b's ring is full; a waits
        await asyncio.wait_for(rt.terminate("b"), 10)
        assert rt.links == {}
        # a is back on its own output ring and goes on
        await rt.send("a", Num(x=41))
        got = await _receive_all(rt, "a", 1, 5)
        assert got == [42]
        tb = rt.get_telemetry("b")
        ta = rt.get_telemetry("a")
        assert tb is not None and ta is not None
        # nothing vanished: 20 records were handled by a, and what b never took is counted
        assert ta.messages_processed == 21
        assert tb.messages_dropped + tb.messages_processed == 20


async def test_terminating_the_producer_ends_the_link() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "b", double)
        await rt.link("a", "b")
        await rt.send_batch("a", _num_records(range(10)))
        assert await _receive_all(rt, "b", 10) == [(v + 1) * 2 for v in range(10)]
        await rt.terminate("a")
        assert rt.links == {}
        await rt.send("b", Num(x=5))
        assert (await rt.receive("b", 5)).x == 10


async def test_shutdown_with_links_in_place_leaves_nothing_running() -> None:
    rt = RingKernelRuntime()
    await _launch(rt, "a", inc)
    await _launch(rt, "b", double, queue_size=4)
    await _launch(rt, "c", inc, queue_size=4)
    await rt.link("a", "b")
    await rt.link("b", "c")
    await rt.send_batch("a", _num_records(range(100)))
    await asyncio.wait_for(rt.shutdown(), 15)
    for kid in ("a", "b", "c"):
        backend = rt._kernels[kid].kernel_backend
        assert not backend.consuming()  # type: ignore[attr-defined]
    assert rt.links == {}


async def test_a_restarting_producer_stays_linked() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", fails_on_13, restart="on-failure")
        await _launch(rt, "b", double)
        await rt.link("a", "b")
        await rt.send_batch("a", _num_records(range(20)))
        got = await _receive_all(rt, "b", 19)
        assert got == [v * 2 for v in range(20) if v != 13]
        assert rt.links == {"a": "b"}


# -- the coordinator ---------------------------------------------------------------------


async def _run_flow(rt: RingKernelRuntime, graph, name: str, n: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    flow = await rt.deploy(graph, name=name)
    keys = await flow.submit_many(range(n), keys=[str(i) for i in range(n)])
    await asyncio.wait_for(flow.drain(), 30)
    out: dict[str, object] = {}
    for k in keys:
        try:
            out[k] = await flow.result(k)
        except (ItemFilteredError, ItemFailedError) as exc:
            out[k] = type(exc).__name__
    await flow.close()
    return out


async def test_a_flow_links_kernel_stages_that_do_not_fuse() -> None:
    """fuse=False keeps the stages apart; their kernels are linked instead, and the
    results (filtered items included) equal those of the same graph unlinked."""
    n = 300
    async with RingKernelRuntime() as rt:
        for kid, fn in (("a", inc), ("b", keep_even), ("c", double)):
            await _launch(rt, kid, fn)

        def graph(link: bool):  # type: ignore[no-untyped-def]
            return (
                stage(lambda i: Num(x=i))
                >> stage("a", fuse=False, link=link)
                >> stage("b", fuse=False, link=link)
                >> stage("c", fuse=False, link=link)
                >> (lambda m: int(m.x))
            )

        flow = await rt.deploy(graph(True), name="linked")
        report = flow.explain()
        assert [s.stages for s in report.linked] == [("a", "b", "c")]
        assert report.fused == ()
        assert report.reason("a", "b") == "fuse=False on 'a'"
        assert rt.links == {"a": "b", "b": "c"}
        await flow.close()
        assert rt.links == {}  # the flow's links end with it

        linked = await _run_flow(rt, graph(True), "linked2", n)
        unlinked_flow = await rt.deploy(graph(False), name="apart")
        assert unlinked_flow.explain().linked == ()
        assert unlinked_flow.explain().link_reason("a", "b") == "link=False on 'a'"
        await unlinked_flow.close()
        unlinked = await _run_flow(rt, graph(False), "apart2", n)
        assert linked == unlinked
        assert linked["3"] == 8 and linked["2"] == "ItemFilteredError"


async def test_kernels_with_different_workers_link_where_they_cannot_fuse() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc, workers=2)
        await _launch(rt, "b", double)
        graph = stage(lambda i: Num(x=i)) >> "a" >> "b" >> (lambda m: int(m.x))
        flow = await rt.deploy(graph, name="w")
        report = flow.explain()
        assert report.reason("a", "b").startswith("different options")
        assert [s.kernels for s in report.linked] == [("a", "b")]
        await flow.submit_many(range(200), keys=[str(i) for i in range(200)])
        await asyncio.wait_for(flow.drain(), 30)
        assert [await flow.result(str(i)) for i in range(200)] == [(i + 1) * 2 for i in range(200)]
        await flow.close()


async def test_a_handler_raising_inside_the_linked_chain_fails_its_item_only() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "b", fails_on_13, restart="on-failure")
        graph = (
            stage(lambda i: Num(x=i))
            >> stage("a", fuse=False)
            >> stage("b", fuse=False, retries=1)
            >> (lambda m: int(m.x))
        )
        flow = await rt.deploy(graph, name="err")
        assert [s.kernels for s in flow.explain().linked] == [("a", "b")]
        await flow.submit_many(range(30), keys=[str(i) for i in range(30)])
        await asyncio.wait_for(flow.drain(), 30)
        assert flow.status() == {"done": 29, "dead": 1}
        with pytest.raises(ItemFailedError) as info:
            await flow.result("12")
        assert (
            "thirteen" in info.value.record.error or "KernelFailedError" in info.value.record.error
        )
        assert await flow.result("20") == 21
        await flow.close()


async def test_a_durable_flow_links_copies_and_each_item_is_one_hop(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "j.db")
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "b", keep_even)
        await _launch(rt, "c", double)
        graph = (
            stage(lambda i: Num(x=i))
            >> stage("a", fuse=False)
            >> stage("b", fuse=False)
            >> "c"
            >> (lambda m: int(m.x))
        )
        async with await deploy(rt, graph, name="d", journal=path) as flow:
            assert isinstance(flow._ledger, JournalLedger)
            [seg] = flow.explain().linked
            assert seg.stages == ("a", "b", "c") and seg.kernels == ("a", "b", "c")
            assert len(seg.copies) == 3 and seg.copies[0] != "a"
            # the copies are linked; the graph's kernels stay free for inner items
            assert rt.links == {seg.copies[0]: seg.copies[1], seg.copies[1]: seg.copies[2]}
            await flow.submit_many(range(100), keys=[str(i) for i in range(100)])
            await asyncio.wait_for(flow.drain(), 60)
            assert flow.status() == {"done": 50, "filtered": 50}
            assert await flow.result("3") == 8
            copy_a = rt.get_telemetry(seg.copies[0])
            assert copy_a is not None and copy_a.messages_processed == 100
            for kid in ("a", "b", "c"):  # no item was held at an inner stage
                t = rt.get_telemetry(kid)
                assert t is not None and t.messages_processed == 0
        assert rt.links == {}
        assert seg.copies[0] not in rt.kernel_ids  # terminated with the flow
        async with await deploy(rt, graph, name="d", journal=path) as flow:
            await asyncio.wait_for(flow.drain(), 30)
            assert flow.status() == {"done": 50, "filtered": 50}
            [seg2] = flow.explain().linked
            copy_a = rt.get_telemetry(seg2.copies[0])
            assert copy_a is not None and copy_a.messages_processed == 0  # nothing ran again


async def test_items_a_journal_holds_at_an_inner_stage_run_on_the_graphs_kernels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "j.db")

    async def stuck(ctx):  # type: ignore[no-untyped-def]
        while not ctx.should_terminate:
            await asyncio.sleep(0.01)

    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "c", inc)
        await rt.launch("b", stuck)
        await rt.activate("b")
        graph = (
            stage(lambda i: Num(x=i))
            >> stage("a", fuse=False)
            >> stage("b", fuse=False)
            >> "c"
            >> (lambda m: int(m.x))
        )
        flow = await deploy(rt, graph, name="f", journal=path)
        assert flow.explain().linked == ()  # b runs on host
        assert (
            flow.explain().link_reason("a", "b")
            == "backend host does not link (only cpu and cuda): 'b'"
        )
        await flow.submit_many(range(20), keys=[str(i) for i in range(20)])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while sum(flow.stage_load()["b"].values()) < 20:
            assert loop.time() < deadline, flow.stage_load()
            await asyncio.sleep(0.02)
        await flow.close()  # the items wait at "b" in the journal
        await rt.terminate("b")
        await _launch(rt, "b", double)
        async with await deploy(rt, graph, name="f", journal=path) as flow:
            [seg] = flow.explain().linked
            assert seg.stages == ("a", "b", "c")
            await flow.submit_many([100], keys=["new"])
            await asyncio.wait_for(flow.drain(), 60)
            assert flow.status() == {"done": 21}
            assert [await flow.result(str(i)) for i in range(20)] == [
                (i + 1) * 2 + 1 for i in range(20)
            ]
            assert await flow.result("new") == 203
            # The old items ran at "b" and "c" on the graph's kernels; the new one
            # through the linked copies.
            tb = rt.get_telemetry("b")
            assert tb is not None and tb.messages_processed == 20
            head = rt.get_telemetry(seg.copies[0])
            assert head is not None and head.messages_processed == 1


async def test_a_failed_first_kernel_fails_the_items_waiting_on_the_chain() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", fails_on_13)  # no restart: a fails for good
        await _launch(rt, "b", double)
        graph = stage(lambda i: Num(x=i)) >> stage("a", fuse=False) >> "b" >> (lambda m: int(m.x))
        flow = await rt.deploy(graph, name="fail")
        await flow.submit_many(range(13, 40), keys=[str(i) for i in range(13, 40)])
        await asyncio.wait_for(flow.drain(), 30)
        assert flow.status().get("done", 0) == 0
        assert flow.status()["dead"] == 27
        with pytest.raises(ItemFailedError, match="KernelFailedError"):
            await flow.result("20")
        await flow.close()


async def test_several_producer_workers_deliver_each_record_once() -> None:
    n = 10_000
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc, workers=2)
        await _launch(rt, "b", double, queue_size=8)
        await rt.link("a", "b")
        sender = asyncio.create_task(rt.send_batch("a", _num_records(range(n)), 30))
        got = await _receive_all(rt, "b", n)
        await sender
        assert sorted(got) == [(v + 1) * 2 for v in range(n)]


async def test_a_paused_producer_stays_paused_across_link_and_unlink() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "b", double)
        await rt.deactivate("a")
        await rt.link("a", "b")
        await rt.send_batch("a", _num_records(range(5)))
        await asyncio.sleep(0.05)
        t = rt.get_telemetry("a")
        assert t is not None and t.messages_processed == 0 and t.queue_depth == 5
        await rt.reactivate("a")
        assert await _receive_all(rt, "b", 5) == [(v + 1) * 2 for v in range(5)]
        await rt.deactivate("a")
        await rt.unlink("a", "b")
        await rt.send("a", Num(x=1))
        await asyncio.sleep(0.05)
        t = rt.get_telemetry("a")
        assert t is not None and t.messages_processed == 5
        await rt.reactivate("a")
        assert (await rt.receive("a", 5)).x == 2


async def test_unlink_from_a_consumer_that_failed_for_good_discards_and_goes_on() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "b", fails_on_13, queue_size=4)
        await rt.link("a", "b")
        await rt.send("a", Num(x=12))  # b gets 13 and fails
        with pytest.raises(KernelFailedError):
            await _receive_all(rt, "b", 1, 5)
        await rt.send_batch("a", _num_records(range(20)))  # a fills b's ring and waits
        await _until(lambda: _processed(rt, "a") == 21)
        await asyncio.wait_for(rt.unlink("a", "b"), 10)
        t = rt.get_telemetry("a")
        assert t is not None and t.messages_processed == 21
        await rt.send("a", Num(x=1))
        assert await _receive_all(rt, "a", 1, 5) == [2]
        tb = rt.get_telemetry("b")
        assert tb is not None and tb.messages_dropped == 20  # what a placed after it failed


async def test_unlink_from_a_restarting_consumer_keeps_its_queue() -> None:
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(
            rt,
            "b",
            fails_on_13,
            restart="on-failure",
            restart_backoff=0.3,
            options=CpuOptions(batch=1),  # the rest stays in the ring, not in b's batch
        )
        await rt.link("a", "b")
        await rt.send_batch("a", _num_records(range(10, 20)))  # b raises on 13 (from 12)
        await _until(lambda: _processed(rt, "a") == 10)
        await rt.unlink("a", "b")  # while b waits for its restart
        got = await _receive_all(rt, "b", 9)
        assert got == [v + 1 for v in range(10, 20) if v + 1 != 13]


async def test_items_filtered_at_the_end_of_a_burst_settle_through_the_chain() -> None:
    """No later reply settles them: the chain is seen drained kernel by kernel."""
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc)
        await _launch(rt, "b", keep_even)
        await _launch(rt, "c", double)
        graph = (
            stage(lambda i: Num(x=i))
            >> stage("a", fuse=False)
            >> stage("b", fuse=False)
            >> stage("c", fuse=False, timeout=None)
            >> (lambda m: int(m.x))
        )
        flow = await rt.deploy(graph, name="burst")
        assert [s.kernels for s in flow.explain().linked] == [("a", "b", "c")]
        evens = [2 * i for i in range(50)]  # a makes them odd; b drops them all
        await flow.submit_many(evens, keys=[str(v) for v in evens])
        await asyncio.wait_for(flow.drain(), 30)
        assert flow.status() == {"filtered": 50}
        await flow.close()


async def test_a_linked_segment_with_two_workers_ends_dropped_items_filtered() -> None:
    """Several workers per kernel: no reply settles another, yet each kernel says in
    turn when it is done with what the one before placed in its ring."""
    async with RingKernelRuntime() as rt:
        await _launch(rt, "a", inc, workers=2)
        await _launch(rt, "b", keep_even, workers=2)
        graph = (
            stage(lambda i: Num(x=i))
            >> stage("a", fuse=False, timeout=60)
            >> stage("b", fuse=False, timeout=60)
            >> (lambda m: int(m.x))
        )
        flow = await rt.deploy(graph, name="w2")
        assert [s.kernels for s in flow.explain().linked] == [("a", "b")]
        values = [*range(300), 400, 402]  # the burst ends with records b drops
        await flow.submit_many(values, keys=[str(v) for v in values])
        await asyncio.wait_for(flow.drain(), 30)
        kept = [v for v in values if (v + 1) % 2 == 0]
        assert flow.status() == {"done": len(kept), "filtered": len(values) - len(kept)}
        assert [await flow.result(str(v)) for v in kept] == [v + 1 for v in kept]
        assert flow.dead_letters() == []
        with pytest.raises(ItemFilteredError):
            await flow.result("402")
        await flow.close()
