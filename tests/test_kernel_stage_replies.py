"""Kernel stages match each reply to its request by identity, never by order.

A compiled handler that returns False produces no output for that record: the item
ends as *filtered* (counted, in the flow's status, not failed and not retried).
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from pydotcompute import CpuOptions, RingKernelRuntime, message
from pydotcompute.coordinator import stage
from pydotcompute.errors import ItemFilteredError


@message
class Num:
    x: np.int64


def keep_even(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x
    return msg.x % 2 == 0


def make(i: int) -> Num:
    return Num(x=i)


def unwrap(m: Num) -> int:
    return int(m.x)


async def launch_even(rt: RingKernelRuntime) -> None:
    await rt.launch("even", keep_even, backend="cpu", input_type=Num, output_type=Num)
    await rt.activate("even")


async def test_a_filtering_cpu_kernel_as_the_middle_stage_ends_odd_items_as_filtered():
    async with RingKernelRuntime() as rt:
        await launch_even(rt)
        flow = await rt.deploy(stage(make) >> stage("even", timeout=2) >> stage(unwrap), name="f")
        keys = await flow.submit_many(range(6), keys=[str(i) for i in range(6)])
        await flow.drain(timeout=20)
        assert flow.status() == {"done": 3, "filtered": 3}
        assert [await flow.result(k) for k in ("0", "2", "4")] == [0, 2, 4]
        assert flow.items("filtered") == ["1", "3", "5"]
        with pytest.raises(ItemFilteredError, match="even"):
            await flow.result("3")
        c = flow.counters()
        assert c["filtered"] == 3 and c["completed"] == 3 and c["retried"] == 0
        assert flow.dead_letters() == []
        assert len(keys) == 6


async def test_filtered_items_of_a_durable_flow_are_in_the_journal(tmp_path):
    async with RingKernelRuntime(journal=str(tmp_path / "f.db")) as rt:
        await launch_even(rt)
        flow = await rt.deploy(stage(make) >> stage("even", timeout=2) >> stage(unwrap), name="f")
        await flow.submit_many(range(40), keys=[str(i) for i in range(40)])
        await flow.drain(timeout=30)
        assert flow.status() == {"done": 20, "filtered": 20}
        assert sorted(flow.items("filtered"), key=int) == [str(i) for i in range(1, 40, 2)]
        assert [await flow.result(str(i)) for i in range(0, 40, 2)] == list(range(0, 40, 2))
        with pytest.raises(ItemFilteredError):
            await flow.result("7")
        assert flow.dead_letters() == []


async def test_many_items_through_a_filtering_kernel_keep_their_own_outputs():
    async with RingKernelRuntime() as rt:
        await launch_even(rt)
        flow = await rt.deploy(stage(make) >> stage("even", timeout=5) >> stage(unwrap), name="f")
        await flow.submit_many(range(2000), keys=[str(i) for i in range(2000)])
        await flow.drain(timeout=60)
        assert flow.status() == {"done": 1000, "filtered": 1000}
        for i in (0, 2, 998, 1998):
            assert await flow.result(str(i)) == i


@message
class Ask:
    n: int


@message
class Answer:
    n: int


async def answers_pairs_backwards_and_drops_sevens(ctx):
    # Holds two requests, then answers the second before the first; a 7 gets no answer.
    while not ctx.should_terminate:
        pair = [await ctx.receive(), await ctx.receive()]
        for m in reversed(pair):
            if m.n != 7:
                await ctx.send(Answer(n=m.n * 10, correlation_id=m.message_id))


async def test_a_host_actor_answering_out_of_order_or_not_at_all():
    # Out of order: each reply goes to its own request by correlation id. No answer:
    # a host actor cannot say it consumed a request without output, so that item
    # times out (and goes to the dead letters) as before; the others are unaffected.
    async with RingKernelRuntime() as rt:
        await rt.launch("pairs", answers_pairs_backwards_and_drops_sevens)
        await rt.activate("pairs")
        flow = await rt.deploy(
            stage(lambda i: Ask(n=i)) >> stage("pairs", timeout=1) >> stage(lambda a: a.n),
            name="h",
        )
        await flow.submit_many(range(10), keys=[str(i) for i in range(10)])
        await flow.drain(timeout=20)
        assert [await flow.result(str(i)) for i in range(10) if i != 7] == [
            10 * i for i in range(10) if i != 7
        ]
        [rec] = flow.dead_letters()
        assert rec.key == "7" and "within 1" in rec.error


def add_one(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x + 1
    return True


async def test_batches_in_flight_together_pass_their_outputs_on_in_order():
    # The next stages hold one item each: every batch waits for room item by item, and
    # a later batch whose replies are in must not take room freed for an earlier one.
    seen: list[int] = []

    async def record(x: int) -> int:
        seen.append(x)
        await asyncio.sleep(0)
        return x

    async with RingKernelRuntime() as rt:
        await rt.launch("one", add_one, backend="cpu", input_type=Num, output_type=Num)
        await rt.activate("one")
        graph = stage(make) >> "one" >> stage(unwrap, buffer=1) >> stage(record, buffer=1)
        async with await rt.deploy(graph, name="order") as flow:
            await flow.submit_many(range(3000))
            await flow.drain(timeout=60)
    assert seen == list(range(1, 3001))


def test_replies_keep_their_identity_with_repeated_ids():
    from pydotcompute.coordinator.kernel_replies import FILTERED_OUT, Waiting

    async def go() -> None:
        w = Waiting()
        a, b = uuid.uuid4().bytes, uuid.uuid4().bytes
        (s1, fa1), (_s2, fa2), (s3, fb) = w.expect(a), w.expect(a), w.expect(b)
        assert w.answer(b, "B") == s3
        assert w.answer(a, "A1") == s1
        assert fb.result() == "B" and fa1.result() == "A1" and not fa2.done()
        assert w.answer(uuid.uuid4().bytes, "stray") is None
        (s4, fc) = w.expect(None)
        assert w.settle_before(s4) == 1  # the second "a": consumed without output
        assert fa2.result() is FILTERED_OUT and not fc.done() and len(w) == 1

    asyncio.run(go())


def test_a_batch_of_replies_is_matched_by_id_with_repeats_strays_and_drops():
    from pydotcompute.coordinator.kernel_replies import FILTERED_OUT, Batch, Waiting

    w = Waiting()
    a, b, c, d = (uuid.uuid4().bytes for _ in range(4))
    first, second = Batch(3), Batch(2)
    s1 = w.expect_many([a, b, a], first, [0, 1, 2])
    s2 = w.expect_many([c, d], second, [1, 0])
    assert list(s1) == [1, 2, 3] and list(s2) == [4, 5] and len(w) == 5
    # Out of order, without drops: each reply finds its own request; the repeated id
    # goes to its oldest request first.
    w.answer_many([b, a], ["B", "A1"], in_order=False)
    assert first.results[:2] == ["A1", "B"] and first.left == 1
    # In order: the reply to d (seq 5) settles c (seq 4) as consumed without output,
    # and the second a (seq 3) before it; a stray reply then has nobody left.
    w.answer_many([d, uuid.uuid4().bytes], ["D", "stray"], in_order=True)
    assert first.results[2] is FILTERED_OUT and first.left == 0
    assert second.results == ["D", FILTERED_OUT] and second.left == 0
    assert len(w) == 0 and w.answer_oldest("late") is None
    # A stray reply goes to the oldest waiting request.
    third = Batch(2)
    w.expect_many([a, b], third, [0, 1])
    w.answer_many([c], ["C"], in_order=False)
    assert third.results[0] == "C" and len(w) == 1 and w.answer(b, "B2") == 7


async def test_the_journal_listing_counts_filtered_items(tmp_path):
    from pydotcompute.cli.journal_records import flow_records
    from pydotcompute.coordinator.journal_reader import JournalReader

    where = str(tmp_path / "f.db")
    async with RingKernelRuntime(journal=where) as rt:
        await launch_even(rt)
        flow = await rt.deploy(stage(make) >> stage("even", timeout=2) >> stage(unwrap), name="f")
        await flow.submit_many(range(6), keys=[str(i) for i in range(6)])
        await flow.drain(timeout=30)
    with JournalReader(where) as reader:
        [f] = flow_records(reader)
    assert f["items"]["filtered"] == 3 and f["items"]["done"] == 3


async def test_reply_tables_belong_to_their_runtime():
    from pydotcompute.coordinator.kernel_replies import KernelReplyTables

    async with RingKernelRuntime() as rt:
        await launch_even(rt)
        flow = await rt.deploy(stage(make) >> stage("even", timeout=5) >> stage(unwrap), name="f")
        await flow.submit_many(range(4), keys=[str(i) for i in range(4)])
        await flow.drain(timeout=20)
        tables = rt.extension(KernelReplyTables.NAME)
        assert isinstance(tables, KernelReplyTables) and set(tables.by_kernel) == {"even"}
        async with RingKernelRuntime() as other:
            assert other.extension(KernelReplyTables.NAME) is None
    assert tables.by_kernel == {}  # let go at shutdown


# -- a handler that raises on a kernel that restarts ------------------------------------


def keep_even_refuse_three(msg, out, state):  # type: ignore[no-untyped-def]
    if msg.x == 3:
        raise ValueError("three is refused")
    out.x = msg.x
    return msg.x % 2 == 0


async def test_an_item_whose_record_raised_in_a_restarting_cpu_kernel_fails_not_filtered():
    # The record that raised produced no output, but it was not filtered: its item
    # fails with the handler's error (retried, then dead-lettered), the kernel
    # restarts, and the items around it end as they would have.
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "even3",
            keep_even_refuse_three,
            backend="cpu",
            input_type=Num,
            output_type=Num,
            restart="on-failure",
            restart_backoff=0.0,
        )
        await rt.activate("even3")
        flow = await rt.deploy(
            stage(make) >> stage("even3", timeout=10, retries=2, backoff=0.0) >> stage(unwrap),
            name="f",
        )
        await flow.submit_many(range(6), keys=[str(i) for i in range(6)])
        await flow.drain(timeout=30)
        assert flow.status() == {"done": 3, "filtered": 2, "dead": 1}
        assert [await flow.result(k) for k in ("0", "2", "4")] == [0, 2, 4]
        assert flow.items("filtered") == ["1", "5"]
        [rec] = flow.dead_letters()
        assert rec.key == "3" and "three is refused" in rec.error
        assert "QueueTimeoutError" not in rec.error
        assert flow.counters()["retried"] == 1
        # The stage hears of the error before the supervisor's restart is done: wait
        # for the second restart rather than read it at once.
        for _ in range(500):
            tele = rt.get_telemetry("even3")
            if tele.restarts == 2 and tele.state == "ACTIVE":
                break
            await asyncio.sleep(0.01)
        assert (tele.restarts, tele.errors) == (2, 2)  # once per run of item 3
        assert tele.state == "ACTIVE"


async def answers_tenfold_refuses_three(ctx):  # type: ignore[no-untyped-def]
    while True:
        m = await ctx.receive()
        if m.n == 3:
            raise ValueError("three is refused")
        await ctx.send(Answer(n=m.n * 10, correlation_id=m.message_id))


async def test_an_item_whose_message_raised_in_a_restarting_host_actor_fails():
    # Messages with ids go by identity (no order to rely on): the one the actor raised
    # on is told so at once, instead of waiting out the stage's timeout.
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "tenfold", answers_tenfold_refuses_three, restart="on-failure", restart_backoff=0.0
        )
        await rt.activate("tenfold")
        flow = await rt.deploy(
            stage(lambda i: Ask(n=i)) >> stage("tenfold", timeout=30) >> stage(lambda a: a.n),
            name="h",
        )
        await flow.submit_many(range(6), keys=[str(i) for i in range(6)])
        await flow.drain(timeout=20)
        assert flow.status() == {"done": 5, "dead": 1}
        assert [await flow.result(str(i)) for i in (0, 1, 2, 4, 5)] == [0, 10, 20, 40, 50]
        [rec] = flow.dead_letters()
        assert rec.key == "3" and "three is refused" in rec.error
        assert rt.get_telemetry("tenfold").restarts == 1


async def tenfold_refuses_three(ctx):  # type: ignore[no-untyped-def]
    while True:
        n = await ctx.receive()
        if n == 3:
            raise ValueError("three is refused")
        await ctx.send(n * 10)


async def test_an_item_whose_plain_value_raised_in_a_restarting_host_actor_fails():
    # Values without ids go in order (send_and_receive): the same outcome.
    async with RingKernelRuntime() as rt:
        await rt.launch("plain", tenfold_refuses_three, restart="on-failure", restart_backoff=0.0)
        await rt.activate("plain")
        flow = await rt.deploy(stage("plain", timeout=30), name="p")
        await flow.submit_many(range(6), keys=[str(i) for i in range(6)])
        await flow.drain(timeout=20)
        assert flow.status() == {"done": 5, "dead": 1}
        assert [await flow.result(str(i)) for i in (0, 1, 2, 4, 5)] == [0, 10, 20, 40, 50]
        [rec] = flow.dead_letters()
        assert rec.key == "3" and "three is refused" in rec.error


def fails_on_13(msg, out, state):  # type: ignore[no-untyped-def]
    if msg.x == 13:
        raise ValueError("thirteen")
    out.x = msg.x
    return True


async def test_the_record_a_restarting_kernel_raised_on_fails_its_item_not_filters_it():
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "check",
            fails_on_13,
            backend="cpu",
            input_type=Num,
            output_type=Num,
            restart="on-failure",
        )
        await rt.activate("check")
        g = stage(make) >> stage("check", timeout=10, retries=2, backoff=0.01) >> stage(unwrap)
        flow = await rt.deploy(g, name="f")
        await flow.submit_many(range(30), keys=[str(i) for i in range(30)])
        await flow.drain(timeout=60)
        assert flow.status() == {"done": 29, "dead": 1}
        [dead] = flow.dead_letters()
        assert dead.key == "13" and dead.attempts == 2
        assert "ValueError: thirteen" in dead.error and "KernelFailedError" in dead.error
        assert [await flow.result(str(i)) for i in range(30) if i != 13] == [
            i for i in range(30) if i != 13
        ]


async def test_items_a_cpu_kernel_with_two_workers_drops_end_filtered_before_the_timeout():
    """Workers interleave their outputs, so no reply settles another; the kernel says
    when every record it took has its outputs placed, and the burst's dropped records
    end filtered long before the stage's timeout (the drain's own limit is shorter)."""
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "even2", keep_even, backend="cpu", input_type=Num, output_type=Num, workers=2
        )
        await rt.activate("even2")
        graph = stage(make) >> stage("even2", timeout=60) >> stage(unwrap)
        flow = await rt.deploy(graph, name="w2")
        values = [*range(400), 401, 403, 405]  # the burst ends with dropped records
        await flow.submit_many(values, keys=[str(v) for v in values])
        await asyncio.wait_for(flow.drain(), 30)
        evens = [v for v in values if v % 2 == 0]
        assert flow.status() == {"done": len(evens), "filtered": len(values) - len(evens)}
        assert [await flow.result(str(v)) for v in evens] == evens
        assert flow.dead_letters() == [] and flow.counters()["retried"] == 0
        with pytest.raises(ItemFilteredError):
            await flow.result("405")
        await flow.close()


def slow_on_fifties(msg, out, state):  # type: ignore[no-untyped-def]
    """keep_even, with a long computation on multiples of 50 (kept in ``state``, so
    it is not optimized away): their outputs come late."""
    if msg.x % 50 == 0:
        acc = 0
        for i in range(2_000_000):
            acc = (acc * 31 + i) % 1000003
        state[0] = acc
    out.x = msg.x
    return msg.x % 2 == 0


async def test_two_cpu_workers_say_they_are_done_only_once_the_outputs_are_placed():
    """settled_through answers only once every record taken has its outputs in the
    ring: the outputs are there to take, without waiting, the moment it answers."""
    async with RingKernelRuntime() as rt:
        handle = await rt.launch(
            "slow", slow_on_fifties, backend="cpu", input_type=Num, output_type=Num,
            workers=2, state=np.zeros(1), options=CpuOptions(batch=4),
        )  # fmt: skip
        await rt.activate("slow")
        values = list(range(200))
        await rt.send_batch("slow", [Num(x=v) for v in values], 10)
        pos = handle.input_position()
        assert pos == len(values)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (through := handle.settled_through(pos)) is None:
            assert loop.time() < deadline, "the kernel never said it was done"
            await asyncio.sleep(0.001)
        assert through == len(values) // 2  # the kept records' outputs end there
        got = await rt.receive_batch("slow", 1000, 0)
        assert sorted(int(x) for x in got["x"]) == [v for v in values if v % 2 == 0]
        assert handle.outputs_taken() == through


async def test_an_item_whose_output_is_late_is_never_taken_for_filtered():
    """One worker is long on an item while the other finishes the rest of the burst:
    the late item is done, not filtered."""
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "slow2", slow_on_fifties, backend="cpu", input_type=Num, output_type=Num,
            workers=2, state=np.zeros(1), options=CpuOptions(batch=4),
        )  # fmt: skip
        await rt.activate("slow2")
        flow = await rt.deploy(stage(make) >> stage("slow2", timeout=60) >> stage(unwrap), name="l")
        values = list(range(201))
        await flow.submit_many(values, keys=[str(v) for v in values])
        await asyncio.wait_for(flow.drain(), 60)
        evens = [v for v in values if v % 2 == 0]
        assert flow.status() == {"done": len(evens), "filtered": len(values) - len(evens)}
        assert [await flow.result(str(v)) for v in (0, 50, 100, 150, 200)] == [0, 50, 100, 150, 200]
        await flow.close()


async def test_a_dropped_item_ends_filtered_while_a_steady_stream_goes_on():
    """Two workers, and replies never stop coming: the stage still asks the kernel
    whether it is done with the dropped record, and settles it mid-stream."""
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "even4", keep_even, backend="cpu", input_type=Num, output_type=Num, workers=2
        )
        await rt.activate("even4")
        flow = await rt.deploy(stage(make) >> stage("even4", timeout=60) >> stage(unwrap), name="s")
        await flow.submit_many([1], keys=["dropped"])
        sent = 0
        while flow.counters()["filtered"] == 0:
            assert sent < 40_000, "the dropped item was not settled while the stream went on"
            evens = range(2 * sent, 2 * sent + 32, 2)
            await flow.submit_many(evens, keys=[str(v) for v in evens])
            sent += len(evens)
            await asyncio.sleep(0.001)
        await asyncio.wait_for(flow.drain(), 60)
        assert flow.status() == {"done": sent, "filtered": 1}
        assert flow.items("filtered") == ["dropped"]
        await flow.close()


async def test_a_paused_kernel_with_two_workers_is_done_with_what_it_took():
    """A worker paused after an idle poll holds nothing: what the others took and
    answered is settled without waiting for the kernel to be resumed."""
    async with RingKernelRuntime() as rt:
        handle = await rt.launch(
            "even5", keep_even, backend="cpu", input_type=Num, output_type=Num, workers=2
        )
        await rt.activate("even5")
        await rt.send_batch("even5", [Num(x=v) for v in range(40)], 10)
        pos = handle.input_position()
        got: list[int] = []
        while len(got) < 20:
            got.extend(int(x) for x in (await rt.receive_batch("even5", 64, 10))["x"])
        await rt.deactivate("even5")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while handle.settled_through(pos) is None:
            assert loop.time() < deadline, "a paused kernel never said it was done"
            await asyncio.sleep(0.005)
        assert handle.settled_through(pos) == 20 and sorted(got) == list(range(0, 40, 2))


async def test_two_restarting_workers_fail_the_record_that_raised_and_filter_only_the_dropped():
    """A worker raises mid-batch: the rest of its batch waits, carried, for the restart
    (the worker that takes it holds it, paused or not), so none of it is taken for
    dropped; the other worker's batches go on as usual."""
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "even6", keep_even_refuse_three, backend="cpu", input_type=Num, output_type=Num,
            workers=2, restart="on-failure", restart_backoff=0.0, options=CpuOptions(batch=8),
        )  # fmt: skip
        await rt.activate("even6")
        flow = await rt.deploy(
            stage(make) >> stage("even6", timeout=60, retries=2, backoff=0.0) >> stage(unwrap),
            name="r",
        )
        values = list(range(300))
        await flow.submit_many(values, keys=[str(v) for v in values])
        await asyncio.wait_for(flow.drain(), 60)
        evens = [v for v in values if v % 2 == 0]
        assert flow.status() == {"done": len(evens), "filtered": len(evens) - 1, "dead": 1}
        assert [await flow.result(str(v)) for v in evens] == evens
        [rec] = flow.dead_letters()
        assert rec.key == "3" and "three is refused" in rec.error


def refuse_three_slow_on_six(msg, out, state):  # type: ignore[no-untyped-def]
    if msg.x == 3:
        raise ValueError("three is refused")
    if msg.x == 6:  # long: the records carried to the restart are in hand a while
        acc = 0
        for i in range(30_000_000):
            acc = (acc * 31 + i) % 1000003
        state[0] = acc
    out.x = msg.x
    return msg.x % 2 == 0


async def test_records_carried_to_a_restart_are_held_until_their_outputs_are_out():
    """The batch that raised is carried to the restarted worker, which starts paused:
    those records are in its hand until their outputs are published, so an even item
    among them is never taken for dropped while it is being handled."""
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "carry", refuse_three_slow_on_six, backend="cpu", input_type=Num, output_type=Num,
            state=np.zeros(1), restart="on-failure", restart_backoff=0.0,
        )  # fmt: skip
        await rt.activate("carry")
        flow = await rt.deploy(
            stage(make) >> stage("carry", timeout=60, retries=2, backoff=0.0) >> stage(unwrap),
            name="c",
        )
        await flow.submit_many(range(8), keys=[str(i) for i in range(8)])
        await asyncio.wait_for(flow.drain(), 60)
        assert flow.status() == {"done": 4, "filtered": 3, "dead": 1}
        assert [await flow.result(k) for k in ("0", "2", "4", "6")] == [0, 2, 4, 6]
        assert flow.items("filtered") == ["1", "5", "7"]
