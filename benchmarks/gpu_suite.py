"""Everything the GPU goals need, in one command of at most eight minutes.

Runs, each step in a subprocess of its own with its own timeout and a stack dump of
every thread when it stalls (``faulthandler``):

1. ``gpu_floor.py``       the machine's floor: CPU<->GPU ping-pong through mapped memory,
                          launch + sync (plain, CUDA graph), 8-byte copies, zero-copy
                          bandwidth both ways;
2. ``gpu_roundtrip.py``   ring and runtime round trips, blocks=1 and one per SM, against
                          launch + sync;
3. ``gpu_throughput.py``  the throughput matrix: batches 1, 8, 64 and large, raw rings and
                          through ``RingKernelRuntime``, against a launch per batch;
4. ``gpu_idle.py``        an 8192 x 8192 float32 matmul alone and beside an idle kernel;
5. ``gpu_chain.py``       three kernels linked in device memory against one, and against
                          the same three with the host between them;
6. the ``gpu``-marked tests (pytest).

It writes one JSON file (every step's results, output tails, timings, the versions) and
prints a table of the goals, each measured against the floor or baseline of the same
run, with its verdict.

    python benchmarks/gpu_suite.py [--out gpu_suite.json]    # on a GPU
    python benchmarks/gpu_suite.py --simulate                 # a rehearsal, no GPU

``--simulate`` runs the same steps on numba-cuda's simulator at tiny sizes (the GPU
tests then skip): it proves the plumbing, its numbers and verdicts mean nothing. The
exit status is 0 when every step ran to completion, 1 otherwise (a goal that is not
met is a result, not a failure of the suite).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUDGET_S = 480


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    script: str  # a benchmark, or "pytest"
    timeout_s: int  # on a GPU
    sim_timeout_s: int  # on the simulator


STEPS = (
    Step("floor", "gpu_floor.py", 50, 120),
    Step("roundtrip", "gpu_roundtrip.py", 70, 180),
    Step("throughput", "gpu_throughput.py", 100, 180),
    Step("idle", "gpu_idle.py", 50, 120),
    Step("chain", "gpu_chain.py", 70, 300),
    Step("gpu tests", "pytest", 140, 180),  # every test compiles its own loop
)
assert sum(s.timeout_s for s in STEPS) <= BUDGET_S  # the suite's promise: 8 minutes


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("CUDA_MODULE_LOADING", "EAGER")  # before any child touches CUDA
    env["PYTHONFAULTHANDLER"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the scripts switch themselves (--simulator)
    return env


def _gpu_test_files() -> list[str]:
    return sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def _junit_counts(path: Path) -> dict[str, int]:
    suite = ET.parse(path).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def run_step(step: Step, simulate: bool, work: Path) -> dict[str, Any]:
    timeout = step.sim_timeout_s if simulate else step.timeout_s
    out_json = work / f"{step.name.replace(' ', '_')}.json"
    if step.script == "pytest":
        xml = work / "gpu_tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "-o", f"faulthandler_timeout={max(10, timeout - 20)}", f"--junitxml={xml}",
               *_gpu_test_files()]  # fmt: skip
    else:
        cmd = [sys.executable, str(HERE / step.script), "--json", str(out_json),
               "--stall-after", str(max(10, timeout - 10))]  # fmt: skip
        if simulate:
            cmd.append("--simulator")
    record: dict[str, Any] = {"command": " ".join(cmd[1:]), "timeout_s": timeout}
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        record["returncode"] = proc.returncode
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        record["returncode"] = None
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
    record["seconds"] = round(time.monotonic() - t0, 1)
    record["stdout"] = stdout
    record["stderr_tail"] = stderr[-4000:]
    if step.script == "pytest":
        xml = work / "gpu_tests.xml"
        if xml.exists():
            record["results"] = _junit_counts(xml)
        # pytest exits 5 when nothing was collected, 0 when all passed or skipped
        ok = record["returncode"] in (0, 5)
    else:
        if out_json.exists():
            record["results"] = json.loads(out_json.read_text())
        ok = record["returncode"] == 0 and "results" in record
    if record["returncode"] is None:
        record["status"] = "timed out"
    else:
        record["status"] = "ok" if ok else "failed"
    return record


# -- the goals -------------------------------------------------------------------------


def _get(steps: dict[str, Any], step: str, *path: Any) -> Any:
    node = steps.get(step, {}).get("results")
    for key in path:
        if node is None:
            return None
        if isinstance(key, int):
            node = node[key] if isinstance(node, list) and len(node) > key else None
        else:
            node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def _row(steps: dict[str, Any], batch: int) -> dict[str, Any] | None:
    rows = (steps.get("throughput", {}).get("results") or {}).get("matrix") or []
    match = [r for r in rows if r.get("batch") == batch]
    if batch < 0 and rows:  # the largest batch
        return max(rows, key=lambda r: r["batch"])
    return match[0] if match else None


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return float(a) / float(b)


def goals(steps: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals of the cuda backend, each measured against this run's floor."""
    ring = _get(steps, "roundtrip", "rings_blocks1_us", 0)
    floor = _get(steps, "floor", "pingpong_word_us", 0)
    launch = _get(steps, "floor", "launch_sync_cupy_us", 0)
    launch_kind = "CuPy launch + sync"
    if launch is None:
        launch = _get(steps, "roundtrip", "launch_sync_us", 0)
        launch_kind = "launch + sync"
    found: list[tuple[str, float | None, str, bool | None]] = []

    def add(goal: str, value: float | None, target: str, ok: Any) -> None:
        found.append((goal, value, target, None if value is None else bool(ok(value))))

    add("ring round trip p50 / ping-pong floor", _ratio(ring, floor), "<= 1.5x",
        lambda v: v <= 1.5)  # fmt: skip
    add(f"{launch_kind} p50 / ring round trip p50", _ratio(launch, ring), ">= 3x",
        lambda v: v >= 3)  # fmt: skip
    add("rt.send + rt.receive p50 / ring round trip", _ratio(
        _get(steps, "roundtrip", "runtime_send_receive_us", 0), ring), "<= 2x",
        lambda v: v <= 2)  # fmt: skip
    add("one block per SM / blocks=1, round trip p50", _ratio(
        _get(steps, "roundtrip", "rings_blocks_per_sm_us", 0), ring), "<= 1.2x",
        lambda v: v <= 1.2)  # fmt: skip
    for batch, need in ((1, 5), (8, 10), (64, 10)):
        row = _row(steps, batch)
        add(f"batch {batch}: rings / a launch per batch",
            _ratio(row["rings"], row["launch"]) if row else None, f">= {need}x",
            lambda v, need=need: v >= need)  # fmt: skip
    big = _row(steps, -1)
    add(f"batch {big['batch'] if big else '?'}: rings msg/s (M)",
        big["rings"] / 1e6 if big else None, ">= 200", lambda v: v >= 200)  # fmt: skip
    zero_copy = [_get(steps, "floor", k) for k in ("zero_copy_h2d_GBps", "zero_copy_d2h_GBps")]
    record_bytes = _get(steps, "throughput", "record_bytes") or 16
    bw = None
    if big and all(v for v in zero_copy):
        bw = big["rings"] * record_bytes / 1e9 / min(zero_copy)  # type: ignore[type-var]
    add("large batches: record bytes / zero-copy bandwidth", bw, ">= 0.5", lambda v: v >= 0.5)
    add("large batches: runtime / rings",
        _ratio(big["runtime"], big["rings"]) if big else None, ">= 0.8x",
        lambda v: v >= 0.8)  # fmt: skip
    beside = (steps.get("idle", {}).get("results") or {}).get("beside") or []
    slow = beside[0].get("slowdown_pct") if beside else None
    add("8192^2 matmul beside an idle kernel: slowdown %", slow, "<= 5", lambda v: v <= 5)
    add("linked x3 / one kernel, records/s",
        _get(steps, "chain", "linked_x3_throughput_ratio"), ">= 0.8x",
        lambda v: v >= 0.8)  # fmt: skip
    add("linked x3 / one kernel, round trip p50",
        _get(steps, "chain", "linked_x3_roundtrip_ratio"), "<= 1.3x",
        lambda v: v <= 1.3)  # fmt: skip
    for kind in ("fused", "linked"):
        add(f"flow, {kind} x3 / one stage, items/s",
            _get(steps, "chain", f"flow_{kind}_throughput_ratio"), ">= 0.8x",
            lambda v: v >= 0.8)  # fmt: skip
        add(f"flow, {kind} x3 / one stage, round trip p50",
            _get(steps, "chain", f"flow_{kind}_roundtrip_ratio"), "<= 1.3x",
            lambda v: v <= 1.3)  # fmt: skip
    tests = steps.get("gpu tests", {}).get("results")
    failed = None if tests is None else tests["failures"] + tests["errors"]
    add("gpu-marked tests failing", failed, "0 (and some ran)",
        lambda v: v == 0 and tests["passed"] > 0)  # fmt: skip
    return [{"goal": g, "measured": v, "target": t, "pass": ok} for g, v, t, ok in found]


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("numpy", "numba", "numba-cuda", "cupy-cuda12x", "cupy-cuda13x", "cuda-bindings"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--simulate", action="store_true",
                    help="rehearse on numba-cuda's simulator (tiny sizes, no GPU)")  # fmt: skip
    ap.add_argument("--out", default="gpu_suite.json", help="where to write the JSON")
    ap.add_argument("--only", action="append", choices=[s.name for s in STEPS],
                    help="run only this step (repeatable)")  # fmt: skip
    args = ap.parse_args()
    started = time.time()
    report: dict[str, Any] = {
        "simulate": args.simulate,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "versions": _versions(),
        "steps": {},
    }
    print(("REHEARSAL on numba-cuda's simulator: the numbers and verdicts mean nothing\n"
           if args.simulate else "") + f"pydotcompute GPU suite, budget {BUDGET_S} s")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        for step in STEPS:
            if args.only and step.name not in args.only:
                continue
            print(f"\n== {step.name} ==", flush=True)
            rec = run_step(step, args.simulate, Path(tmp))
            report["steps"][step.name] = rec
            print(rec["stdout"].rstrip()[-6000:])
            if rec["status"] != "ok":
                print(f"[{step.name}: {rec['status']} after {rec['seconds']} s]")
                print(rec["stderr_tail"][-3000:])
            else:
                print(f"[{step.name}: ok, {rec['seconds']} s]")
    device = (report["steps"].get("floor", {}).get("results") or {}).get("device")
    report["device"] = device
    report["goals"] = goals(report["steps"])
    report["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=2, default=float))
    print(f"\n{'goal':<52}{'measured':>12}  {'target':<18}verdict")
    for g in report["goals"]:
        v = "-" if g["measured"] is None else f"{g['measured']:.2f}"
        verdict = "n/a" if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")
        print(f"{g['goal']:<52}{v:>12}  {g['target']:<18}{verdict}")
    bad = [n for n, r in report["steps"].items() if r["status"] != "ok"]
    print(f"\ndevice: {device}; {report['seconds']} s; results in {args.out}"
          + (f"; steps that did not finish: {', '.join(bad)}" if bad else ""))  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
