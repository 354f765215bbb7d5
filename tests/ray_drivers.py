"""Ray drivers run as child processes by test_ray_nodes.py against a two-node cluster.

``python ray_drivers.py placement|client|send_to ADDRESS`` prints one JSON object with what it
saw. Each runs in a process of its own because a Ray driver's connection (and its
authentication token) belongs to the process. The kernels are defined here, in the
script, so Ray ships them by value: the nodes need not import the tests.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import numpy as np

from pydotcompute import RingKernelRuntime

RECORD = np.dtype([("seq", np.int64), ("value", np.float64)])


def double(msg, out, state):  # type: ignore[no-untyped-def]
    out.seq = msg.seq
    out.value = msg.value * 2.0
    return True


async def forwards(ctx):  # type: ignore[no-untyped-def]
    """Takes ``(target, n)``: sends ``0 .. n-1`` to ``target`` with ``send_to``, then
    answers ``n``."""
    while not ctx.should_terminate:
        target, n = await ctx.receive()
        for i in range(n):
            await ctx.send_to(target, i)
        await ctx.send(n)


async def collects(ctx):  # type: ignore[no-untyped-def]
    while not ctx.should_terminate:
        await ctx.send(await ctx.receive())


async def launch(rt: RingKernelRuntime, kid: str, **options: Any) -> None:
    await rt.launch(kid, double, backend="cpu", input_type=RECORD, output_type=RECORD, **options)


async def failed_launch(rt: RingKernelRuntime, kid: str, **options: Any) -> dict[str, Any]:
    """Launch ``kid`` expecting a failure; what it failed with and how long it took."""
    t0 = time.monotonic()
    try:
        # Bounded from outside too: a launch that hangs fails the test, not the suite.
        await asyncio.wait_for(launch(rt, kid, **options), 60)
    except asyncio.TimeoutError:
        return {"hung": True, "waited": time.monotonic() - t0}
    except Exception as exc:
        cause = exc.__cause__
        return {
            "waited": time.monotonic() - t0,
            "error": type(exc).__name__,
            "cause": type(cause).__name__,
            "text": str(cause),
            "state": rt.get_kernel_state(kid).name,
        }
    return {"launched": True, "waited": time.monotonic() - t0}


async def round_trip(rt: RingKernelRuntime, kid: str, n: int = 1000) -> float:
    await rt.activate(kid)
    batch = np.zeros(n, RECORD)
    batch["seq"] = np.arange(n)
    batch["value"] = 1.5
    await rt.send_batch(kid, batch)
    got = 0
    total = 0.0
    while got < n:
        out = await rt.receive_batch(kid, n, timeout=30)
        got += len(out)
        total += float(out["value"].sum())
    return total


async def placement(address: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with RingKernelRuntime(cluster=address) as rt:
        await launch(rt, "b1", resources={"node_b": 1})
        node_b = rt.get_placement("b1").node_id
        # Whole units: node_b's one unit is b1's, so b2 waits its launch_timeout.
        seen["whole"] = await failed_launch(rt, "b2", resources={"node_b": 1}, launch_timeout=3)
        # Nothing of b2 was left waiting: once b1 is gone, the unit goes to b3 at once.
        await rt.terminate("b1")
        t0 = time.monotonic()
        await launch(rt, "b3", resources={"node_b": 1}, launch_timeout=30)
        seen["next"] = {
            "waited": time.monotonic() - t0,
            "same_node": rt.get_placement("b3").node_id == node_b,
            "sum": await round_trip(rt, "b3"),
        }
        # Fractions: two halves fit, the third waits, then fails the same way.
        await launch(rt, "f1", resources={"node_a": 0.5})
        await launch(rt, "f2", resources={"node_a": 0.5})
        seen["fraction"] = await failed_launch(
            rt, "f3", resources={"node_a": 0.5}, launch_timeout=2
        )
        # More than any node offers still fails at once.
        seen["never"] = await failed_launch(rt, "big", resources={"node_b": 5})
    return seen


async def client(address: str) -> dict[str, Any]:
    try:
        import grpc  # noqa: F401 - what ray:// needs (Ray's "client" extra)
    except ImportError:
        return {"skip": "grpcio is missing: Ray Client needs pip install 'ray[client]'"}
    async with RingKernelRuntime(cluster=address) as rt:
        await launch(rt, "a", resources={"node_a": 1})
        await launch(rt, "b", resources={"node_b": 1})
        return {
            "nodes": len({rt.get_placement(k).node_id for k in ("a", "b")}),
            "sums": [await round_trip(rt, k) for k in ("a", "b")],
        }


async def send_to(address: str) -> dict[str, Any]:
    """A host actor on node_b sends to one on node_a through the driver."""
    async with RingKernelRuntime(cluster=address) as rt:
        await rt.launch("to_a", collects, resources={"node_a": 0.5}, queue_size=16)
        await rt.launch("from_b", forwards, resources={"node_b": 0.5}, queue_size=16)
        for kid in ("to_a", "from_b"):
            await rt.activate(kid)
        await rt.send("from_b", ("to_a", 500))
        got = [await rt.receive("to_a", timeout=60) for _ in range(500)]
        done = await rt.receive("from_b", timeout=60)
        try:
            extra = await rt.receive("to_a", timeout=0.5)
        except Exception as exc:  # noqa: BLE001 - a timeout is what should come
            extra = type(exc).__name__
        return {
            "nodes": len({rt.get_placement(k).node_id for k in ("to_a", "from_b")}),
            "in_order": got == list(range(500)),
            "done": done,
            "extra": extra,
        }


if __name__ == "__main__":
    what, address = sys.argv[1], sys.argv[2]
    result = asyncio.run(
        {"placement": placement, "client": client, "send_to": send_to}[what](address)
    )
    print(json.dumps(result), flush=True)
