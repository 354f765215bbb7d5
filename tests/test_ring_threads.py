"""HostRing under concurrency: several producer and consumer threads on one ring."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from pydotcompute.rings import HostRing, RingSide
from pydotcompute.rings.host_ops import ring_pop

REC = np.dtype([("producer", "<u4"), ("seq", "<u4"), ("payload", "<u8")])


def payload(p: int, s: np.ndarray) -> np.ndarray:
    return (np.uint64(p) << np.uint64(40)) ^ (s.astype(np.uint64) * np.uint64(2654435761))


def batch_of(p: int, start: int, k: int) -> np.ndarray:
    a = np.zeros(k, REC)
    a["producer"] = p
    a["seq"] = np.arange(start, start + k)
    a["payload"] = payload(p, a["seq"])
    return a


def run_threads(targets):
    errors: list[BaseException] = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # surfaced by the assert below
                errors.append(e)

        return run

    threads = [threading.Thread(target=guard(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def producer(ring, p, n, rng_seed, accepted=None, timeout=None):
    def run():
        rng = random.Random(rng_seed)
        s = 0
        while s < n:
            k = min(n - s, rng.randint(1, 48))
            got = ring.push_batch(batch_of(p, s, k), timeout=timeout)
            if accepted is not None:
                accepted[p] += got
            s += k

    return run


def consumer(ring, sink, done, rng_seed):
    def run():
        rng = random.Random(rng_seed)
        while True:
            got = ring.pop_batch(rng.randint(1, 64), timeout=0.002)
            if len(got):
                sink.append(got.copy())
            elif done.is_set() and ring.depth == 0:
                return

    return run


def check_stream(chunks_per_consumer, total_per_producer, exact: bool):
    seen: dict[int, list[int]] = {}
    for chunks in chunks_per_consumer:
        last: dict[int, int] = {}
        for chunk in chunks:
            for rec in chunk:
                p, s = int(rec["producer"]), int(rec["seq"])
                assert int(rec["payload"]) == int(payload(p, np.array([s]))[0]), "torn record"
                # FIFO per producer, as seen by each consumer
                assert s > last.get(p, -1), f"producer {p}: {s} after {last.get(p)}"
                last[p] = s
                seen.setdefault(p, []).append(s)
    for p, n in total_per_producer.items():
        got = sorted(seen.get(p, []))
        assert len(got) == len(set(got)), f"producer {p}: duplicates"
        if exact:
            assert got == list(range(n)), f"producer {p}: lost {n - len(got)}"
    return seen


@pytest.mark.parametrize("producers,consumers", [(1, 1), (3, 3), (4, 1)])
def test_block_many_threads_lose_and_duplicate_nothing(producers, consumers):
    ring = HostRing(64, REC)
    n = 15_000
    done = threading.Event()
    sinks: list[list[np.ndarray]] = [[] for _ in range(consumers)]
    prods = [producer(ring, p, n, p) for p in range(producers)]

    def all_producers():
        run_threads(prods)
        done.set()

    run_threads(
        [all_producers] + [consumer(ring, sinks[c], done, 100 + c) for c in range(consumers)]
    )
    check_stream(sinks, {p: n for p in range(producers)}, exact=True)
    c = ring.counters()
    assert c.enqueued == c.dequeued == producers * n
    assert c.dropped == c.rejected == 0
    assert 0 < c.high_water <= 64
    released, claim, published, reserve = ring._indices()
    assert released == claim == published == reserve == producers * n
    total = sum(int(ch["payload"].sum(dtype=np.uint64)) for s in sinks for ch in s) % 2**64
    want = sum(int(payload(p, np.arange(n)).sum(dtype=np.uint64)) for p in range(producers))
    assert total == want % 2**64


@pytest.mark.parametrize("strategy", ["drop_newest", "drop_oldest", "reject"])
def test_lossy_strategies_account_for_every_record(strategy):
    ring = HostRing(16, REC, backpressure=strategy)
    n, producers, consumers = 8_000, 3, 2
    done = threading.Event()
    accepted = {p: 0 for p in range(producers)}
    sinks: list[list[np.ndarray]] = [[] for _ in range(consumers)]
    prods = [producer(ring, p, n, p, accepted) for p in range(producers)]

    def all_producers():
        run_threads(prods)
        done.set()

    run_threads([all_producers] + [consumer(ring, sinks[c], done, 7 + c) for c in range(consumers)])
    seen = check_stream(sinks, {p: n for p in range(producers)}, exact=False)
    delivered = sum(len(v) for v in seen.values())
    c = ring.counters()
    assert c.dequeued == delivered
    assert c.enqueued == sum(accepted.values())
    if strategy == "drop_oldest":
        # batches larger than the ring skip their head without enqueueing it
        assert c.dequeued + c.dropped_oldest == producers * n
        assert c.dropped_newest == c.rejected == 0
    elif strategy == "drop_newest":
        assert c.enqueued == c.dequeued
        assert c.dropped_newest == producers * n - c.enqueued
    else:
        assert c.enqueued == c.dequeued
        assert c.rejected == producers * n - c.enqueued


def test_cross_side_drop_oldest_uses_the_watermark():
    """Producer on the host, consumer 'on the device' (driven here by ring_pop, the
    same consumer code): the producer never writes the consumer's indices."""
    ring = HostRing(4, REC, backpressure="drop_oldest", consumer_side=RingSide.DEVICE)
    n = 400
    stop = threading.Event()
    got: list[np.ndarray] = []

    def slow_consumer():
        out = np.zeros(2, REC)
        while not stop.is_set() or ring.depth:
            k = ring_pop(ring.buffer, out.view(np.uint8), 0, 2)
            if k:
                got.append(out[:k].copy())
            time.sleep(0.0005)

    def produce():
        for s in range(n):
            ring.push_batch(batch_of(0, s, 1), timeout=1.0)
        stop.set()

    run_threads([produce, slow_consumer])
    seqs = [int(s) for ch in got for s in ch["seq"]]
    assert seqs == sorted(set(seqs))
    assert seqs[-1] == n - 1
    c = ring.counters()
    assert c.dropped_oldest > 0 and c.drop_before > 0
    assert c.enqueued + c.dropped_newest == n
    assert c.enqueued == c.dequeued + c.dropped_oldest
    _, claim, _, _ = ring._indices()
    assert claim == c.released  # claim is the consumer side's; here it shadows released


def test_cross_side_drop_oldest_without_a_consumer_falls_back_to_drop_newest():
    ring = HostRing(2, REC, backpressure="drop_oldest", consumer_side=RingSide.DEVICE)
    assert ring.push_batch(batch_of(0, 0, 2)) == 2
    t = time.monotonic()
    assert ring.push_batch(batch_of(0, 2, 1), timeout=0.02) == 0
    assert time.monotonic() - t >= 0.02
    c = ring.counters()
    assert (c.dropped_newest, c.drop_before, c.released) == (1, 1, 0)
    out = np.zeros(4, REC)
    assert ring_pop(ring.buffer, out.view(np.uint8), 0, 4) == 1  # position 0 is stale
    assert int(out["seq"][0]) == 1
    assert ring.counters().dropped_oldest == 1
