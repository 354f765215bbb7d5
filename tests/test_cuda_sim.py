"""The ``cuda`` backend's device code under numba-cuda's simulator.

numba-cuda picks the simulator when it is first imported, so these tests run in a
child process started with ``NUMBA_ENABLE_CUDASIM=1`` (``test_simulator_suite``);
in the parent process the others are skipped. Sizes are tiny: the simulator runs
every device thread as a Python thread.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from tests.simulator_child import SIM, parent, run_simulator_half, sim


@parent
def test_simulator_suite() -> None:
    out = run_simulator_half(__file__, "not test_simulator_suite", timeout=110)
    assert "skipped" not in out.splitlines()[-1]


if SIM:
    from numba import cuda

    from pydotcompute.backends.cuda import MappedControl, MappedRing
    from pydotcompute.backends.cuda_loop import ControlWords as W
    from pydotcompute.backends.cuda_loop import SideWords as S
    from pydotcompute.backends.cuda_loop import compile_loop
    from pydotcompute.rings.backpressure import BackpressureStrategy as B
    from pydotcompute.rings.device import seal_words
    from pydotcompute.rings.host_ops import ring_seal
    from pydotcompute.rings.layout import RingSide

    # 12-byte input records: a slot is the tag and 16 bytes.
    IN = np.dtype([("id", "<u4"), ("x", "<f4"), ("y", "<f4")])
    OUT = np.dtype([("id", "<u4"), ("s", "<f8")], align=True)

    def add_fields(msg, out, state):  # type: ignore[no-untyped-def]
        """Emits id and x + y for ids not divisible by 3; counts emitted in state[0]."""
        if msg.id % 3 == 0:
            return False
        out.id = msg.id
        out.s = msg.x + msg.y
        state[0] += 1.0
        return True

    def records(ids: range | list[int]) -> np.ndarray:
        r = np.zeros(len(ids), IN)
        r["id"] = list(ids)
        r["x"] = 0.5
        r["y"] = np.asarray(list(ids), np.float32)
        return r

    class Rig:
        """Mapped rings, control block and device words for one bounded launch."""

        def __init__(
            self,
            in_cap: int = 8,
            out_cap: int = 16,
            threads: int = 4,
            items: int = 2,
            in_bp: B = B.BLOCK,
            out_bp: B = B.BLOCK,
            handler=add_fields,  # type: ignore[no-untyped-def]
        ) -> None:
            self.inp = MappedRing(in_cap, IN, in_bp, RingSide.HOST, RingSide.DEVICE)
            self.out = MappedRing(out_cap, OUT, out_bp, RingSide.DEVICE, RingSide.HOST)
            self.ctl = MappedControl()
            self.threads = threads
            self.state = cuda.to_device(np.zeros(2))
            self.side = cuda.to_device(S.initial(self.inp.host, self.out.host, W.INACTIVE))
            self.kernel = compile_loop(handler, IN, OUT, np.zeros(2), threads, items, 1000)

        def run(
            self,
            iterations: int,
            command: int = W.ACTIVE,
            threads: int | None = None,
            blocks: int = 1,
        ) -> None:
            self.ctl.set_state(command)
            self.kernel[blocks, threads or self.threads](
                self.inp.words, self.out.words, self.ctl.device, self.side, self.state, iterations
            )

        def expected(self, ids: list[int]) -> list[tuple[int, float]]:
            return [(i, 0.5 + i) for i in ids if i % 3]

        def outputs(self) -> list[tuple[int, float]]:
            got = self.out.host.pop_batch(1024)
            return [(int(r["id"]), float(r["s"])) for r in got]

    # -- the device's seal against the host's ------------------------------------------

    @cuda.jit
    def device_seals(words, rs, first, out):  # type: ignore[no-untyped-def]
        i = cuda.threadIdx.x
        if i < out.shape[0]:
            out[i] = seal_words(words, i * 8, rs, first + i)

    @sim
    def test_the_device_seal_is_the_hosts() -> None:
        rng = np.random.default_rng(2)
        words = rng.integers(-(1 << 62), 1 << 62, 4 * 8, dtype=np.int64)
        for rs in (1, 8, 12, 20, 64):
            out = cuda.to_device(np.zeros(4, np.int64))
            device_seals[1, 4](cuda.to_device(words), rs, 1 << 40, out)
            host = [
                int(ring_seal(words.view(np.uint8), 64 * i, rs, (1 << 40) + i)) for i in range(4)
            ]
            assert list(out.copy_to_host()) == host

    # -- the persistent loop, bounded ------------------------------------------------

    @sim
    def test_loop_keeps_fifo_order_across_batches_and_wraps() -> None:
        rig = Rig(in_cap=8, out_cap=16, threads=4)
        ids = list(range(8))
        rig.inp.host.push_batch(records(ids))
        rig.run(3)  # two claims of 4, one idle poll
        more = list(range(8, 14))
        rig.inp.host.push_batch(records(more))
        rig.run(3)
        assert rig.outputs() == rig.expected(ids + more)
        assert rig.state.copy_to_host()[0] == len(rig.expected(ids + more))
        assert rig.ctl[W.PROCESSED] == 14
        assert rig.ctl[W.EMITTED] == len(rig.expected(ids + more))
        assert rig.ctl[W.IDLE_POLLS] >= 2 and rig.ctl[W.HEARTBEAT] >= 3
        assert rig.ctl[W.ERROR_CODE] == 0
        assert rig.inp.host.counters().dequeued == 14

    @sim
    def test_blocks_share_one_input_ring_through_the_device_claim_counter() -> None:
        # The simulator runs blocks one after another: block 0 takes two rounds of
        # 8 records, block 1 the rest; the last block out mirrors the counters.
        rig = Rig(in_cap=32, out_cap=32, threads=4, items=2)
        ids = list(range(20))
        rig.inp.host.push_batch(records(ids))
        rig.run(2, blocks=2)
        assert rig.outputs() == rig.expected(ids)
        assert rig.side.copy_to_host()[S.EXITED] == 2
        assert rig.ctl[W.PROCESSED] == 20 and rig.inp.host.counters().released == 20

    @sim
    def test_one_warp_of_one_block_reads_host_memory(monkeypatch) -> None:  # type: ignore[no-untyped-def]
        """Blocks other than the agent get work through device memory; in the agent,
        only warp 0 reads the mapped rings and control block. A single record is
        handled from the agent's poll: no second read of host memory."""
        from pydotcompute.backends import cuda_loop

        readers: list[tuple[int, int]] = []

        def recording(load):  # type: ignore[no-untyped-def]
            def wrapped(words, i):  # type: ignore[no-untyped-def]
                t = threading.current_thread()
                readers.append((t.blockIdx.x, t.threadIdx.x))
                return load(words, i)

            return wrapped

        for name in ("load_relaxed_sys", "load_acquire_sys"):
            monkeypatch.setattr(cuda_loop, name, recording(getattr(cuda_loop, name)))
        rig = Rig(threads=64, items=1)
        rig.inp.host.push_batch(records([4]))
        rig.run(3, blocks=2)
        assert rig.outputs() == rig.expected([4])
        assert max(t for b, t in readers if b == 0) < 32  # warp 0 of the agent
        # Block 1's leader reads the rings' strategies once, at start, and that is all:
        # as many reads in 3 rounds as in 9.
        first = [t for b, t in readers if b == 1]
        assert set(first) == {0}
        readers.clear()
        rig.run(9, blocks=2)
        assert [t for b, t in readers if b == 1] == first
        assert max(t for b, t in readers if b == 0) < 32

    @sim
    def test_the_loop_between_cxx_producer_and_cxx_consumer(tmp_path) -> None:  # type: ignore[no-untyped-def]
        """kernels/ring.cuh, built for the host, plays the host's side of both rings
        (tags, released_seen, seals checked); the numba-cuda loop the device's."""
        import ctypes
        import subprocess

        import test_kernels_cxx_ring as cxx

        from pydotcompute.backends.kernel_sources import kernels_dir

        compiler = cxx._compiler()
        if compiler is None:
            pytest.skip("no C++20 compiler")
        lib_path = tmp_path / "libpdcring.so"
        build = subprocess.run(
            [compiler, "-std=c++20", "-O2", "-shared", "-fPIC",
             str(kernels_dir() / "ring_host.cpp"), "-o", str(lib_path)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert build.returncode == 0, build.stderr
        lib = cxx._bind(ctypes.CDLL(str(lib_path)))
        rig = Rig(in_cap=8, out_cap=8, threads=4, items=2)
        producer = cxx.CxxParty(lib, rig.inp.host.buffer, IN)
        consumer = cxx.CxxParty(lib, rig.out.host.buffer, OUT)
        sent, got = 0, []
        for batch in (5, 3, 8, 7):  # wraps around both rings
            assert producer.try_push(records(range(sent, sent + batch))) == batch
            sent += batch
            rig.run(3)
            got += [(int(r["id"]), float(r["s"])) for r in consumer.pop(16)]
        assert got == rig.expected(list(range(sent)))
        c = rig.out.host.counters()
        assert (c.enqueued, c.dequeued, c.released) == (len(got), len(got), len(got))
        assert rig.inp.host.counters().released == sent

    @sim
    def test_running_loop_answers_messages_sent_one_at_a_time() -> None:
        # Idle rounds between messages: a thread slow to read a round's orders must
        # not see the next round's (every thread reads, then the block syncs).
        rig = Rig(threads=4)
        worker = threading.Thread(target=rig.run, args=(0,))  # unbounded, as on a GPU
        worker.start()
        try:
            for i in (1, 2, 4, 5, 7):
                rig.inp.host.push_batch(records([i]))
                deadline = time.monotonic() + 10
                got: list[tuple[int, float]] = []
                while not got and time.monotonic() < deadline:
                    time.sleep(0.005)
                    got = rig.outputs()
                assert got == rig.expected([i])
        finally:
            rig.ctl.set_state(W.TERMINATE)
            worker.join(20)
        assert not worker.is_alive()

    @sim
    def test_paused_loop_leaves_records_queued() -> None:
        rig = Rig()
        rig.inp.host.push_batch(records(range(5)))
        rig.run(3, command=W.INACTIVE)
        assert rig.inp.host.depth == 5 and rig.ctl[W.PROCESSED] == 0
        assert rig.ctl[W.IDLE_POLLS] == 0  # paused polls are not idle polls
        rig.run(3)
        assert rig.outputs() == rig.expected(list(range(5)))

    @sim
    def test_terminate_exits_before_taking_anything() -> None:
        rig = Rig()
        rig.inp.host.push_batch(records(range(3)))
        rig.run(100, command=W.TERMINATE)
        assert rig.inp.host.depth == 3 and rig.ctl[W.HEARTBEAT] == 1  # one round, then out

    @sim
    def test_full_output_ring_drops_newest_and_counts() -> None:
        rig = Rig(out_cap=2, out_bp=B.DROP_NEWEST)
        rig.inp.host.push_batch(records([1, 2, 4, 5]))
        rig.run(2)
        assert rig.outputs() == [(1, 1.5), (2, 2.5)]
        assert rig.out.host.counters().dropped_newest == 2
        assert rig.ctl[W.PROCESSED] == 4 and rig.ctl[W.EMITTED] == 2

    @sim
    def test_blocked_output_gives_up_on_terminate_and_counts_drops() -> None:
        rig = Rig(out_cap=2)
        rig.inp.host.push_batch(records([1, 2, 4, 5]))
        worker = threading.Thread(target=rig.run, args=(0,))  # unbounded, as on a GPU
        worker.start()
        deadline = time.monotonic() + 20
        while rig.out.host.depth < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # the loop now waits for room in the output ring
        rig.ctl.set_state(W.TERMINATE)
        worker.join(20)
        assert not worker.is_alive()
        assert rig.ctl[W.DROPPED] == 2 and rig.ctl[W.PROCESSED] == 4
        assert rig.inp.host.counters().released == 4

    @sim
    def test_paused_loop_still_discards_stale_input() -> None:
        rig = Rig(in_cap=4, in_bp=B.DROP_OLDEST)
        rig.inp.host.try_push_batch(records(range(4)))
        rig.inp.host.try_push_batch(records([4]))  # raises drop_before to 1
        rig.run(2, command=W.INACTIVE)
        c = rig.inp.host.counters()
        assert (c.dropped_oldest, c.released, rig.ctl[W.PROCESSED]) == (1, 1, 0)

    @sim
    def test_bad_ring_header_sets_the_error_code() -> None:
        rig = Rig()
        rig.inp.host.buffer[0] ^= 0xFF  # break the magic
        rig.run(5)
        assert rig.ctl[W.ERROR_CODE] == W.ERR_INPUT_RING + 1
        assert rig.ctl[W.HEARTBEAT] == 0

    @sim
    def test_a_record_that_never_matches_its_tag_stops_the_loop(monkeypatch) -> None:  # type: ignore[no-untyped-def]
        # Below `published` a record must seal when read; one that never does means
        # a producer that does not follow the protocol: no handler sees it.
        from pydotcompute.backends import cuda_loop

        monkeypatch.setattr(cuda_loop, "_SEAL_RETRIES", 3)
        rig = Rig()
        rig.inp.host.push_batch(records([1]))
        rig.inp.host.buffer[1024 + 8] ^= 0xFF  # its bytes change after its tag
        rig.run(10)
        assert rig.ctl[W.ERROR_CODE] == cuda_loop.ERR_INPUT_SEAL
        assert "tag" in cuda_loop.ERROR_TEXT[cuda_loop.ERR_INPUT_SEAL]
        assert rig.outputs() == [] and rig.state.copy_to_host()[0] == 0

    @sim
    def test_block_size_other_than_compiled_is_refused() -> None:
        rig = Rig(threads=4)
        rig.run(5, threads=2)
        assert rig.ctl[W.ERROR_CODE] == W.ERR_BLOCK_SIZE

    # -- through the runtime ---------------------------------------------------------

    def count_and_scale(msg, out, state):  # type: ignore[no-untyped-def]
        out.id = msg.id
        out.s = msg.x * 2.0
        state[0] += msg.x
        return True

    def out_of_bounds(msg, out, state):  # type: ignore[no-untyped-def]
        state[7] = 1.0  # state has one element: IndexError in the simulator
        return True

    async def _wait_for(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, "condition not reached"
            await asyncio.sleep(0.01)

    @sim
    async def test_runtime_runs_a_cuda_kernel_end_to_end() -> None:
        from pydotcompute.runtime.lifecycle import KernelState
        from pydotcompute.runtime.runtime import RingKernelRuntime

        async with RingKernelRuntime(backend="cuda") as rt:
            await rt.launch(
                "scale",
                count_and_scale,
                backend="cuda",
                input_type=IN,
                output_type=OUT,
                queue_size=8,
                state=np.zeros(1),
                extra={"threads": 1},
            )
            assert rt.get_state("scale") is KernelState.LAUNCHED
            await rt.activate("scale")
            recs = records(range(10))
            assert await rt.send_batch("scale", recs, timeout=10) == 10
            got: list[np.ndarray] = []
            while sum(len(g) for g in got) < 10:
                got.append(await rt.receive_batch("scale", 10, timeout=10))
            out = np.concatenate(got)
            assert list(out["id"]) == list(range(10))  # FIFO
            assert list(out["s"]) == [1.0] * 10
            await _wait_for(lambda: rt.read_state("scale")[0] == 5.0)
            # counters reach the host when the kernel mirrors them (about every 1 ms)
            await _wait_for(lambda: rt.get_telemetry("scale").messages_processed == 10)
            tele = rt.get_telemetry("scale")
            assert tele.backend == "cuda" and tele.messages_processed == 10
            await rt.deactivate("scale")
            await rt.terminate("scale")
            assert rt.get_state("scale") is KernelState.TERMINATED
            loop = rt._kernels["scale"].kernel_backend
            assert loop._kernel_done()  # the loop has left the simulated device

    @sim
    async def test_a_sleeping_receiver_is_woken_by_the_output_watcher() -> None:
        # The device cannot write the event loop's descriptor: a watcher thread polls
        # the output ring while a receiver sleeps, and goes away with the kernel.
        from pydotcompute.rings.wake import ARMED
        from pydotcompute.runtime.runtime import RingKernelRuntime

        async with RingKernelRuntime() as rt:
            await rt.launch("w", count_and_scale, backend="cuda", input_type=IN,
                            output_type=OUT, queue_size=8, extra={"threads": 1})  # fmt: skip
            loop = rt._kernels["w"].kernel_backend
            waiting = asyncio.ensure_future(rt.receive_batch("w", 4, timeout=20))
            await _wait_for(lambda: loop._wakeup.words[ARMED] == 1)  # asleep
            await rt.send_batch("w", records([7]), timeout=10)
            await rt.activate("w")
            got = await asyncio.wait_for(waiting, 20)
            assert list(got["id"]) == [7]
            name = loop._watcher._thread.name
            assert any(t.name == name for t in threading.enumerate())
            await rt.terminate("w")
            assert not any(t.name == name for t in threading.enumerate())

    @sim
    async def test_a_kernel_asked_to_stop_is_not_reported_as_failed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
        from pydotcompute.backends import cuda as cuda_backend
        from pydotcompute.backends.config import RingKernelConfig
        from pydotcompute.backends.cuda import CudaKernelBackend

        # The monitor polls on every event-loop turn, so it sees the kernel exit
        # before stop() does.
        monkeypatch.setattr(cuda_backend, "_MONITOR_PERIOD_S", 0)
        failures: list[BaseException] = []
        config = RingKernelConfig(queue_size=4, backend="cuda", extra={"threads": 1})
        for _ in range(3):
            loop = CudaKernelBackend("k", count_and_scale, config, IN, OUT, failures.append)
            await loop.start()
            loop.set_active(True)
            await asyncio.sleep(0.02)  # the monitor is polling
            await loop.stop(10.0)
            assert loop._kernel_done()  # the loop has left the simulated device
        assert failures == []

    @sim
    async def test_simulated_kernels_take_turns() -> None:
        # The simulator runs one launch at a time; resident kernels take turns there,
        # so two of them (and a third launched meanwhile) all answer.
        from pydotcompute.backends.cuda_simulated import SimulatedDevice
        from pydotcompute.runtime.runtime import RingKernelRuntime

        async with RingKernelRuntime() as rt:
            opts = dict(backend="cuda", input_type=IN, output_type=OUT, queue_size=8)
            for kid in ("first", "second"):
                await rt.launch(kid, count_and_scale, **opts)
                await rt.activate(kid)
            await rt.launch("idle", count_and_scale, **opts)  # launched, never active
            for i in range(5):
                for kid in ("first", "second"):
                    rec = np.zeros(1, IN)[0]
                    rec["id"], rec["x"] = i, i
                    await rt.send(kid, rec)
            for kid in ("first", "second"):
                got = [await rt.receive(kid, timeout=30) for _ in range(5)]
                assert [(int(g["id"]), float(g["s"])) for g in got] == [
                    (i, 2.0 * i) for i in range(5)
                ]
            assert len(SimulatedDevice.running()) == 3
        assert SimulatedDevice.running() == []

    @sim
    async def test_single_sends_under_reject_and_drop_newest_are_counted_once() -> None:
        from pydotcompute.errors import QueueFullError
        from pydotcompute.runtime.runtime import RingKernelRuntime

        async with RingKernelRuntime() as rt:
            for kid, bp in (("rej", "reject"), ("dn", "drop_newest")):
                await rt.launch(kid, count_and_scale, backend="cuda", input_type=IN,
                                output_type=OUT, queue_size=2, backpressure=bp)  # fmt: skip
                recs = records(range(3))
                loop = rt._kernels[kid].kernel_backend
                assert loop.try_put(recs[0]) and loop.try_put(recs[1])
                if bp == "reject":
                    with pytest.raises(QueueFullError):
                        loop.try_put(recs[2])
                else:
                    assert loop.try_put(recs[2])  # dropped, counted
                c = rt._kernels[kid].kernel_backend.in_ring.host.counters()
                assert c.enqueued == 2 and c.rejected + c.dropped_newest == 1
                await rt.terminate(kid)

    @sim
    async def test_a_reject_send_decides_in_one_attempt(monkeypatch) -> None:
        # Room may appear between two attempts: one attempt, which also counts a
        # refusal, must decide alone, so a record is never both queued and refused.
        from pydotcompute.backends import ring_fed
        from pydotcompute.errors import QueueFullError
        from pydotcompute.runtime.runtime import RingKernelRuntime

        async with RingKernelRuntime() as rt:
            await rt.launch("rej", count_and_scale, backend="cuda", input_type=IN,
                            output_type=OUT, queue_size=2, backpressure="reject")  # fmt: skip
            loop = rt._kernels["rej"].kernel_backend
            attempts = []
            push = ring_fed.ring_push
            monkeypatch.setattr(ring_fed, "ring_push", lambda *a: attempts.append(1) or push(*a))
            recs = records(range(3))
            assert loop.try_put(recs[0]) and loop.try_put(recs[1])
            with pytest.raises(QueueFullError):
                loop.try_put(recs[2])
            assert len(attempts) == 3
            c = loop.in_ring.host.counters()
            assert (c.enqueued, c.rejected) == (2, 1)
            await rt.terminate("rej")

    @sim
    async def test_drop_oldest_sends_to_a_paused_kernel_keep_the_newest() -> None:
        # The host may not move an index the device owns: it raises the drop watermark
        # and waits for the kernel, which skips stale records even while paused.
        from pydotcompute.runtime.runtime import RingKernelRuntime

        async with RingKernelRuntime() as rt:
            await rt.launch("do", count_and_scale, backend="cuda", input_type=IN,
                            output_type=OUT, queue_size=2, backpressure="drop_oldest")  # fmt: skip
            for r in records(range(3)):
                await rt.send("do", r)
            ring = rt._kernels["do"].kernel_backend.in_ring.host
            # The device's counters reach the header when it mirrors them (~1 ms).
            await _wait_for(lambda: ring.counters().dropped_oldest == 1)
            c = ring.counters()
            assert (c.enqueued, c.dropped_oldest, c.dropped_newest) == (3, 1, 0)
            await rt.activate("do")
            got = await rt.receive_batch("do", max_items=2, timeout=5.0)
            while len(got) < 2:
                got = np.concatenate([got, await rt.receive_batch("do", 2, timeout=5.0)])
            assert sorted(got["id"].tolist()) == [1, 2]
            await rt.terminate("do")

    @sim
    async def test_message_objects_go_through_send_and_receive() -> None:
        from pydotcompute.messages import message
        from pydotcompute.runtime.runtime import RingKernelRuntime

        @message
        class Reading:
            value: float
            sensor: int

        def reply(msg, out, state):  # type: ignore[no-untyped-def]
            for i in range(16):
                out.correlation_id[i] = msg.message_id[i]
            out.value = msg.value * 2.0
            out.sensor = msg.sensor
            return True

        async with RingKernelRuntime() as rt:
            await rt.launch("reply", reply, backend="cuda", input_type=Reading,
                            output_type=Reading, queue_size=8)  # fmt: skip
            await rt.activate("reply")
            sent = [Reading(value=1.5 * i, sensor=i) for i in range(3)]
            for m in sent:
                await rt.send("reply", m, timeout=5)
            got = [await rt.receive("reply", timeout=10) for _ in sent]
            assert [g.sensor for g in got] == [0, 1, 2]
            assert [g.value for g in got] == [0.0, 3.0, 6.0]
            assert [g.correlation_id for g in got] == [m.message_id for m in sent]
            await rt.terminate("reply")

    def raises_on_negative(msg, out, state):  # type: ignore[no-untyped-def]
        if msg.x < 0:
            raise ValueError("negative reading")
        out.value = msg.x
        return True

    def _message_types():  # type: ignore[no-untyped-def]
        from pydotcompute.messages import message

        @message
        class SimIn:
            x: float

        @message
        class SimOut:
            value: float

        return SimIn, SimOut

    @sim
    async def test_a_raising_handler_fails_the_record_and_keeps_earlier_outputs() -> None:
        from pydotcompute.errors import KernelFailedError
        from pydotcompute.runtime.lifecycle import KernelState
        from pydotcompute.runtime.runtime import RingKernelRuntime

        SimIn, SimOut = _message_types()
        async with RingKernelRuntime() as rt:
            await rt.launch("neg", raises_on_negative, backend="cuda", input_type=SimIn,
                            output_type=SimOut, queue_size=8, extra={"threads": 1})  # fmt: skip
            await rt.activate("neg")
            first = SimIn(x=1.0)
            await rt.send("neg", first)
            reply = await rt.receive("neg", timeout=10)
            # Outputs get a fresh id, the default priority and the input's id.
            assert reply.value == 1.0 and reply.priority == 128
            assert reply.correlation_id == first.message_id and reply.message_id.int != 0
            await rt.send("neg", SimIn(x=2.0))
            await _wait_for(lambda: rt.get_telemetry("neg").messages_sent == 2)
            bad = SimIn(x=-1.0)
            await rt.send("neg", bad)
            await _wait_for(lambda: rt.get_state("neg") is KernelState.FAILED)
            assert (await rt.receive("neg", timeout=1)).value == 2.0  # produced before
            with pytest.raises(KernelFailedError) as info:
                await rt.receive("neg", timeout=1)
            assert info.value.failed_message == bad
            assert "negative reading" in str(info.value)
            assert f'File "{__file__}"' in str(info.value)
            assert rt.get_telemetry("neg").errors == 1

    @sim
    async def test_restart_is_refused_on_the_cuda_backend() -> None:
        from pydotcompute.errors import InvalidConfigurationError
        from pydotcompute.runtime.runtime import RingKernelRuntime

        async with RingKernelRuntime() as rt:
            with pytest.raises(InvalidConfigurationError, match="not supported on cuda"):
                await rt.launch("r", count_and_scale, backend="cuda", input_type=IN,
                                output_type=OUT, restart="on-failure")  # fmt: skip

    @sim
    async def test_runtime_marks_a_faulting_kernel_failed() -> None:
        from pydotcompute.errors import KernelFailedError
        from pydotcompute.runtime.lifecycle import KernelState
        from pydotcompute.runtime.runtime import RingKernelRuntime

        async with RingKernelRuntime() as rt:
            await rt.launch(
                "oob", out_of_bounds, backend="cuda", input_type=IN, output_type=OUT,
                queue_size=4, state=np.zeros(1), extra={"threads": 1},
            )  # fmt: skip
            await rt.activate("oob")
            await rt.send_batch("oob", records([1]), timeout=5)
            await _wait_for(lambda: rt.get_state("oob") is KernelState.FAILED)
            assert isinstance(rt.get_error("oob"), IndexError)
            assert rt.get_telemetry("oob").errors == 1
            with pytest.raises(KernelFailedError):
                await rt.send_batch("oob", records([2]), timeout=1)
            await rt.terminate("oob")  # releases it; nothing hangs

    @sim
    async def test_second_launch_of_a_kernel_type_does_not_recompose(monkeypatch) -> None:  # type: ignore[no-untyped-def]
        from pydotcompute.backends import cuda_loop
        from pydotcompute.runtime.runtime import RingKernelRuntime

        def fresh(msg, out, state):  # type: ignore[no-untyped-def]
            out.id = msg.id
            return True

        calls = []
        real = cuda_loop.compose_loop
        monkeypatch.setattr(cuda_loop, "compose_loop", lambda *a: calls.append(a) or real(*a))
        async with RingKernelRuntime() as rt:
            for name in ("a", "b"):  # one after the other: the simulator runs one at a time
                await rt.launch(
                    name, fresh, backend="cuda", input_type=IN, output_type=OUT,
                    queue_size=4, extra={"threads": 1},
                )  # fmt: skip
                await rt.terminate(name)
            assert len(calls) == 1
            assert rt._kernels["a"].kernel_backend.kernel is rt._kernels["b"].kernel_backend.kernel
            assert rt._kernels["a"].kernel_backend.blocks == 1  # one block under the simulator
