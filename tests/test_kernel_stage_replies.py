"""Kernel stages match each reply to its request by identity, never by order.

A compiled handler that returns False produces no output for that record: the item
ends as *filtered* (counted, in the flow's status, not failed and not retried).
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from pydotcompute import RingKernelRuntime, message
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
