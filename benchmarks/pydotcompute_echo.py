"""The echo actor of PyDotCompute 0.2.0's docs, run on this package and on PyDotCompute.

The same code runs on both, unchanged: the messages are ``@message @dataclass``
classes with ``uuid4`` ids, the actor is the one from PyDotCompute's testing guide
(``ctx.receive(timeout=0.1)``, answer with a new ``EchoResponse`` correlated to the
request), and the client goes through the runtime (``rt.send`` / ``rt.receive`` with
``timeout=1.0``), building one ``EchoRequest`` per message:

* throughput: one client task keeps a window of 256 messages in flight (it sends 256,
  then receives one and sends one until ``--messages`` went through);
* latency: one message at a time, p50 and p99 of the round trip.

Both packages are imported as ``pydotcompute``, so each side runs in its own child
process with its own ``sys.path``, one after the other, several times, alternating
which goes first; ratios are taken per repetition (each against the other package's
run next to it) and reported as the median with the lowest and highest repetition.
PyDotCompute runs as it installs itself: on uvloop (its import switches the event
loop policy to uvloop). This package runs on the standard asyncio loop, as it never
changes the event loop.

PyDotCompute is never installed (its import name is this package's): the script loads
it from its extracted sdist, given by ``--reference DIR`` or ``$PYDOTCOMPUTE_REFERENCE``
(the folder holding ``pydotcompute/``). ``--fetch-reference DIR`` downloads and
extracts it there with pip. uvloop must be installed (``pip install uvloop``).
``--ours-only`` measures this package alone (no ratios).

    python benchmarks/pydotcompute_echo.py --reference DIR [--messages N] [--repeats R]

A third side, the asyncio floor, runs the same messages through the cheapest asyncio
actor that does the same work (two deques, a future per wait, no runtime at all): it
is what the standard loop itself costs, and the p50 goal is measured against it too.

Goals: throughput >= 2.2x PyDotCompute's, p50 latency <= 0.3x, and p50 latency
<= 1.1x the asyncio floor. The floor itself is about 0.3x PyDotCompute's p50 on the
standard loop (0.30-0.31 measured), so 0.3x can only be met when the runtime costs
nothing; the floor-relative goal says how close to that it gets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

WINDOW = 256
REFERENCE_VERSION = "0.2.0"
ROOT = Path(__file__).resolve().parents[1]
GOAL_THROUGHPUT = 2.2
GOAL_P50 = 0.3
GOAL_P50_VS_FLOOR = 1.1
FLOOR = "asyncio floor"

HOW_TO_GET_REFERENCE = (
    f"get PyDotCompute {REFERENCE_VERSION}'s source (never install it: its import name is this package's):\n"
    "    python benchmarks/pydotcompute_echo.py --fetch-reference DIR\n"
    "or by hand:\n"
    f"    pip download --no-deps --no-binary :all: pydotcompute=={REFERENCE_VERSION} -d DIR\n"
    f"    tar xzf DIR/pydotcompute-{REFERENCE_VERSION}.tar.gz -C DIR\n"
    f"then pass --reference DIR/pydotcompute-{REFERENCE_VERSION} (or set PYDOTCOMPUTE_REFERENCE)"
)


# -- the workload: runs in a child process, on whichever package its sys.path gives ------


def child(messages: int) -> None:
    """Run the docs' echo actor on the ``pydotcompute`` found first on sys.path; print
    one JSON line with the results."""
    import asyncio
    import time
    from dataclasses import dataclass, field
    from uuid import UUID, uuid4

    import pydotcompute
    from pydotcompute import RingKernelRuntime, message, ring_kernel

    @message
    @dataclass
    class EchoRequest:
        value: str
        message_id: UUID = field(default_factory=uuid4)
        priority: int = 128
        correlation_id: UUID | None = None

    @message
    @dataclass
    class EchoResponse:
        value: str
        message_id: UUID = field(default_factory=uuid4)
        priority: int = 128
        correlation_id: UUID | None = None

    @ring_kernel(kernel_id="echo", auto_register=False)
    async def echo_actor(ctx):  # type: ignore[no-untyped-def]
        while not ctx.should_terminate:
            if not ctx.is_active:
                await ctx.wait_active()
                continue
            try:
                msg = await ctx.receive(timeout=0.1)
                await ctx.send(EchoResponse(value=msg.value, correlation_id=msg.message_id))
            except Exception:  # the docs' actor: a receive timeout just loops
                continue

    async def throughput(rt: RingKernelRuntime, n: int) -> float:
        send, receive = rt.send, rt.receive
        t0 = time.perf_counter()
        for _ in range(WINDOW):
            await send("echo", EchoRequest(value="ping"))
        for _ in range(n - WINDOW):
            await receive("echo", timeout=1.0)
            await send("echo", EchoRequest(value="ping"))
        for _ in range(WINDOW):
            await receive("echo", timeout=1.0)
        return n / (time.perf_counter() - t0)

    async def latency(rt: RingKernelRuntime, n: int) -> list[int]:
        send, receive = rt.send, rt.receive
        samples = []
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            await send("echo", EchoRequest(value="ping"))
            reply = await receive("echo", timeout=1.0)
            samples.append(clock() - t0)
            assert reply.value == "ping"
        return samples

    async def main() -> dict[str, object]:
        async with RingKernelRuntime() as rt:
            await rt.launch("echo", echo_actor)
            await rt.activate("echo")
            await asyncio.sleep(0.1)  # as the docs do: let the actor start
            request = EchoRequest(value="check")
            await rt.send("echo", request)
            reply = await rt.receive("echo", timeout=1.0)
            assert reply.correlation_id == request.message_id, "not an echo"
            await throughput(rt, max(messages // 10, 2 * WINDOW))  # warm up
            rate = await throughput(rt, messages)
            samples = sorted(await latency(rt, max(messages // 10, 100)))
            loop = type(asyncio.get_running_loop())
            return {
                "version": getattr(pydotcompute, "__version__", "?"),
                "path": str(Path(pydotcompute.__file__).parent),
                "loop": f"{loop.__module__}.{loop.__qualname__}",
                "throughput": rate,
                "p50_us": samples[len(samples) // 2] / 1000,
                "p99_us": samples[int(len(samples) * 0.99)] / 1000,
            }

    print(json.dumps(asyncio.run(main())))


def floor_child(messages: int) -> None:
    """The same workload on the cheapest asyncio actor that does the same work: the
    same messages (built the same way, ``uuid4`` ids included) through two deques,
    one future per wait, on the standard loop; no lifecycle, timeouts, typing checks,
    backpressure or telemetry. No runtime can go below it on this loop."""
    import asyncio
    import time
    from collections import deque
    from dataclasses import dataclass, field
    from uuid import UUID, uuid4

    @dataclass
    class EchoRequest:
        value: str
        message_id: UUID = field(default_factory=uuid4)
        priority: int = 128
        correlation_id: UUID | None = None

    @dataclass
    class EchoResponse:
        value: str
        message_id: UUID = field(default_factory=uuid4)
        priority: int = 128
        correlation_id: UUID | None = None

    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        inbox: deque[EchoRequest] = deque()
        outbox: deque[EchoResponse] = deque()
        waiting: dict[str, asyncio.Future[None] | None] = {"in": None, "out": None}

        def wake(side: str) -> None:
            fut = waiting[side]
            if fut is not None:
                waiting[side] = None
                fut.set_result(None)

        async def take(q: deque[Any], side: str) -> Any:
            while not q:
                fut = loop.create_future()
                waiting[side] = fut
                await fut
            return q.popleft()

        async def actor() -> None:
            while True:
                msg = inbox.popleft() if inbox else await take(inbox, "in")
                outbox.append(EchoResponse(value=msg.value, correlation_id=msg.message_id))
                wake("out")

        async def send(m: EchoRequest) -> None:
            inbox.append(m)
            wake("in")

        async def throughput(n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(WINDOW):
                await send(EchoRequest(value="ping"))
            for _ in range(n - WINDOW):
                _ = outbox.popleft() if outbox else await take(outbox, "out")
                await send(EchoRequest(value="ping"))
            for _ in range(WINDOW):
                _ = outbox.popleft() if outbox else await take(outbox, "out")
            return n / (time.perf_counter() - t0)

        async def latency(n: int) -> list[int]:
            samples = []
            clock = time.perf_counter_ns
            for _ in range(n):
                t0 = clock()
                await send(EchoRequest(value="ping"))
                reply = await take(outbox, "out")
                samples.append(clock() - t0)
                assert reply.value == "ping"
            return samples

        task = asyncio.ensure_future(actor())
        await throughput(max(messages // 10, 2 * WINDOW))  # warm up
        rate = await throughput(messages)
        samples = sorted(await latency(max(messages // 10, 100)))
        task.cancel()
        loop_type = type(loop)
        return {
            "version": "-",
            "path": "-",
            "loop": f"{loop_type.__module__}.{loop_type.__qualname__}",
            "throughput": rate,
            "p50_us": samples[len(samples) // 2] / 1000,
            "p99_us": samples[int(len(samples) * 0.99)] / 1000,
        }

    print(json.dumps(asyncio.run(main())))


# -- the parent: finds both packages, runs the children, prints the ratios ---------------


def reference_problem(tree: Path | None) -> str | None:
    """Why ``tree`` is not PyDotCompute 0.2.0's source, or None when it is."""
    if tree is None:
        return "PyDotCompute's source was not given (--reference DIR or $PYDOTCOMPUTE_REFERENCE)"
    init = tree / "pydotcompute" / "__init__.py"
    if not init.is_file():
        return f"{tree} does not hold PyDotCompute's source (no pydotcompute/__init__.py)"
    if f'__version__ = "{REFERENCE_VERSION}"' not in init.read_text(encoding="utf-8"):
        return f"{tree} holds a PyDotCompute other than {REFERENCE_VERSION}"
    if not (tree / "pydotcompute" / "ring_kernels" / "runtime.py").is_file():
        return f"{tree} is not PyDotCompute (no pydotcompute/ring_kernels/runtime.py)"
    return None


def uvloop_problem() -> str | None:
    import importlib.util

    if importlib.util.find_spec("uvloop") is None:
        return "uvloop is not installed; PyDotCompute is measured on it: pip install uvloop"
    return None


def fetch_reference(dest: Path) -> Path:
    """Download PyDotCompute's sdist with pip and extract it under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"pydotcompute=={REFERENCE_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, spec, "-d", str(dest)], check=True)
    archive = dest / f"pydotcompute-{REFERENCE_VERSION}.tar.gz"
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+: refuse unsafe members
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)  # noqa: S202 - PyPI's sdist of a pinned version
    return dest / f"pydotcompute-{REFERENCE_VERSION}"


def run_child(package_root: Path | None, messages: int) -> dict[str, object]:
    """One run in a child process: of the package at ``package_root``, or of the
    asyncio floor when it is None."""
    # Only the package under test may be importable as pydotcompute: PYTHONPATH names
    # it alone, and the script's folder (sys.path[0]) holds no pydotcompute.
    env = dict(os.environ, PYTHONPATH=str(package_root or ""))
    mode = "--child" if package_root is not None else "--floor-child"
    with tempfile.TemporaryDirectory() as cwd:  # nothing importable in the cwd either
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), mode, str(messages)],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if proc.returncode != 0:
        raise SystemExit(
            f"the run on {package_root} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    if package_root is None:
        return result
    if Path(str(result["path"])).resolve() != (package_root / "pydotcompute").resolve():
        raise SystemExit(f"expected the package of {package_root}, ran {result['path']}")
    return result


def _spread(values: list[float], fmt: str) -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    return f"{format(med, fmt)} [{format(lo, fmt)}-{format(hi, fmt)}]"


def main(messages: int, repeats: int, reference: Path | None, ours_only: bool) -> int:
    sides: dict[str, Path | None] = {"pydotcompute": ROOT}
    if not ours_only:
        problems = [p for p in (reference_problem(reference), uvloop_problem()) if p]
        if problems:
            for p in problems:
                print(f"missing: {p}", file=sys.stderr)
            if reference_problem(reference):
                print(HOW_TO_GET_REFERENCE, file=sys.stderr)
            print("(--ours-only measures this package alone)", file=sys.stderr)
            return 2
        assert reference is not None
        sides["PyDotCompute " + REFERENCE_VERSION] = reference
    sides[FLOOR] = None
    names = list(sides)
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            runs[name].append(run_child(sides[name], messages))

    print(f"messages per run: {messages}, repeats: {repeats}, window: {WINDOW}")
    print("median [lowest-highest] over the repetitions; ratios are per repetition\n")
    for name in names:
        first = runs[name][0]
        if name == FLOOR:
            print(f"{name}: the same messages through two deques on {first['loop']}")
        else:
            print(f"{name} {first['version']} from {first['path']} on {first['loop']}")
    metrics = (
        ("throughput", "msg/s, window of 256", ",.0f", f"goal >= {GOAL_THROUGHPUT}"),
        ("p50_us", "latency p50 (us), one at a time", ".1f", f"goal <= {GOAL_P50}"),
        ("p99_us", "latency p99 (us)", ".1f", ""),
    )
    for key, label, fmt, goal in metrics:
        print(f"\n{label}")
        for name in names:
            values = [float(run[key]) for run in runs[name]]  # type: ignore[arg-type]
            print(f"  {name:22}{_spread(values, fmt):>36}")
        values = {n: [float(run[key]) for run in runs[n]] for n in names}  # type: ignore[arg-type]
        floor_goal = f"   (goal <= {GOAL_P50_VS_FLOOR})" if key == "p50_us" else ""
        pairs = [("pydotcompute", FLOOR, "vs the floor", floor_goal)]
        if len(names) == 3:
            theirs = names[1]
            pairs = [
                ("pydotcompute", theirs, "ratio", f"   ({goal})" if goal else ""),
                (FLOOR, theirs, "floor ratio", "   (the same work with no runtime)"),
                *pairs,
            ]
        for a, b, label, note in pairs:
            ratio = [x / y for x, y in zip(values[a], values[b], strict=True)]
            print(f"  {label:22}{_spread(ratio, '.2f'):>36}{note}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--floor-child":
        floor_child(int(sys.argv[2]))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--reference",
        type=Path,
        default=os.environ.get("PYDOTCOMPUTE_REFERENCE") or None,
        help="PyDotCompute 0.2.0's extracted sdist (the folder holding pydotcompute/)",
    )
    ap.add_argument(
        "--fetch-reference",
        type=Path,
        metavar="DIR",
        help="download PyDotCompute 0.2.0's sdist into DIR with pip, extract it, and use it",
    )
    ap.add_argument("--ours-only", action="store_true", help="measure this package alone")
    a = ap.parse_args()
    if a.messages < 4 * WINDOW or a.repeats < 1:
        ap.error(f"--messages must be at least {4 * WINDOW} and --repeats at least 1")
    ref = fetch_reference(a.fetch_reference) if a.fetch_reference else a.reference
    sys.exit(main(a.messages, a.repeats, ref, a.ours_only))
