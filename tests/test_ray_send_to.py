"""A host actor placed on a Ray actor reaches other kernels with ``ctx.send_to``,
relayed through the driver: in order, exactly once, under backpressure, drained at stop."""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'pydotcompute[ray]')")

from pydotcompute import RingKernelRuntime  # noqa: E402
from pydotcompute.errors import QueueTimeoutError  # noqa: E402
from tests.ray_kernels import doubler, forwards  # noqa: E402


async def _outputs(rt: RingKernelRuntime, kid: str, n: int) -> list[object]:
    return [await rt.receive(kid, timeout=30) for _ in range(n)]


async def test_send_to_between_cluster_kernels_is_relayed_in_order_exactly_once():
    async with RingKernelRuntime(cluster="local") as rt:
        await rt.launch("fwd", forwards, queue_size=8)
        await rt.launch("sink", doubler, queue_size=4)
        await rt.activate("fwd")

        # An id the runtime does not know fails the send_to that names it.
        await rt.send("fwd", ("nowhere", 1))
        error = await rt.receive("fwd", timeout=30)
        assert error[:2] == ("error", "KernelNotFoundError") and "nowhere" in error[2]

        # The sink is not active: its queues fill, then the relay's delivery waits,
        # then the sender's outbox fills and its send_to waits in turn.
        await rt.send("fwd", ("sink", 60))
        with pytest.raises(QueueTimeoutError):
            await rt.receive("fwd", timeout=1.0)
        await rt.activate("sink")
        assert await _outputs(rt, "sink", 60) == [2 * i for i in range(60)]
        assert await rt.receive("fwd", timeout=30) == ("queued", 60)
        with pytest.raises(QueueTimeoutError):
            await rt.receive("sink", timeout=0.5)  # nothing twice

        # What the sender queued before it stopped is delivered at its stop.
        await rt.launch("held", doubler, queue_size=256)
        await rt.send("fwd", ("held", 100))
        assert await rt.receive("fwd", timeout=30) == ("queued", 100)
        await rt.terminate("fwd")
        await rt.activate("held")
        assert await _outputs(rt, "held", 100) == [2 * i for i in range(100)]
        assert rt.get_telemetry("fwd").messages_dropped == 0


async def test_a_delivery_that_fails_later_is_raised_by_the_senders_next_send_to():
    async with RingKernelRuntime(cluster="local") as rt:
        await rt.launch("fwd", forwards, queue_size=8)
        await rt.launch("gone", doubler, queue_size=8)
        await rt.activate("fwd")
        await rt.send("fwd", ("gone", 1))
        assert await rt.receive("fwd", timeout=30) == ("queued", 1)
        await rt.terminate("gone")
        # The target was reached before: this send_to queues and returns; its delivery
        # fails at the driver, and the sender hears of it at a following send_to.
        await rt.send("fwd", ("gone", 1))
        assert await rt.receive("fwd", timeout=30) == ("queued", 1)
        seen: tuple[object, ...] = ()
        for _ in range(20):
            await rt.send("fwd", ("gone", 1))
            seen = await rt.receive("fwd", timeout=30)
            if seen[0] == "error":
                break
        assert seen[0] == "error" and "gone" in str(seen[2])
