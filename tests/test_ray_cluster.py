"""Kernels placed on a two-node Ray cluster: the runtime's API, batches, failures, graphs.

One cluster serves the module (starting Ray nodes costs seconds): two raylets on this
machine, each with one CPU and a custom resource naming it, so a kernel that asks for
``node_a`` or ``node_b`` really lands on that node.
"""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'pydotcompute[ray]')")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pydotcompute import RingKernelRuntime  # noqa: E402
from pydotcompute.coordinator import RetryPolicy, stage  # noqa: E402
from pydotcompute.errors import (  # noqa: E402
    KernelFailedError,
    KernelStateError,
    QueueFullError,
    QueueTimeoutError,
)
from pydotcompute.runtime.lifecycle import KernelState  # noqa: E402
from pydotcompute.telemetry.collector import TelemetryCollector  # noqa: E402
from tests.ray_kernels import (  # noqa: E402
    SEQ,
    Norm,
    Point,
    answers_once,
    breaks_on_13,
    doubler,
    groups,
    half,
    norm,
    plus_one,
)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes; the test process is connected to them as the Ray driver."""
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"node_a": 1}, "include_dashboard": False},
    )
    c.add_node(num_cpus=1, resources={"node_b": 1})
    c.wait_for_nodes()
    ray.init(address=c.address)
    try:
        nodes = {
            name: n["NodeID"]
            for n in ray.nodes()
            for name in ("node_a", "node_b")
            if n["Alive"] and name in n["Resources"]
        }
        yield c.address, nodes
    finally:
        ray.shutdown()
        c.shutdown()


async def wait_for(predicate, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_stages_of_one_graph_run_on_kernels_on_two_nodes(cluster, tmp_path):
    address, nodes = cluster
    async with RingKernelRuntime(cluster=address) as rt:
        await asyncio.gather(
            rt.launch(
                "norm",
                norm,
                backend="cpu",
                input_type=Point,
                output_type=Norm,
                resources={"node_a": 1},
            ),
            rt.launch(
                "half",
                half,
                backend="cpu",
                input_type=Norm,
                output_type=Norm,
                resources={"node_b": 1},
            ),
        )
        assert rt.get_placement("norm").node_id == nodes["node_a"]
        assert rt.get_placement("half").node_id == nodes["node_b"]
        assert rt.get_placement("norm").backend == "cpu"
        for kid in ("norm", "half"):
            await rt.activate(kid)

        def to_point(i: int) -> Point:
            return Point(x=3.0 * i, y=4.0 * i)

        graph = stage(to_point) >> "norm" >> "half" >> (lambda m: m.n)
        flow = await rt.deploy(graph, name="in-memory", journal=None)
        keys = await flow.submit_many(range(60))
        await flow.drain(timeout=60)
        assert [await flow.result(k) for k in keys] == [2.5 * i for i in range(60)]

        durable = await rt.deploy(graph, name="durable", journal=str(tmp_path / "j.db"))
        await durable.submit_many(range(40), keys=[f"k{i}" for i in range(40)])
        await durable.drain(timeout=60)
        assert durable.status() == {"done": 40}
        assert await durable.result("k7") == 17.5

        tele = rt.get_all_telemetry()
        assert tele["norm"].messages_processed == 100 == tele["half"].messages_processed
        assert tele["norm"].backend == "cpu" and tele["norm"].state == "ACTIVE"
        registry = CollectorRegistry()
        registry.register(TelemetryCollector(rt))
        text = generate_latest(registry).decode()
        assert "pydotcompute_kernel_messages_processed_total{" in text
        assert 'kernel="half"' in text and 'kernel="norm"' in text


async def test_pipeline_stages_on_two_nodes_move_items_in_batches(cluster, tmp_path):
    """Each stage's one worker sends the items it took together, in one Ray call, and
    gets the replies in batch fetches: its kernel sees them arrive together."""
    address, _ = cluster
    async with RingKernelRuntime(cluster=address) as rt:
        for kid, node in (("a", "node_a"), ("b", "node_b")):
            await rt.launch(kid, groups, resources={node: 1})
            await rt.activate(kid)
        graph = stage("a") >> stage("b")
        for name, journal in (("mem", None), ("disk", str(tmp_path / "b.db"))):
            flow = await rt.deploy(graph, name=name, journal=journal)
            await flow.submit_many([(i, []) for i in range(64)], keys=[str(i) for i in range(64)])
            await flow.drain(timeout=60)
            outs = [await flow.result(str(i)) for i in range(64)]
            assert [x for x, _ in outs] == [100 * i for i in range(64)]
            for at in (0, 1):  # one at a time, every group would be of one
                assert max(sizes[at] for _, sizes in outs) > 8, (name, outs)


async def test_single_messages_and_batches_keep_their_order(cluster):
    address, _ = cluster
    async with RingKernelRuntime(cluster=address) as rt:
        await rt.launch(
            "inc",
            plus_one,
            backend="cpu",
            input_type=SEQ,
            output_type=SEQ,
            state=np.zeros(1),
            queue_size=1024,
        )
        await rt.activate("inc")
        # Single sends are coalesced into batches; arrays go as they are; the order of
        # everything one caller sends is kept. 14 800 records through 1024-record rings:
        # the receiver drains while the sender waits for room.
        total = 4 * (700 + 3000)
        got: list[int] = []

        async def drain() -> None:
            turn = 0
            while len(got) < total:
                turn += 1
                if turn % 5 == 0:
                    # Receivers that give up leave what their fetch brought for the next.
                    try:
                        one = await asyncio.wait_for(rt.receive("inc"), 0.0005)
                        got.append(int(one["seq"]))
                    except (QueueTimeoutError, asyncio.TimeoutError):
                        pass
                elif turn % 5 == 1:
                    try:
                        got.append(int((await rt.receive("inc", timeout=0.0005))["seq"]))
                    except QueueTimeoutError:
                        pass
                elif len(got) % 2:
                    got.append(int((await rt.receive("inc", timeout=10))["seq"]))
                else:
                    out = await rt.receive_batch("inc", 5000, timeout=10)
                    got.extend(out["seq"].tolist())

        receiver = asyncio.create_task(drain())
        seq = 0
        for _ in range(4):
            for _ in range(700):
                rec = np.zeros(1, SEQ)
                rec["seq"] = seq
                rec["value"] = seq
                await rt.send("inc", rec[0])
                seq += 1
            batch = np.zeros(3000, SEQ)
            batch["seq"] = np.arange(seq, seq + 3000)
            batch["value"] = batch["seq"]
            assert await rt.send_batch("inc", batch) == 3000
            seq += 3000
        await asyncio.wait_for(receiver, 30)
        assert got == list(range(seq))
        assert rt.read_state("inc")[0] == seq
        with pytest.raises(QueueTimeoutError):
            await rt.receive("inc", timeout=0.05)

        # Deactivated, inputs wait on the actor; reactivated, they are processed.
        await rt.deactivate("inc")
        batch = np.zeros(10, SEQ)
        batch["value"] = np.arange(10)
        await rt.send_batch("inc", batch)
        with pytest.raises(QueueTimeoutError):
            await rt.receive_batch("inc", 10, timeout=0.3)
        assert rt.get_telemetry("inc").queue_depth == 10
        await rt.reactivate("inc")
        out = await rt.receive_batch("inc", 10, timeout=10)
        assert out["value"].tolist() == [float(v + 1) for v in range(10)]

        # Outputs produced before terminate stay readable after it.
        await rt.send_batch("inc", batch)
        await wait_for(lambda: rt.get_telemetry("inc").output_queue_depth == 10)
        await rt.terminate("inc")
        assert rt.get_state("inc") is KernelState.TERMINATED
        assert len(await rt.receive_batch("inc", 100, timeout=1)) == 10
        assert rt.get_telemetry("inc").messages_processed == seq + 20
        assert rt.read_state("inc")[0] == seq + 20
        with pytest.raises(KernelStateError):
            await rt.send("inc", batch[0])


async def test_a_dead_actor_or_a_crashed_actor_fails_its_kernel(cluster):
    address, _ = cluster
    async with RingKernelRuntime(cluster=address) as rt:
        await asyncio.gather(rt.launch("double", doubler), rt.launch("brittle", breaks_on_13))
        for kid in ("double", "brittle"):
            await rt.activate(kid)
        assert rt.get_placement("double").backend == "host"
        assert await rt.send_and_receive("double", 21, timeout=10) == 42
        await rt.send_batch("double", [1, 2, 3])
        assert await rt.receive_batch("double", 3, timeout=10) == [2, 4, 6]

        # The actor's process dies: the kernel fails with Ray's error as the cause.
        os.kill(rt.get_placement("double").pid, signal.SIGKILL)
        await wait_for(lambda: rt.get_state("double") is KernelState.FAILED)
        assert isinstance(rt.get_error("double"), ray.exceptions.RayActorError)
        with pytest.raises(KernelFailedError) as info:
            await rt.send("double", 1)
        assert isinstance(info.value.__cause__, ray.exceptions.RayActorError)

        # The kernel's own loop crashes on its actor: the cause is the actor's exception.
        await rt.send("brittle", 13)
        await wait_for(lambda: rt.get_state("brittle") is KernelState.FAILED)
        assert isinstance(rt.get_error("brittle"), ZeroDivisionError)
        with pytest.raises(KernelFailedError) as info:
            await rt.receive("brittle", timeout=1)
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        assert rt.get_telemetry("brittle").errors >= 1
        await rt.terminate("brittle")  # releases the actor; the kernel stays FAILED
        assert rt.get_state("brittle") is KernelState.FAILED

        # A failed kernel can be launched again (a new actor).
        await rt.launch("brittle", breaks_on_13)
        await rt.activate("brittle")
        assert await rt.send_and_receive("brittle", 5, timeout=10) == 5
        assert rt.get_telemetry("brittle").restarts == 1


async def test_reject_and_an_actor_that_returns(cluster):
    address, _ = cluster
    async with RingKernelRuntime(cluster=address) as rt:
        await asyncio.gather(
            rt.launch("strict", doubler, queue_size=2, backpressure="reject"),
            rt.launch("once", answers_once),
            rt.launch("slow", doubler, queue_size=2),
        )
        # BLOCK: two inputs wait on the actor, two in the runtime; the fifth send
        # finds no room within its timeout.
        for i in range(4):
            await rt.send("slow", i)
        with pytest.raises(QueueFullError):
            await rt.send("slow", 4, timeout=0.2)
        tele = rt.get_telemetry("slow")
        assert (tele.queue_depth, tele.messages_rejected) == (4, 1)
        await rt.activate("slow")
        assert [await rt.receive("slow", timeout=10) for _ in range(4)] == [0, 2, 4, 6]

        await rt.send("strict", 1)  # LAUNCHED, not active: inputs wait in its queue
        await rt.send("strict", 2)
        with pytest.raises(QueueFullError):
            await rt.send("strict", 3)
        await rt.activate("strict")
        assert await rt.receive_batch("strict", 5, timeout=10) == [2, 4]
        assert rt.get_telemetry("strict").messages_rejected == 1

        await rt.activate("once")
        await rt.send("once", 1)
        await wait_for(lambda: rt.get_state("once") is KernelState.TERMINATED)
        assert await rt.receive("once", timeout=5) == 2


async def test_a_flow_goes_on_when_its_kernel_is_launched_again_after_its_actor_died(cluster):
    address, _ = cluster
    async with RingKernelRuntime(cluster=address) as rt:
        await rt.launch("double", doubler)
        await rt.activate("double")
        retry = RetryPolicy(attempts=100, backoff=0.02, max_backoff=0.1)
        flow = await rt.deploy(stage("double", retries=retry, timeout=5), name="f", journal=None)
        first = await flow.submit_many(range(10))
        assert [await flow.result(k, timeout=20) for k in first] == [2 * i for i in range(10)]

        os.kill(rt.get_placement("double").pid, signal.SIGKILL)
        await wait_for(lambda: rt.get_state("double") is KernelState.FAILED)
        later = await flow.submit_many(range(10, 20))  # they fail and wait for a retry
        await asyncio.sleep(0.3)
        await rt.launch("double", doubler)
        await rt.activate("double")
        await flow.drain(timeout=30)
        assert [await flow.result(k) for k in later] == [2 * i for i in range(10, 20)]
        assert flow.dead_letters() == []
