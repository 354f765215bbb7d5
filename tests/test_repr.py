"""repr() of the runtime, a flow, telemetry and the servers: short, with state and counts."""

from __future__ import annotations

import asyncio

from pydotcompute import RingKernelRuntime
from pydotcompute.coordinator import deploy, stage
from pydotcompute.coordinator.journal_reader import JournalReader
from pydotcompute.telemetry.history import MetricsHistory
from pydotcompute.telemetry.server import serve_metrics
from pydotcompute.telemetry.snapshot import KernelTelemetry


async def echo(ctx):
    while not ctx.should_terminate:
        await ctx.send(await ctx.receive())


async def test_runtime_and_flow(tmp_path) -> None:
    async with RingKernelRuntime(journal=str(tmp_path / "j.db")) as rt:
        await rt.launch("a", echo)
        await rt.activate("a")
        await rt.launch("b", echo)
        flow = await rt.deploy(stage(lambda x: x + 1, name="inc"), name="etl")
        await flow.submit_many(range(3))
        await flow.drain(timeout=10)
        text = repr(rt)
        assert text.startswith("<RingKernelRuntime") and len(text) < 200
        assert "kernels: 1 active, 1 launched" in text and "flows: 1" in text
        assert "j.db" in text
        f = repr(flow)
        assert f.startswith("<Flow 'etl' running") and "completed 3" in f and "j.db" in f
        assert repr(rt.get_telemetry("a")).startswith(
            "KernelTelemetry('a' host ACTIVE, processed=0"
        )
    assert "shut down" in repr(rt)
    assert "closed" in repr(flow)


async def test_in_memory_flow() -> None:
    async with await deploy(None, stage(lambda x: x), name="mem") as flow:
        await flow.submit(1)
        await flow.drain(timeout=10)
        assert repr(flow) == (
            "<Flow 'mem' running, in memory: submitted 1, completed 1, dead 0, in flight 0>"
        )


def test_telemetry_shows_counts_not_buckets() -> None:
    t = KernelTelemetry(
        "echo",
        "cpu",
        "active",
        messages_processed=12_000,
        queue_depth=3,
        queue_capacity=1024,
        messages_dropped=2,
        throughput=5000.0,
        latency_p50_us=1.5,
        latency_p99_us=9.25,
        latency_buckets=(1,) * 26,
    )
    text = repr(t)
    assert text == (
        "KernelTelemetry('echo' cpu active, processed=12000, queue=3/1024, dropped=2, "
        "5,000 msg/s, p50=1.5µs, p99=9.2µs)"
    )


def test_server_history_and_reader(tmp_path) -> None:
    with serve_metrics(_Empty(), port=0, gpu=False, actions=True) as server:
        assert repr(server) == f"<MetricsServer {server.dashboard_url} running, actions on>"
    assert "stopped" in repr(server)
    assert (
        repr(MetricsHistory(size=10, interval=0.5)) == "<MetricsHistory 0/10 samples every 0.5 s>"
    )

    async def make() -> None:
        async with await deploy(None, stage(lambda x: x), name="f", journal=str(tmp_path / "j.db")):
            pass

    asyncio.run(make())
    with JournalReader(str(tmp_path / "j.db")) as reader:
        assert repr(reader) == f"<JournalReader {tmp_path / 'j.db'}>"


class _Empty:
    def get_all_telemetry(self):
        return {}
